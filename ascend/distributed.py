"""Multi-rank runtime: attention data parallel + MoE expert parallel over torch.distributed (the `dsv4 generate
--nproc N` command around it is tools/generate_dist.py).

Layout: rank r of W owns prompts r, r+W, r+2W, ... (round robin) with their caches, runs attention, norms
and the shared expert for them, and holds routed experts [r*E/W, (r+1)*E/W) (loaded alone, as `dsv4
convert --ep W` splits them). The MoE token exchange is `ascend.ep.EPBackend` around the compute backend.

Lockstep: `common.generate.generate` with `DataParallelRanks` hooks. MoE layers are collectives, so every rank
runs the same number of forward calls: one prefill, then decode steps while ANY rank still has an active
sequence (decided by an all_reduce of the per-prompt active flags); a rank with nothing left runs zero-token
forwards. Sampling reproduces the single-process run: every rank seeds the same generator and draws, at each
step, the uniforms the single-process run draws for the whole active batch, keeping those of its own
sequences. Greedy output therefore equals the single-process output; with a seed and temperature > 0 each
sequence receives the same random draws as in the single-process run, so it samples the same tokens unless a
draw falls within float rounding of a probability boundary (MoE partial sums are added in a different order
across ranks). This needs the backend's `sample` to draw `rng.random(rows)` once per call, as the NumPy
reference does.

Launch: `--nproc N` spawns N local ranks with multiprocessing's spawn context. The launcher hosts the
TCPStore itself (port 0: no port race) and hands it to the ranks the way torchrun's agent does
(MASTER_ADDR / MASTER_PORT + TORCHELASTIC_USE_AGENT_STORE), so a rank initialises exactly as under
torchrun (`env://`). Spawning rather than re-executing torchrun keeps the launcher in control of its
children: it watches their sentinels, and when one exits non-zero or dies it stops the others and reports
that rank and its exit code. Under an external torchrun (RANK / WORLD_SIZE in the environment) the
command runs as one rank and rank 0 prints the result.

Faults: collectives time out after `--dist-timeout` seconds; a rank whose collective fails prints one
line and exits with EXIT_COLLECTIVE. Test hook (for the fault-handling tests only):
DSV4_FAULT_INJECT="rank:R,step:S[,exit:C][,hang:1][,stop:1]" makes rank R die abruptly before decode step S
(step 0 = before the prefill): SIGKILL by default, os._exit(C) with `exit:C`; `hang:1` makes it stop
answering instead (its Python sleeps, its threads run), `stop:1` makes it SIGSTOP itself (every thread
frozen), so the other ranks run into the collective timeout and their watchdog names it.

This module imports torch only inside functions: the single-process CLI must not need it.
"""

from __future__ import annotations

import os
import signal
import sys
import time
import traceback
from collections.abc import Callable
from typing import Any

from common.generate import Ranks

from .watchdog import EXIT_COLLECTIVE  # noqa: F401  (a rank whose collective failed; re-exported)

FAULT_ENV = "DSV4_FAULT_INJECT"
EXIT_FAILED = 1  # the launcher's exit code when a rank failed
DEFAULT_TIMEOUT = 60.0
STOP_GRACE = 3.0  # seconds the launcher waits after SIGTERM before SIGKILL
LOAD_TIMEOUT = 1800.0  # seconds ranks wait for each other to finish loading weights


class RankFailed(RuntimeError):
    """A rank exited non-zero or was killed; the launcher stopped the others."""

    def __init__(self, rank: int, code: int | None, detail: str = ""):
        self.rank, self.code = rank, code
        if code is None:
            what = "did not finish"
        elif code < 0:
            try:
                what = f"was killed by signal {signal.Signals(-code).name}"
            except ValueError:
                what = f"was killed by signal {-code}"
        else:
            what = f"exited with code {code}"
            if code == EXIT_COLLECTIVE:
                what += " (a collective failed)"
        super().__init__(f"rank {rank} {what}{detail}")


class SetupError(RuntimeError):
    """A rank cannot start: the device runtime or a backend is missing."""


def in_torchrun() -> bool:
    """True when this process was started as one rank by torchrun (or another env:// launcher)."""
    return "RANK" in os.environ and "WORLD_SIZE" in os.environ


# ---- one rank ------------------------------------------------------------------------------------

