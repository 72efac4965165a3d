"""Serving load test: concurrent streaming clients against `dsv4 serve`, beside one-request-at-a-time serving.

1. References: `dsv4 generate` (greedy, --ignore-eos) on every distinct prompt, one batched call.
2. A `dsv4 serve` subprocess on 127.0.0.1 (random free port).
3. One request at a time over the prompts -> sequential tokens/s.
4. For each concurrency C (default 16 and 64): C streaming `openai` clients, each sending requests back to back
   for --duration seconds (requests in flight at the deadline finish). Every request must complete without error
   and its greedy tokens must equal the reference for its prompt. Aggregate tokens/s is printed beside the
   sequential figure.

Example: python benchmarks/bench_serve.py --model bench-small --duration 30
Figures depend on the machine and its load; nothing here is asserted in tests.
"""

from __future__ import annotations

import argparse
import json
import os
import queue
import re
import signal
import statistics
import subprocess
import sys
import threading
import time


def references(model: str, prompts: list[list[int]], max_tokens: int) -> list[list[int]]:
    ids = ";".join(",".join(map(str, p)) for p in prompts)
    out = subprocess.run([sys.executable, "-m", "tools.cli", "generate", "--model", model, "--prompt-ids", ids,
                          "--max-new-tokens", str(max_tokens), "--ignore-eos", "--json"],
                         capture_output=True, text=True, timeout=3600)
    if out.returncode:
        sys.exit(f"dsv4 generate failed:\n{out.stderr}")
    got = json.loads(out.stdout)["output_ids"]
    return got if len(prompts) > 1 else [got]


def start_server(model: str, max_num_seqs: int, max_len: int, extra: list[str]) -> tuple[subprocess.Popen, int]:
    cmd = [sys.executable, "-m", "tools.cli", "serve", "--model", model, "--port", "0", "--max-num-seqs",
           str(max_num_seqs), "--max-model-len", str(max_len), "--served-model-name", "bench", *extra]
    proc = subprocess.Popen(cmd, stderr=subprocess.PIPE, stdout=subprocess.DEVNULL, text=True)
    lines: queue.Queue = queue.Queue()
    threading.Thread(target=lambda: [lines.put(ln) for ln in proc.stderr], daemon=True).start()
    deadline = time.monotonic() + 600
    while time.monotonic() < deadline and proc.poll() is None:
        try:
            line = lines.get(timeout=1.0)
        except queue.Empty:
            continue
        m = re.search(r"on http://127\.0\.0\.1:(\d+)", line)
        if m:
            return proc, int(m.group(1))
    proc.kill()
    sys.exit("the server did not start")


def one_request(client, prompt: list[int], max_tokens: int) -> tuple[list[int], float, float]:
    """-> (tokens, seconds to first token, total seconds) of one streamed greedy completion. The clients read the
    server-sent events with plain httpx + json (the openai client's per-chunk validation would cost the 2-core
    machine more CPU than the server's work)."""
    t0 = time.perf_counter()
    first, toks, done = None, [], False
    body = {"model": "bench", "prompt": prompt, "max_tokens": max_tokens, "temperature": 0, "stream": True,
            "ignore_eos": True}
    with client.stream("POST", "/v1/completions", json=body) as r:
        if r.status_code != 200:
            raise RuntimeError(f"HTTP {r.status_code}: {r.read()[:200]!r}")
        for line in r.iter_lines():
            if not line.startswith("data: "):
                continue
            if line == "data: [DONE]":
                done = True
                break
            ch = json.loads(line[6:])
            if "error" in ch:
                raise RuntimeError(ch["error"]["message"])
            for c in ch.get("choices", []):
                if c.get("token_ids") and first is None:
                    first = time.perf_counter() - t0
                toks += c.get("token_ids") or []
    if not done:
        raise RuntimeError("the stream ended without [DONE]")
    return toks, first or 0.0, time.perf_counter() - t0


def http_client(port: int):
    import httpx

    return httpx.Client(base_url=f"http://127.0.0.1:{port}", timeout=600.0)


def counter(port: int, name: str) -> float:
    """A counter's value from the server's /metrics."""
    for line in http_client(port).get("/metrics").text.splitlines():
        if line.startswith(name + " "):
            return float(line.split()[1])
    raise RuntimeError(f"{name} missing from /metrics")


