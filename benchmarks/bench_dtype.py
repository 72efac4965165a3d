"""Device dtypes on bench-small: peak memory of a bfloat16 run against a float32 one, and how close the bfloat16
logits stay to the float32 NumPy reference (figures, no assertions).

Every run is its own subprocess, so each peak RSS (`ru_maxrss` of that process alone) is honest: the child
imports torch, loads the preset (random weights drawn tensor by tensor, each rounded at once to its device dtype
with `--dtype bfloat16`), builds the model on its backend and generates greedily. Runs:

* torch float32 and torch bfloat16: the Ascend lowering on CPU (stand-in kernels, `--soc`), as `dsv4 generate
  --backend torch --dtype ...` runs it;
* the NumPy float32 reference on the preset's float32 weights, and on the same weights rounded to bfloat16 (what
  a bf16 checkpoint holds: then only the activations' precision separates the two runs).

Reported: peak RSS of each run and above its post-import baseline, the bf16 / f32 ratio, and per comparison the
prompt-logit cosine (min / median over positions), top-1 agreement over prompt positions and the greedy
continuation agreement. Score-based MoE routing has near-ties; a tie broken the other way under bf16 is a
discrete flip (that token takes another expert), which is why the minimum cosine sits below the median.

    python benchmarks/bench_dtype.py                     # bench-small, 64-token prompt, 16 new tokens, A2
    python benchmarks/bench_dtype.py --model tiny --prompt-len 32 --new-tokens 8 --soc 950
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parent.parent


def _rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0  # kB on Linux


def child(args: argparse.Namespace) -> None:
    """One run: load, generate, save the logits; print one JSON line of figures."""
    import torch  # noqa: F401  (imported before the baseline: every run pays it)

    from ascend.backends import get_backend
    from common.checkpoint import as_float
    from common.generate import SamplingParams, generate
    from common.loading import load_model
    from common.model import Model

    base = _rss_mb()
    t0 = time.perf_counter()
    if args.backend == "torch":
        backend = get_backend("torch", soc=args.soc, dtype=args.dtype)
        lm = load_model(args.model, log=lambda m: None, float_dtype=args.dtype)
    else:
        backend = get_backend("cpu")
        lm = load_model(args.model, log=lambda m: None, float_dtype="bfloat16" if args.round_weights else "float32")
        if args.round_weights:  # the bf16 values, widened one tensor at a time
            for k in list(lm.weights):
                if lm.weights[k].dtype.kind in "fV":
                    lm.weights[k] = as_float(lm.weights[k], "float32")
    model = Model(lm.cfg, lm.weights, backend)
    load_s = time.perf_counter() - t0
    loaded = _rss_mb()
    prompt = np.random.default_rng(0).integers(2, lm.cfg.vocab_size, args.prompt_len).tolist()
    res = generate(model, [prompt], SamplingParams(max_new_tokens=args.new_tokens, stop_on_eos=False),
                   keep_prompt_logits=True)
    logits = backend.to_numpy(res.prompt_logits[0]).astype(np.float32) if args.backend == "torch" else \
        np.asarray(res.prompt_logits[0], np.float32)
    np.savez(args.out, logits=logits, ids=np.asarray(res.output_ids[0]))
    print(json.dumps({"peak_rss_mb": _rss_mb(), "baseline_mb": base, "loaded_mb": loaded, "load_s": load_s,
                      "prefill_tok_s": res.prefill_tokens_per_s, "decode_tok_s": res.decode_tokens_per_s}))


def run(label: str, tmp: Path, common: list[str], *extra: str) -> dict:
    out = tmp / f"{label}.npz"
    env = dict(os.environ, PYTHONPATH=str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", ""))
    p = subprocess.run([sys.executable, __file__, "--child", "--out", str(out), *common, *extra], env=env,
                       capture_output=True, text=True)
    if p.returncode:
        raise SystemExit(f"{label} failed:\n{p.stderr}")
    fig = json.loads(p.stdout.strip().splitlines()[-1])
    with np.load(out) as z:
        fig.update(logits=z["logits"], ids=z["ids"].tolist())
    peak, base, loaded = fig["peak_rss_mb"], fig["baseline_mb"], fig["loaded_mb"]
    print(f"  {label:<32} peak RSS {peak:6.0f} MB: {peak - base:5.0f} MB above the {base:.0f} MB import baseline "
          f"({loaded - base:.0f} MB once loaded); load {fig['load_s']:.1f}s, prefill {fig['prefill_tok_s']:.1f} tok/s, "
          f"decode {fig['decode_tok_s']:.2f} tok/s", flush=True)
    return fig


def agreement(a: dict, b: dict) -> str:
    x, y = a["logits"], b["logits"]
    cos = (x * y).sum(-1) / (np.linalg.norm(x, axis=-1) * np.linalg.norm(y, axis=-1))
    top1 = float((x.argmax(-1) == y.argmax(-1)).mean())
    n = len(a["ids"])
    same = next((i for i in range(n) if a["ids"][i] != b["ids"][i]), n)
    good = (cos >= 0.999).mean()
    return (f"cosine min {cos.min():.6f} median {np.median(cos):.6f} (positions >= 0.999: {good:.0%}), "
            f"top-1 {top1:.1%}, greedy tokens identical for {same}/{n}")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="bench-small")
    ap.add_argument("--soc", default="A2")
    ap.add_argument("--prompt-len", type=int, default=64)
    ap.add_argument("--new-tokens", type=int, default=16)
    ap.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    ap.add_argument("--backend", default="torch", help=argparse.SUPPRESS)
    ap.add_argument("--dtype", default="float32", help=argparse.SUPPRESS)
    ap.add_argument("--round-weights", action="store_true", help=argparse.SUPPRESS)
    ap.add_argument("--out", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.child:
        child(args)
        return
    common = ["--model", args.model, "--soc", args.soc, "--prompt-len", str(args.prompt_len), "--new-tokens",
              str(args.new_tokens)]
    print(f"{args.model}: {args.prompt_len}-token prompt, {args.new_tokens} greedy tokens, SoC {args.soc} "
          f"(stand-in kernels), one subprocess per run, OMP_NUM_THREADS={os.environ.get('OMP_NUM_THREADS', '-')}")
    with tempfile.TemporaryDirectory(prefix="bench-dtype-") as d:
        tmp = Path(d)
        f32 = run("torch float32", tmp, common, "--dtype", "float32")
        bf16 = run("torch bfloat16", tmp, common, "--dtype", "bfloat16")
        ref = run("reference float32", tmp, common, "--backend", "cpu")
        ref_r = run("reference float32, bf16 weights", tmp, common, "--backend", "cpu", "--round-weights")
    model = [r["peak_rss_mb"] - r["baseline_mb"] for r in (bf16, f32)]
    held = [r["loaded_mb"] - r["baseline_mb"] for r in (bf16, f32)]
    print(f"peak RSS bfloat16 / float32 (torch): {bf16['peak_rss_mb'] / f32['peak_rss_mb']:.3f}x whole process, "
          f"{model[0] / model[1]:.3f}x above the import baseline ({held[0] / held[1]:.3f}x once loaded, before "
          f"generating)")
    print(f"bf16 vs reference on the same (bf16-valued) weights: {agreement(bf16, ref_r)}")
    print(f"bf16 vs reference on the preset's float32 weights:   {agreement(bf16, ref)}")
    print(f"torch float32 vs reference (the golden):             {agreement(f32, ref)}")
    print(f"reference on bf16-rounded vs float32 weights:        {agreement(ref_r, ref)}")


if __name__ == "__main__":
    main()
