"""MindSpore backend on MindSpore's CPU runtime: prefill and decode throughput, jit on and off, next to the
NumPy reference (`--backend cpu`) in the same process, on the same prompt and weights.

Rounds are interleaved (numpy, mindspore+jit, mindspore eager, numpy, ...) so background load hits every
backend alike; the best and the median round are printed. Figures only, no assertions.

    python benchmarks/bench_mindspore.py                                   # tiny and bench-small
    python benchmarks/bench_mindspore.py --presets tiny --prompt-len 32 --new-tokens 8 --rounds 2
    python benchmarks/bench_mindspore.py --threads 2                       # MindSpore CPU kernel threads
"""

from __future__ import annotations

import argparse
import os
import platform
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import numpy as np  # noqa: E402

from ascend.backends import get_backend  # noqa: E402
from common.generate import SamplingParams, generate  # noqa: E402
from common.loading import load_model  # noqa: E402
from common.model import Model  # noqa: E402


def run_once(model: Model, prompt: list[int], new_tokens: int) -> tuple[float, float, list[int]]:
    res = generate(model, [prompt], SamplingParams(max_new_tokens=new_tokens, stop_on_eos=False))
    return res.prefill_tokens_per_s, res.decode_tokens_per_s, res.output_ids[0]


def bench_preset(preset: str, prompt_len: int, new_tokens: int, rounds: int, threads: int) -> None:
    from ascend.mindspore_backend import MindSporeBackend

    lm = load_model(preset, lambda m: None)
    cfg = lm.cfg
    prompt = np.random.default_rng(0).integers(2, cfg.vocab_size, prompt_len).tolist()
    models = {
        "numpy (cpu reference)": Model(cfg, lm.weights, get_backend("cpu")),
        "mindspore jit": Model(cfg, lm.weights, MindSporeBackend(jit=True, threads=threads)),
        "mindspore eager": Model(cfg, lm.weights, MindSporeBackend(jit=False, threads=threads)),
    }
    t0 = time.perf_counter()
    ref_tokens = None
    agree = {}
    for name, m in models.items():  # warm-up: jit compiles, first-touch of weights
        _, _, toks = run_once(m, prompt, new_tokens)
        ref_tokens = toks if ref_tokens is None else ref_tokens
        agree[name] = sum(a == b for a, b in zip(toks, ref_tokens, strict=True))
    warm = time.perf_counter() - t0
    stats: dict[str, list[tuple[float, float]]] = {name: [] for name in models}
    for _ in range(rounds):
        for name, m in models.items():
            pre, dec, _ = run_once(m, prompt, new_tokens)
            stats[name].append((pre, dec))
    print(f"\n{preset}: {cfg.n_layers} layers, d={cfg.dim}, vocab {cfg.vocab_size}; prompt {prompt_len} tokens, "
          f"{new_tokens} new (greedy); {rounds} rounds after a warm-up of {warm:.1f}s")
    print(f"  {'backend':24s} {'prefill tok/s':>22s} {'decode tok/s':>22s} {'greedy = numpy':>16s}")
    print(f"  {'':24s} {'best':>10s} {'median':>11s} {'best':>10s} {'median':>11s}")
    base = max(d for _, d in stats["numpy (cpu reference)"])
    for name, rows in stats.items():
        pre = [p for p, _ in rows]
        dec = [d for _, d in rows]
        print(f"  {name:24s} {max(pre):10.1f} {statistics.median(pre):11.1f} {max(dec):10.2f} "
              f"{statistics.median(dec):11.2f} {agree[name]:>10d}/{new_tokens}   ({max(dec) / base:.3f}x numpy)")


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--presets", default="tiny,bench-small")
    ap.add_argument("--prompt-len", type=int, default=64)
    ap.add_argument("--new-tokens", type=int, default=16)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--threads", type=int, default=1, help="MindSpore CPU kernel threads (op_tuning.threads_num)")
    args = ap.parse_args()
    from importlib.metadata import version  # not `import mindspore`: the backend imports it, quietly

    print(f"mindspore {version('mindspore')}, numpy {np.__version__}, python {platform.python_version()}, "
          f"{os.cpu_count()} cores, OMP_NUM_THREADS={os.environ.get('OMP_NUM_THREADS', 'unset')}, "
          f"MindSpore kernel threads {args.threads}, load average {os.getloadavg()[0]:.2f} at start")
    for preset in args.presets.split(","):
        bench_preset(preset.strip(), args.prompt_len, args.new_tokens, args.rounds, args.threads)
    print(f"\nload average {os.getloadavg()[0]:.2f} at end (other processes share these cores: figures are noisy)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