def run_sequential(port: int, prompts, refs, max_tokens: int, n: int) -> tuple[float, int]:
    """-> (tokens/s, requests that differ from the reference) of n requests one at a time."""
    client = http_client(port)
    t0, n_tok, bad = time.perf_counter(), 0, 0
    for i in range(n):
        toks, _, _ = one_request(client, prompts[i % len(prompts)], max_tokens)
        n_tok += len(toks)
        bad += toks != refs[i % len(prompts)]
    return n_tok / (time.perf_counter() - t0), bad


def run_concurrent(port: int, prompts, refs, max_tokens: int, clients: int, duration: float) -> dict:
    errors: list[str] = []
    done: list[tuple[int, float, float]] = []
    lock = threading.Lock()
    stop_at = time.monotonic() + duration

    def worker(k: int) -> None:
        client = http_client(port)
        i = k
        while time.monotonic() < stop_at:
            p = i % len(prompts)
            try:
                toks, ttft, total = one_request(client, prompts[p], max_tokens)
            except Exception as e:  # any failure is a finding of the load test
                with lock:
                    errors.append(f"client {k}: {type(e).__name__}: {e}")
                return
            with lock:
                if toks != refs[p]:
                    errors.append(f"client {k}, prompt {p}: tokens differ from dsv4 generate")
                done.append((len(toks), ttft, total))
            i += clients

    t0 = time.perf_counter()
    threads = [threading.Thread(target=worker, args=(k,)) for k in range(clients)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    wall = time.perf_counter() - t0
    toks = sum(d[0] for d in done)
    return {"clients": clients, "requests": len(done), "tokens": toks, "seconds": wall, "tok_s": toks / wall,
            "ttft_p50": statistics.median(d[1] for d in done) if done else 0.0, "errors": errors}


def ceiling(model: str, prompts: list[list[int]], max_tokens: int, conc: list[int],
            batched_tokens: int = 512) -> dict[int, float]:
    """What continuous batching can give this workload on this machine, estimated in this process on the NumPy
    reference after the server is gone: one at a time a request costs prefill(prompt) + max_tokens decode steps
    at batch 1; with C clients, its share of the C prompts prefilled packed as the engine packs them (whole
    prompts per forward call up to --max-batched-tokens tokens) + max_tokens shares of a batch-C decode step.
    The server can beat it slightly: it also packs prompt chunks beside decode rows, where they share the expert
    weight reads. -> {C: estimated ratio}."""
    from bench_batch_step import decode_step  # this directory (run as a script)

    from ascend.backends import get_backend
    from common.loading import load_model
    from common.model import Model

    lm = load_model(model, lambda m: None)
    m = Model(lm.cfg, lm.weights, get_backend("numpy"))

    def prefill(ps: list[list[int]]) -> float:
        m.forward([m.new_cache() for _ in ps], ps)  # warm
        t = time.perf_counter()
        m.forward([m.new_cache() for _ in ps], ps)
        return time.perf_counter() - t

    def packed_prefill(c: int) -> float:
        """Seconds per request of prefilling c requests' prompts in the engine's packed forward calls."""
        groups: list[list[list[int]]] = [[]]
        for i in range(c):
            p = prompts[i % len(prompts)]
            if groups[-1] and sum(map(len, groups[-1])) + len(p) > batched_tokens:
                groups.append([])
            groups[-1].append(p)
        return sum(prefill(g) for g in groups) / c

    def step(b: int) -> float:
        return decode_step(m, [prompts[i % len(prompts)] for i in range(b)], 5)["ms"] / 1e3

    pre1, step1 = statistics.mean(prefill([p]) for p in prompts), step(1)
    one = pre1 + max_tokens * step1
    print(f"  one at a time: prefill {1e3 * pre1:.1f} ms (mean over the prompts) + {max_tokens} steps of "
          f"{1e3 * step1:.1f} ms")
    out = {}
    for c in conc:
        pre_c, step_c = packed_prefill(c), step(c)
        print(f"  {c:3d} clients: packed prefill {1e3 * pre_c:.1f} ms per request + {max_tokens} shares of a "
              f"{1e3 * step_c:.1f} ms batch-{c} step")
        out[c] = one / (pre_c + max_tokens * step_c / c)
    return out


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--model", default="bench-small")
    ap.add_argument("--concurrency", default="16,64", help="comma-separated client counts")
    ap.add_argument("--duration", type=float, default=30.0, help="seconds each concurrent phase sends requests")
    ap.add_argument("--prompts", type=int, default=16, help="distinct prompts (lengths 8..64 tokens)")
    ap.add_argument("--max-tokens", type=int, default=16)
    ap.add_argument("--sequential", type=int, default=4, help="requests in the one-at-a-time phase")
    ap.add_argument("--server-arg", action="append", default=[], help="extra `dsv4 serve` argument (repeatable)")
    ap.add_argument("--no-ceiling", action="store_true",
                    help="skip measuring the batching ceiling of this workload (see ceiling())")
    args = ap.parse_args()
    import numpy as np

    from common.config import load_preset
    from common.loading import is_preset

    vocab = load_preset(args.model)[0].vocab_size if is_preset(args.model) else 1000
    rng = np.random.default_rng(0)
    prompts = [[0] + rng.integers(2, min(vocab, 30000), int(n) - 1).tolist()
               for n in np.linspace(8, 64, args.prompts).astype(int)]
    conc = [int(c) for c in args.concurrency.split(",")]
    t = time.perf_counter()
    refs = references(args.model, prompts, args.max_tokens)
    print(f"references from dsv4 generate: {len(prompts)} prompts in {time.perf_counter() - t:.1f}s", flush=True)

    proc, port = start_server(args.model, max(conc), 64 + args.max_tokens + 8, args.server_arg)
    results: list[tuple[int, float]] = []
    failed = False
    try:
        one_request(http_client(port), prompts[0], 2)  # warm-up
        # the machine's load drifts: each concurrent phase is set beside a one-at-a-time phase run just before it
        for c in conc:
            seq, bad = run_sequential(port, prompts, refs, args.max_tokens, args.sequential)
            print(f"one request at a time: {args.sequential} requests, {seq:.2f} tok/s"
                  f"{'' if not bad else f', {bad} differ from dsv4 generate'}", flush=True)
            pre = counter(port, "dsv4_requests_preempted_total")
            r = run_concurrent(port, prompts, refs, args.max_tokens, c, args.duration)
            pre = counter(port, "dsv4_requests_preempted_total") - pre
            print(f"{c:3d} concurrent streaming clients: {r['requests']} requests, {r['tokens']} tokens in "
                  f"{r['seconds']:.1f}s = {r['tok_s']:.2f} tok/s ({r['tok_s'] / seq:.2f}x one-at-a-time), "
                  f"TTFT p50 {r['ttft_p50']:.2f}s, errors {len(r['errors'])}, preemptions {pre:.0f}", flush=True)
            for e in r["errors"][:5]:
                print(f"  {e}")
            failed |= bool(r["errors"]) or r["requests"] == 0 or bad > 0
            results.append((c, r["tok_s"] / seq))
        print(f"load average {os.getloadavg()[0]:.1f} on {os.cpu_count()} CPUs")
    finally:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(60)
        except subprocess.TimeoutExpired:
            proc.kill()
    if not args.no_ceiling and "--backend" not in args.server_arg:
        print("what batching can give this workload (NumPy reference, prefill + decode steps timed here after the "
              "server stopped):")
        sa = args.server_arg
        chunk = int(sa[sa.index("--max-batched-tokens") + 1]) if "--max-batched-tokens" in sa[:-1] else 512
        for c, cap in ceiling(args.model, prompts, args.max_tokens, conc, chunk).items():
            got = dict(results).get(c)
            print(f"  {c:3d} clients: about {cap:.2f}x one-at-a-time"
                  + (f"; served {got:.2f}x = {got / cap:.0%} of it" if got else ""), flush=True)
    print("all requests completed, greedy tokens identical to dsv4 generate" if not failed else "FAILED")
    return 1 if failed else 0


if __name__ == "__main__":
    os.environ.setdefault("OMP_NUM_THREADS", "2")
    sys.exit(main())