def init_distributed(device: str = "cpu", timeout: float = DEFAULT_TIMEOUT) -> tuple[int, int, int]:
    """Join the process group from the torchrun environment (RANK, WORLD_SIZE, LOCAL_RANK, MASTER_ADDR,
    MASTER_PORT): gloo on cpu, hccl on npu after binding the rank to its card. -> (rank, world, local_rank)."""
    from datetime import timedelta

    import torch
    import torch.distributed as dist

    rank, world = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])
    local_rank = int(os.environ.get("LOCAL_RANK", rank))
    if device == "npu":
        from .device import require_torch_npu

        require_torch_npu(SetupError).npu.set_device(local_rank)
        backend = "hccl"
    else:
        backend = "gloo"
        # ranks share the node's cores: keep torch's intra-op pool to this rank's share
        local_world = int(os.environ.get("LOCAL_WORLD_SIZE", world))
        torch.set_num_threads(max(1, (os.cpu_count() or 1) // max(local_world, 1)))
    if not dist.is_initialized():
        dist.init_process_group(backend, timeout=timedelta(seconds=timeout))
    from . import watchdog

    watchdog.set_timeout(timeout)  # every collective of this rank, whatever path it blocks in
    return rank, world, local_rank


def shutdown_distributed() -> None:
    """Leave the process group: the collective watchdog stops first (it heartbeats through the group's store)."""
    import torch.distributed as dist

    from . import watchdog

    watchdog.stop()
    if dist.is_initialized():
        dist.destroy_process_group()


def detect_soc(device: str) -> str:
    """The SoC family of this rank's NPU (A2 when it cannot be told, and on a CPU)."""
    if device == "npu":
        from . import soc as soc_table

        try:
            import torch_npu

            found = soc_table.soc_of_chip(torch_npu.npu.get_device_name())
        except Exception:  # the runtime may refuse the query; A2 limits are the strictest
            found = None
        return found or soc_table.A2
    return "A2"


def _parse_fault(text: str | None) -> dict[str, int] | None:
    if not text:
        return None
    try:
        spec = {k.strip(): int(v) for k, v in (part.split(":") for part in text.split(","))}
    except ValueError:
        raise ValueError(f"{FAULT_ENV}={text!r}: expected rank:R,step:S[,exit:C][,hang:1][,stop:1]") from None
    if "rank" not in spec or "step" not in spec or set(spec) - {"rank", "step", "exit", "hang", "stop"}:
        raise ValueError(f"{FAULT_ENV}={text!r}: expected rank:R,step:S[,exit:C][,hang:1][,stop:1]")
    return spec


def _maybe_fault(fault: dict[str, int] | None, rank: int, step: int) -> None:
    if fault and fault["rank"] == rank and fault["step"] == step:
        if fault.get("stop"):  # the whole process freezes (all threads), as under `kill -STOP`
            print(f"{FAULT_ENV}: rank {rank} stops itself (SIGSTOP) before decode step {step}", file=sys.stderr,
                  flush=True)
            os.kill(os.getpid(), signal.SIGSTOP)
            return
        if fault.get("hang"):
            print(f"{FAULT_ENV}: rank {rank} hangs before decode step {step}", file=sys.stderr, flush=True)
            while True:  # until the launcher (or torchrun) kills it
                time.sleep(60)
        print(f"{FAULT_ENV}: rank {rank} dies before decode step {step}", file=sys.stderr, flush=True)
        if "exit" in fault:
            os._exit(fault["exit"])
        os.kill(os.getpid(), signal.SIGKILL)


class DataParallelRanks(Ranks):
    """`common.generate.generate` hooks for one attention data-parallel rank: rank r of W owns prompts r, r+W,
    ... (round robin); the seed, the active-sequence flags and the results cross ranks on `ctrl` (a gloo group
    for control-plane traffic, also on NPU machines). DSV4_FAULT_INJECT faults fire in `before_step`."""

    def __init__(self, rank: int, world: int, ctrl: Any):
        self.rank, self.world, self.ctrl = rank, world, ctrl
        self.fault = _parse_fault(os.environ.get(FAULT_ENV))

    def owned(self, n: int) -> list[int]:
        return [i for i in range(n) if i % self.world == self.rank]

    def agree_seed(self, seed: int | None) -> int:
        import torch
        import torch.distributed as dist

        from .ep import collective

        if seed is not None:
            return seed
        t = torch.tensor([super().agree_seed(None) if self.rank == 0 else 0], dtype=torch.int64)
        collective("seed broadcast", dist.broadcast, t, 0, group=self.ctrl)
        return int(t[0])

    def active_anywhere(self, active: list[int], n: int) -> list[int]:
        import torch
        import torch.distributed as dist

        from .ep import collective

        flags = torch.zeros(n, dtype=torch.int64)
        flags[active] = 1
        collective("active-sequence all_reduce", dist.all_reduce, flags, group=self.ctrl)
        return torch.nonzero(flags).flatten().tolist()

    def before_step(self, step: int) -> None:
        _maybe_fault(self.fault, self.rank, step)

    def gather(self, part: dict[str, Any]) -> list[dict[str, Any]] | None:
        import torch.distributed as dist

        from .ep import collective

        parts: list[Any] = [None] * self.world if self.rank == 0 else None
        collective("result gather", dist.gather_object, part, parts, dst=0, group=self.ctrl)
        return parts if self.rank == 0 else None


# ---- the launcher ----------------------------------------------------------------------------------

class LauncherSignalled(KeyboardInterrupt):
    """SIGTERM / SIGHUP reached the --nproc launcher; its ranks were stopped before this was raised."""

    def __init__(self, signum: int):
        self.signum = signum
        super().__init__(f"{signal.Signals(signum).name}: stopped the ranks")


def _die_with_parent(parent: int, rank: int) -> None:
    """A spawned rank must not outlive the launcher (SIGKILL gives the launcher no chance to stop it): Linux
    delivers SIGKILL to this process when its parent dies (prctl PR_SET_PDEATHSIG); elsewhere a thread checks
    the parent's pid. The process is also named dsv4-rank<R> (PR_SET_NAME) for ps and top."""
    armed = False
    if sys.platform.startswith("linux"):
        try:
            import ctypes

            libc = ctypes.CDLL(None, use_errno=True)
            armed = libc.prctl(1, int(signal.SIGKILL), 0, 0, 0) == 0  # PR_SET_PDEATHSIG
            libc.prctl(15, f"dsv4-rank{rank}".encode()[:15], 0, 0, 0)  # PR_SET_NAME
        except (OSError, AttributeError):
            armed = False
    if os.getppid() != parent:  # the parent died before the death signal was armed
        os._exit(EXIT_FAILED)
    if not armed:
        import threading

        def poll() -> None:
            while os.getppid() == parent:
                time.sleep(1.0)
            os._exit(EXIT_FAILED)

        threading.Thread(target=poll, name="dsv4-parent-watch", daemon=True).start()


def _bootstrap(rank: int, world: int, port: int, fn: Callable, args: tuple, parent: int | None = None) -> None:
    """Entry of a spawned rank: die with the launcher, the torchrun environment, then `fn(*args)`; failures
    become one line and an exit code (os._exit: no atexit / process-group teardown that could block on dead
    peers)."""
    if parent is not None:
        _die_with_parent(parent, rank)
    os.environ.update(RANK=str(rank), WORLD_SIZE=str(world), LOCAL_RANK=str(rank), LOCAL_WORLD_SIZE=str(world),
                      MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), TORCHELASTIC_USE_AGENT_STORE="True")
    code = run_guarded(rank, fn, *args)
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)


