"""Faults in multi-rank runs: a stuck peer (SIGSTOP) ends the run with the peer named, even in a collective
that ignores the backend's timeout; SIGTERM / SIGHUP / SIGKILL to the `--nproc` launcher leave no rank
behind. Timeouts here only keep a broken run from hanging the suite; the assertions are on behaviour (exit
status, the rank named, no process left), never on how long anything took."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

pytest.importorskip("torch")

from ascend.distributed import RankFailed, init_distributed, launch  # noqa: E402
from common.presets import random_weights  # noqa: E402
from tools.testing.hf_bridge import save_official  # noqa: E402

from .conftest import small_config  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent
SAFETY = 300  # seconds: a hung run fails the test instead of hanging the suite

pytestmark = pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads /proc")


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory) -> Path:
    cfg = small_config(n_routed_experts=8)
    d = tmp_path_factory.mktemp("fault-model")
    save_official(cfg, dict(random_weights(cfg, seed=3)), d)
    return d


def _proc_info(pid: int) -> tuple[str, int, str] | None:
    """(comm, ppid, state) of a live process, None if it is gone or a zombie."""
    try:
        comm = Path(f"/proc/{pid}/comm").read_text().strip()
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    state, ppid = stat.rsplit(")", 1)[1].split()[:2]
    return None if state in ("Z", "X") else (comm, int(ppid), state)


def rank_pids(parent: int) -> list[int]:
    """Live processes named dsv4-rank<R> (the launcher names them with PR_SET_NAME) whose parent is `parent`."""
    out = []
    for d in Path("/proc").iterdir():
        if d.name.isdigit():
            info = _proc_info(int(d.name))
            if info and info[0].startswith("dsv4-rank") and info[1] == parent:
                out.append(int(d.name))
    return out


def wait_gone(pids: list[int], seconds: float = 60) -> list[int]:
    end = time.monotonic() + seconds
    while time.monotonic() < end:
        alive = [p for p in pids if _proc_info(p) is not None]
        if not alive:
            return []
        time.sleep(0.2)
    return [p for p in pids if _proc_info(p) is not None]


# ---- the watchdog: a collective that never returns ------------------------------------------------------

def _stuck_body(stop_rank: int) -> None:
    """Both ranks pass one real collective (the watchdog heartbeats from then on); then `stop_rank` freezes
    and the other enters a 'collective' that ignores every timeout, as gloo's all_to_all did."""
    import torch.distributed as dist

    from ascend.ep import collective

    rank, _, _ = init_distributed("cpu", timeout=3.0)
    collective("warm-up barrier", dist.barrier)
    time.sleep(1.5)  # at least one heartbeat of every rank is in the store
    if rank == stop_rank:
        os.kill(os.getpid(), signal.SIGSTOP)
    collective("exchange that ignores the timeout", time.sleep, 10 * SAFETY)


def test_watchdog_ends_a_collective_that_ignores_the_timeout_and_names_the_stopped_rank(capfd):
    me = os.getpid()
    with pytest.raises(RankFailed) as e:
        launch(2, _stuck_body, (1,), timeout=SAFETY)
    msg = str(e.value)
    assert e.value.rank == 0 and e.value.code == 75, msg
    assert "rank 1 is not responding" in msg and "seen by rank 0" in msg, msg
    err = capfd.readouterr().err
    assert "rank 0: error: exchange that ignores the timeout did not finish within the --dist-timeout of 3 s" \
        in err, err
    assert "rank 1 is not responding" in err, err
    assert rank_pids(me) == []


# ---- through the CLI ----------------------------------------------------------------------------------------

def _start(model_dir: Path, fault: str, *extra: str) -> tuple[subprocess.Popen, list[str]]:
    env = dict(os.environ, PYTHONPATH=str(ROOT), DSV4_FAULT_INJECT=fault, OMP_NUM_THREADS="1")
    p = subprocess.Popen([sys.executable, "-m", "tools.cli", "generate", "--model", str(model_dir), "--prompt-ids",
                          "5,6,7;8,9", "--max-new-tokens", "8", "--ignore-eos", "--nproc", "2", *extra],
                         stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)
    lines: list[str] = []
    threading.Thread(target=lambda: lines.extend(iter(p.stderr.readline, "")), daemon=True).start()
    return p, lines


def _wait_for(lines: list[str], needle: str, p: subprocess.Popen) -> None:
    end = time.monotonic() + SAFETY
    while time.monotonic() < end and p.poll() is None:
        if any(needle in ln for ln in lines):
            return
        time.sleep(0.1)
    pytest.fail(f"never saw {needle!r}: {''.join(lines)}")


@pytest.mark.parametrize("comm", ["alltoall", "dispatch_combine"])
def test_stopped_rank_is_named_and_the_run_ends(model_dir, comm):
    p, lines = _start(model_dir, "rank:1,step:2,stop:1", "--dist-timeout", "4", "--moe-comm", comm)
    _wait_for(lines, "stops itself", p)
    ranks = rank_pids(p.pid)
    try:
        p.wait(timeout=SAFETY)
    finally:
        if p.poll() is None:
            p.kill()
    err = "".join(lines)
    assert p.returncode not in (0, None), err
    assert "rank 1 is not responding" in err, err
    assert "dsv4 generate: error: rank 0 exited with code 75" in err, err
    assert "Traceback" not in err, err
    assert wait_gone(ranks) == [], "ranks left behind"


@pytest.mark.parametrize("sig", ["SIGTERM", "SIGHUP", "SIGKILL"])
def test_signal_to_the_launcher_leaves_no_rank_behind(model_dir, sig):
    # rank 1 hangs before decode step 1; rank 0 waits in a collective with a long timeout: both are alive
    p, lines = _start(model_dir, "rank:1,step:1,hang:1", "--dist-timeout", str(SAFETY))
    _wait_for(lines, "hangs before decode step", p)
    ranks = []
    end = time.monotonic() + 30
    while len(ranks) < 2 and time.monotonic() < end:
        ranks = rank_pids(p.pid)
        time.sleep(0.1)
    assert len(ranks) == 2, ranks
    os.kill(p.pid, getattr(signal, sig))
    try:
        p.wait(timeout=SAFETY)
    finally:
        if p.poll() is None:
            p.kill()
        left = wait_gone(ranks)
        for pid in left:  # do not leak them into the rest of the suite
            os.kill(pid, signal.SIGKILL)
    assert p.returncode != 0
    assert left == [], f"{sig}: ranks {left} outlived the launcher"
    if sig != "SIGKILL":
        assert "Traceback" not in "".join(lines), "".join(lines)


def test_launcher_killed_during_start_up_leaves_no_rank_behind(model_dir):
    """SIGKILL while the ranks are still starting (before any collective): they must not wait for the
    rendezvous store's timeout under PID 1."""
    p, lines = _start(model_dir, "", "--dist-timeout", str(SAFETY))
    ranks: list[int] = []
    end = time.monotonic() + SAFETY
    while len(ranks) < 2 and time.monotonic() < end and p.poll() is None:
        ranks = rank_pids(p.pid)
        time.sleep(0.02)
    assert len(ranks) == 2, "".join(lines)
    os.kill(p.pid, signal.SIGKILL)
    p.wait(timeout=SAFETY)
    left = wait_gone(ranks)
    for pid in left:
        os.kill(pid, signal.SIGKILL)
    assert left == [], f"ranks {left} outlived the launcher"
