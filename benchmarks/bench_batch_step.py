"""What batching buys the serving engine on this machine: decode step time at batch 1..N, beside the limits.

    PYTHONPATH=. OMP_NUM_THREADS=2 python benchmarks/bench_batch_step.py --model bench-small --batch 1,4,16,64

For each batch size B, B sequences are prefilled with prompts of 8..64 tokens and then decode one token each per
step, exactly as `dsv4 serve`'s engine packs them (one Model.forward over B caches). Printed per B:
  - ms per step and tokens/s, and the ratio to batch 1 (the most continuous batching can give the server);
  - weight bytes the step read (each distinct weight tensor a linear touched, counted once: at B=1 a token reads 6 of
    32 experts per layer, at B=16 nearly all of them) and the GB/s that implies;
  - the floor of the step: max(weight bytes / measured bandwidth, FLOPs / measured matrix-product rate).
Bandwidth and the matrix-product rate are measured in this process (a 256 MB streamed read through a matrix-vector
product, and a 1024^3 float32 product), so the floor is this machine's, not a datasheet's.

`--matmul` also prints the small-row matrix product choice of ops/numpy_ref._x_wt (one matrix-vector product per row
up to _GEMV_ROWS rows, column blocks of a large weight up to 16 rows) against one BLAS matrix product, over weights
too many to stay in cache, and over the 128 MiB head of bench-small.
Figures depend on the machine and its load; nothing here is asserted in tests.
"""

from __future__ import annotations

import argparse
import time

import numpy as np


def measure_machine() -> tuple[float, float]:
    """-> (GB/s of a streamed matrix-vector product over 256 MB, GFLOP/s of a 1024^3 float32 product), each the
    best of several tries: the machine's capacity, not what other jobs left of it at one moment."""
    rng = np.random.default_rng(0)
    w = rng.standard_normal((65536, 1024), dtype=np.float32)
    x = rng.standard_normal(1024, dtype=np.float32)
    a = rng.standard_normal((1024, 1024), dtype=np.float32)

    def best(f, n: int) -> float:
        f()
        ts = []
        for _ in range(n):
            t = time.perf_counter()
            f()
            ts.append(time.perf_counter() - t)
        return min(ts)

    return w.nbytes / best(lambda: w @ x, 8) / 1e9, 2 * 1024**3 / best(lambda: a @ a, 20) / 1e9


class Counter:
    """Wraps a backend's linear entry points: distinct weights read and FLOPs of the current step."""

    def __init__(self, B) -> None:
        self.seen: dict[int, int] = {}
        self.flops = 0
        lin, grouped = B.linear, B.grouped_linear

        def linear(x, w):
            self._count(w, 2 * int(np.prod(x.shape[:-1])) * int(np.prod(w.shape)))
            return lin(x, w)

        def grouped_linear(x, w):
            self._count(w, 2 * int(x.shape[0]) * int(np.prod(w.shape)))
            return grouped(x, w)

        B.linear, B.grouped_linear = linear, grouped_linear  # moe_experts calls self.linear: counted too

    def _count(self, w, flops: int) -> None:
        self.seen[id(w)] = int(getattr(w, "nbytes", 0))
        self.flops += flops

    def reset(self) -> None:
        self.seen.clear()
        self.flops = 0


def decode_step(model, prompts: list[list[int]], steps: int, counter: Counter | None = None) -> dict:
    """Prefill `prompts` (one sequence each), then time decode steps of one token per sequence, packed in one
    forward call as the serving engine does: {"ms": median ms per step, "bytes", "flops": of one step (with a
    counter)}. bench_serve.py times its workload's steps with it too."""
    caches = [model.new_cache() for _ in prompts]
    out = model.forward(caches, prompts)
    toks = [[int(np.argmax(model.B.to_numpy(lg)[-1]))] for lg in out.logits]
    model.forward(caches, toks)  # warm: first decode step allocates blocks
    figures = {}
    if counter is not None:  # one step's reads and FLOPs, before the timed steps add theirs
        counter.reset()
        model.forward(caches, toks)
        figures.update(bytes=sum(counter.seen.values()), flops=counter.flops)
    times = []
    for _ in range(steps):
        t = time.perf_counter()
        model.forward(caches, toks)
        times.append(time.perf_counter() - t)
    figures["ms"] = 1e3 * float(np.median(times))
    return figures


