"""Paged caches: bytes per token per kind at long context, and decode step time against context length.

    PYTHONPATH=. python benchmarks/bench_paged_cache.py bytes      # v4-flash / v4-pro at 128K and 1M, beside plan
    PYTHONPATH=. python benchmarks/bench_paged_cache.py decode     # bench-small, CPU reference, 1K vs 32K context

`bytes` prints, per cache kind, what one sequence holds (whole 128-row blocks, common.paged_cache.sequence_bytes)
and per token of context, for the deployment formats (bf16: A2/A3 with int8 indexer keys; fp8: vLLM / 950), and
`dsv4 plan`'s figure for the same sequence (tools.plan_cmd.kv_per_sequence) with whether they agree.

`decode` times one decode step of the NumPy reference on bench-small with a sequence whose caches hold 1K and
32K tokens. The caches are allocated and their sliding parts trimmed exactly as a prefill leaves them; their
contents are zeros (a decode step's work depends on the cache sizes, not on the values), which avoids a 32K-token
CPU prefill. Target (issue 10): the 32K step within 1.3x of the 1K step. Printed, never asserted.
"""

from __future__ import annotations

import argparse
import statistics
import time

import numpy as np


def bytes_table(models: list[str], contexts: list[int]) -> None:
    from common.config import load_preset
    from common.paged_cache import cache_format, family, sequence_bytes
    from tools.plan_cmd import kv_per_sequence

    for model in models:
        cfg, _ = load_preset(model)
        for fmt_name in ("bf16", "fp8"):
            fmt = cache_format(cfg, fmt_name)
            print(f"\n{model} ({fmt_name}: {fmt.note})")
            print(f"  {'kind':10s} " + "".join(f"{f'{c // 1024}K B/seq':>16s}{'B/token':>10s}" for c in contexts))
            per = {c: sequence_bytes(cfg, fmt, c) for c in contexts}
            for kind in per[contexts[0]]:
                row = "".join(f"{per[c][kind]['bytes']:16,d}{per[c][kind]['bytes'] / c:10.1f}" for c in contexts)
                print(f"  {kind:10s} {row}")
            totals = {c: sum(v["bytes"] for v in per[c].values()) for c in contexts}
            print(f"  {'total':10s} " + "".join(f"{totals[c]:16,d}{totals[c] / c:10.1f}" for c in contexts))
            for c in contexts:
                plan = kv_per_sequence(cfg, fmt, c, with_mtp=False)
                fams: dict[str, int] = {}
                for kind, v in per[c].items():
                    fams[family(kind)] = fams.get(family(kind), 0) + v["bytes"]
                agree = plan["total"] == totals[c]
                print(f"  dsv4 plan at {c // 1024}K: {plan['total']:,d} B per sequence "
                      f"({plan['total'] / 2**30:.3f} GiB) -> {'agrees' if agree else 'DIFFERS'}; by family "
                      + ", ".join(f"{k} {v / 2**20:.1f} MiB" for k, v in fams.items()))


WARMUP = 20  # steps before timing: pool growth (doubling) and block crossings settle


def _fill(model, seq, n: int) -> None:
    """Give `seq` the blocks an n-token prefill leaves it (sliding kinds trimmed), contents zero."""
    from common.paged_cache import MAIN

    model.caches.allocate(seq, MAIN, n)
    seq.pos = n
    model.caches.trim(seq, MAIN)


def decode_times(contexts: list[int], steps: int, block_size: int) -> None:
    from ascend.backends import get_backend
    from common.loading import load_model
    from common.model import Model

    lm = load_model("bench-small", log=lambda m: None)
    cfg, weights = lm.cfg, lm.weights
    model = Model(cfg, weights, get_backend("cpu"), block_size=block_size)
    rng = np.random.default_rng(0)
    med = {}
    for n in contexts:
        seq = model.new_cache()
        _fill(model, seq, n)
        ts = []
        for s in range(steps + WARMUP):
            tok = [[int(rng.integers(2, cfg.vocab_size))]]
            t0 = time.perf_counter()
            model.forward([seq], tok)
            if s >= WARMUP:
                ts.append(time.perf_counter() - t0)
        med[n] = statistics.median(ts)
        used = sum(model.caches.bytes_in_use().values())
        print(f"bench-small decode at {n:6d} tokens: median {med[n] * 1e3:7.1f} ms over {steps} steps "
              f"(min {min(ts) * 1e3:.1f}, max {max(ts) * 1e3:.1f}); caches in use {used / 2**20:.1f} MiB")
        model.caches.release(seq)
    lo, hi = min(contexts), max(contexts)
    print(f"ratio {hi // 1024}K / {lo // 1024}K: {med[hi] / med[lo]:.2f}x (target <= 1.3x)")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("what", choices=("bytes", "decode", "all"))
    ap.add_argument("--steps", type=int, default=7)
    ap.add_argument("--block-size", type=int, default=128)
    a = ap.parse_args()
    if a.what in ("bytes", "all"):
        bytes_table(["v4-flash", "v4-pro"], [128 * 1024, 1024 * 1024])
    if a.what in ("decode", "all"):
        decode_times([1024, 32 * 1024], a.steps, a.block_size)


if __name__ == "__main__":
    main()