def run_guarded(rank: int, fn: Callable, *args: Any) -> int:
    """Run a rank body; -> exit code. Collective failures and user errors print one line; anything else
    (a bug) prints its traceback."""
    from common.config import ConfigError
    from common.errors import EXIT_INPUT, CliError
    from common.safetensors_io import CheckpointError
    from ops import BackendUnavailable

    from .ep import CollectiveError

    def say(msg: str) -> None:
        print(f"dsv4 generate: rank {rank}: error: {msg}", file=sys.stderr, flush=True)

    try:
        fn(*args)
        return 0
    except CollectiveError as e:
        say(f"{e} (another rank failed, or none answered within the --dist-timeout)")
        return EXIT_COLLECTIVE
    except CliError as e:
        say(str(e))
        return e.code
    except (ConfigError, CheckpointError, ValueError, BackendUnavailable, SetupError) as e:
        say(str(e))
        return EXIT_INPUT
    except KeyboardInterrupt:
        return 130
    except Exception:
        say("unexpected failure:")
        traceback.print_exc()
        return EXIT_FAILED


def launch(world: int, fn: Callable, args: tuple = (), timeout: float | None = None,
           log: Callable[[str], None] | None = None) -> None:
    """Run `fn(*args)` on `world` spawned local ranks (torchrun environment set). Returns when all exit 0;
    raises RankFailed naming the first failing rank after stopping the others. `timeout` bounds the
    whole run (None = no bound; the ranks' collective timeout still applies)."""
    import multiprocessing as mp
    from datetime import timedelta

    import torch.distributed as dist

    # the launcher hosts the rendezvous store, as torchrun's agent does; port 0 = any free port
    store = dist.TCPStore("127.0.0.1", 0, world, True, timedelta(seconds=timeout or DEFAULT_TIMEOUT),
                          wait_for_workers=False)
    ctx = mp.get_context("spawn")
    old = os.environ.get("OMP_NUM_THREADS")
    share = max(1, (os.cpu_count() or 1) // world)
    procs: list = []
    failed: list[tuple[int, int | None]] = []
    old_handlers = _forward_termination()
    try:
        os.environ["OMP_NUM_THREADS"] = str(min(int(old), share) if old and old.isdigit() else share)
        try:
            for r in range(world):
                p = ctx.Process(target=_bootstrap, args=(r, world, store.port, fn, args, os.getpid()),
                                name=f"dsv4-rank{r}")
                p.start()
                procs.append(p)
        finally:
            if old is None:
                os.environ.pop("OMP_NUM_THREADS", None)
            else:
                os.environ["OMP_NUM_THREADS"] = old
        _watch_ranks(procs, failed, timeout)
    finally:
        stopped = _stop(procs)
        _restore_handlers(old_handlers)
        stuck = _stuck_verdict(store)
        del store
    if failed:
        primary = next((f for f in failed if f[1] != EXIT_COLLECTIVE), failed[0])
        others = [r for r, _ in failed if r != primary[0]]
        detail = f"; stopped rank{'s' if len(stopped) > 1 else ''} {', '.join(map(str, stopped))}" if stopped else ""
        if others:
            detail = f" (then rank{'s' if len(others) > 1 else ''} {', '.join(map(str, others))} failed)" + detail
        if stuck:
            detail += f"; {stuck}"
        raise RankFailed(primary[0], primary[1], detail)


def _watch_ranks(procs: list, failed: list[tuple[int, int | None]], timeout: float | None) -> None:
    """Wait for the ranks; on the first failure collect, briefly, the ones that fail right after it."""
    import multiprocessing.connection as mpc

    deadline = None if timeout is None else time.monotonic() + timeout
    pending = {p.sentinel: r for r, p in enumerate(procs)}
    while pending and not failed:
        wait = None if deadline is None else max(0.0, deadline - time.monotonic())
        ready = mpc.wait(list(pending), timeout=wait)
        if not ready:
            failed.append((min(pending.values()), None))
            return
        for s in ready:
            r = pending.pop(s)
            procs[r].join()
            if procs[r].exitcode != 0:
                failed.append((r, procs[r].exitcode))
    # the others usually fail within moments (a peer vanished from their collectives); collect them briefly
    # so the report names the rank that failed first, not one that saw the failure
    end = time.monotonic() + 1.0
    while failed and pending and time.monotonic() < end:
        for s in mpc.wait(list(pending), timeout=max(0.0, end - time.monotonic())):
            r = pending.pop(s)
            procs[r].join()
            if procs[r].exitcode != 0:
                failed.append((r, procs[r].exitcode))


def _forward_termination() -> dict[int, Any]:
    """SIGTERM / SIGHUP to the launcher raise LauncherSignalled in its main thread, so the `finally` that
    stops the ranks runs (the default action would end the launcher and orphan them)."""
    import threading

    if threading.current_thread() is not threading.main_thread():
        return {}

    def handler(signum: int, frame: Any) -> None:
        raise LauncherSignalled(signum)

    old = {}
    for sig in (signal.SIGTERM, getattr(signal, "SIGHUP", None)):
        if sig is not None:
            old[sig] = signal.signal(sig, handler)
    return old


def _restore_handlers(old: dict[int, Any]) -> None:
    for sig, h in old.items():
        signal.signal(sig, h)


def _stuck_verdict(store: Any) -> str:
    """What a rank's collective watchdog recorded about a stuck peer ('' if nothing)."""
    from .watchdog import STUCK_KEY

    try:
        if store.check([STUCK_KEY]):
            who, verdict = store.get(STUCK_KEY).decode().split("|", 1)
            return f"{verdict} (seen by rank {who})"
    except Exception:  # the store's own failure must not hide the rank's
        pass
    return ""


def _stop(procs: list) -> list[int]:
    """SIGTERM every live rank, SIGKILL what is still alive after STOP_GRACE seconds; -> the ranks stopped."""
    live = [p for p in procs if p.is_alive()]
    for p in live:
        p.terminate()
    end = time.monotonic() + STOP_GRACE
    for p in live:
        p.join(max(0.0, end - time.monotonic()))
    for p in live:
        if p.is_alive():
            p.kill()
            p.join(5.0)
    return [procs.index(p) for p in live]