def step_figures(model, counter: Counter, B: int, steps: int, rng) -> dict:
    prompts = [[0] + rng.integers(2, min(model.cfg.vocab_size, 30000), int(n) - 1).tolist()
               for n in np.linspace(8, 64, B).astype(int)]
    return decode_step(model, prompts, steps, counter)


def matmul_table(bw: float) -> None:
    from ops.numpy_ref import _GEMV_ROWS, _x_wt

    rng = np.random.default_rng(1)
    for n, k in ((512, 1024), (1024, 512), (32768, 1024)):
        ws = [rng.standard_normal((n, k), dtype=np.float32) for _ in range(max(2, 160_000_000 // (n * k * 4)))]
        print(f"\nweight [{n}, {k}] ({n * k * 4 / 2**20:.0f} MiB each, {len(ws)} of them, read from memory)")
        print(f"  {'rows':>4s} {'_x_wt ms':>9s} {'x @ w.T ms':>11s}  (floor: one read at {bw:.0f} GB/s = "
              f"{n * k * 4 / bw / 1e6:.3f} ms)")
        for m in (1, 2, 3, 4, 6, 8, 16, 32):
            x = rng.standard_normal((m, k), dtype=np.float32)
            row = []
            for f in (lambda w, x=x: _x_wt(x, w), lambda w, x=x: x @ w.T):
                for w in ws:
                    f(w)
                t = time.perf_counter()
                for _ in range(3):
                    for w in ws:
                        f(w)
                row.append((time.perf_counter() - t) / 3 / len(ws) * 1e3)
            large = n * k * 4 > 16 << 20
            note = "per-row" if 2 <= m <= _GEMV_ROWS else "column blocks" if 2 <= m <= 16 and large else ""
            print(f"  {m:4d} {row[0]:9.3f} {row[1]:11.3f}  {note}")


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--model", default="bench-small")
    ap.add_argument("--backend", default="numpy")
    ap.add_argument("--batch", default="1,4,16,64", help="comma-separated batch sizes")
    ap.add_argument("--steps", type=int, default=8, help="timed decode steps per batch size (median printed)")
    ap.add_argument("--matmul", action="store_true", help="also print the small-row matrix product table")
    args = ap.parse_args()
    from ascend.backends import get_backend
    from common.loading import load_model
    from common.model import Model

    bw, gflops = measure_machine()
    print(f"machine: streamed read {bw:.1f} GB/s, float32 matrix product {gflops:.0f} GFLOP/s", flush=True)
    lm = load_model(args.model, lambda m: None)
    backend = get_backend(args.backend)
    counter = Counter(backend)
    model = Model(lm.cfg, lm.weights, backend)
    rng = np.random.default_rng(0)
    base = None
    print(f"{'batch':>5s} {'ms/step':>8s} {'tok/s':>8s} {'vs B=1':>7s} {'MB read':>8s} {'GB/s':>6s} "
          f"{'GFLOP':>6s} {'floor ms':>8s} {'of floor':>8s}")
    for B in (int(b) for b in args.batch.split(",")):
        f = step_figures(model, counter, B, args.steps, rng)
        tok_s = B / f["ms"] * 1e3
        base = base or tok_s
        floor = max(f["bytes"] / bw / 1e6, f["flops"] / gflops / 1e6)
        print(f"{B:5d} {f['ms']:8.1f} {tok_s:8.1f} {tok_s / base:6.2f}x {f['bytes'] / 1e6:8.0f} "
              f"{f['bytes'] / f['ms'] / 1e6:6.1f} {f['flops'] / 1e9:6.2f} {floor:8.1f} {floor / f['ms']:7.0%}",
              flush=True)
    if args.matmul:
        matmul_table(bw)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
