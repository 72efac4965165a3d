"""Multi-rank `dsv4 serve`: the torchrun deployment rendered by `dsv4 deploy` (2 CPU ranks over gloo) answers the
openai client and stops cleanly; a rank that dies or hangs makes /health fail and the server exit non-zero."""

from __future__ import annotations

import contextlib
import json
import os
import re
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import httpx
import openai
import pytest

pytest.importorskip("torch")

from tools.cli import main as dsv4_main  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent
MODEL = "tiny-chat"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def env() -> dict:
    return dict(os.environ, PYTHON=sys.executable, PYTHONPATH=str(ROOT), OMP_NUM_THREADS="1")


class Output:
    """Collects a process's merged output on a thread; `wait_for` polls it with a deadline."""

    def __init__(self, proc: subprocess.Popen):
        self.text = ""
        self.proc = proc
        threading.Thread(target=self._read, daemon=True).start()

    def _read(self) -> None:
        for line in self.proc.stdout:
            self.text += line

    def wait_for(self, pattern: str, timeout: float) -> re.Match:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            m = re.search(pattern, self.text)
            if m:
                return m
            if self.proc.poll() is not None:
                time.sleep(0.5)
                break
            time.sleep(0.2)
        raise AssertionError(f"no {pattern!r} within {timeout}s; output:\n{self.text}")


def kill_group(proc: subprocess.Popen) -> None:
    if proc.poll() is None:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGKILL)
        proc.wait(10)


def assert_blocks_in_use_on_both_ranks(client: openai.OpenAI, port: int) -> None:
    """Two long streams at once land on both ranks (the less loaded one takes the second); while they run,
    /metrics shows cache blocks in use on rank 1 too (reported with each step's token gather)."""
    streams = [client.completions.create(model=MODEL, prompt=[0, 19923, 400], max_tokens=240, temperature=0,
                                         stream=True) for _ in range(2)]
    seen: dict[str, int] = {}
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline and not (seen.get("0") and seen.get("1")):
        text = httpx.get(f"http://127.0.0.1:{port}/metrics", timeout=30).text
        for rank, n in re.findall(r'dsv4_cache_blocks_in_use\{kind="[a-z0-9_]+",rank="(\d)"\} (\d+)', text):
            seen[rank] = max(seen.get(rank, 0), int(n))
    tokens = [sum(len(c.choices[0].token_ids) for c in st if c.choices) for st in streams]
    assert seen.get("0") and seen.get("1"), seen
    assert tokens == [240, 240]


def test_deploy_torchrun_serves_on_two_ranks_and_stops_cleanly(tmp_path, capsys):
    out, port = tmp_path / "deploy", free_port()
    assert dsv4_main(["deploy", "--model", MODEL, "--cluster", str(ROOT / "configs/clusters/cpu-loopback-2.yaml"),
                      "--out", str(out), "--master-port", str(free_port()), "--serve-host", "127.0.0.1",
                      "--serve-port", str(port)]) == 0
    script = (out / "launch_node0.sh").read_text()
    assert "-m tools.cli serve --model" in script and "/health" in script
    proc = subprocess.Popen(["bash", str(out / "launch_node0.sh"), "--max-model-len", "256"], env=env(),
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, cwd=str(tmp_path),
                            start_new_session=True)
    log = Output(proc)
    try:
        log.wait_for(r"dsv4 serve: healthy at http://127\.0\.0\.1:\d+ \(2 ranks\)", 300)
        client = openai.OpenAI(base_url=f"http://127.0.0.1:{port}/v1", api_key="x", timeout=120, max_retries=0)
        r = client.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": "Hello"}],
                                           max_tokens=5, temperature=0)
        streamed = [t for c in client.completions.create(model=MODEL, prompt=[0, 19923, 400], max_tokens=4,
                                                         temperature=0, stream=True)
                    if c.choices for t in c.choices[0].token_ids]
        capsys.readouterr()
        assert dsv4_main(["generate", "--model", MODEL, "--prompt", "Hello", "--chat", "--max-new-tokens", "5",
                          "--json"]) == 0
        assert r.choices[0].token_ids == json.loads(capsys.readouterr().out)["output_ids"]
        assert dsv4_main(["generate", "--model", MODEL, "--prompt-ids", "0,19923,400", "--max-new-tokens", "4",
                          "--json"]) == 0
        assert streamed == json.loads(capsys.readouterr().out)["output_ids"]
        assert_blocks_in_use_on_both_ranks(client, port)
        proc.send_signal(signal.SIGTERM)  # to the script: it stops the ranks and waits for torchrun
        assert proc.wait(90) == 0, log.text
        assert "dsv4 serve: stopped" in log.text
    finally:
        kill_group(proc)
    with pytest.raises(httpx.HTTPError):
        httpx.get(f"http://127.0.0.1:{port}/health", timeout=2)


@pytest.mark.parametrize("fault", ["hang:1", "exit:9"])
def test_failed_rank_fails_health_and_exits_nonzero(fault):
    e = env()
    e["DSV4_FAULT_INJECT"] = f"rank:1,step:3,{fault}"
    proc = subprocess.Popen([sys.executable, "-m", "tools.cli", "serve", "--model", MODEL, "--nproc", "2", "--port",
                             "0", "--max-model-len", "128", "--dist-timeout", "5"], env=e, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True, start_new_session=True)
    log = Output(proc)
    try:
        port = int(log.wait_for(r"on http://127\.0\.0\.1:(\d+)", 300).group(1))
        # the idle engine steps every second: rank 1 fails at its third plan, rank 0 notices within the timeout
        deadline, health_ok = time.monotonic() + 120, None
        while time.monotonic() < deadline and proc.poll() is None:
            try:
                health_ok = httpx.get(f"http://127.0.0.1:{port}/health", timeout=2).status_code == 200
            except httpx.HTTPError:
                health_ok = False
            if not health_ok:
                break
            time.sleep(0.2)
        assert health_ok is False or proc.poll() is not None
        code = proc.wait(120)
        assert code != 0, log.text
        assert "rank 1" in log.text
    finally:
        kill_group(proc)


@pytest.mark.parametrize("extra", [["--serve-host", "127.0.0.1; touch /tmp/x"], ["--serve-host=-x"],
                                   ["--serve-port", "70000"], ["--launcher", "msrun", "--job", "serve"]])
def test_deploy_refuses_bad_serve_values(tmp_path, extra):
    out = tmp_path / "o"
    assert dsv4_main(["deploy", "--model", MODEL, "--cluster", str(ROOT / "configs/clusters/cpu-loopback-2.yaml"),
                      "--out", str(out), *extra]) == 2
    assert not out.exists()  # nothing half-written
