"""flash-slice (V4-Flash per-layer widths) in bfloat16 through the A3 lowering, every attention-side op on its
vendor stand-in, against the float32 NumPy reference: prompts of different lengths in one batch, chunked prefill.

    PYTHONPATH=. python benchmarks/bench_flash_slice_kernels.py [--soc A3] [--chunk 16] [--lengths 40,13]

Prints the kernels used, and per prompt the prompt-logit cosine and top-1 agreement against the reference (which
sees the same bf16-valued weights, widened). About 5 GB of memory at a time; a few minutes on a laptop CPU.
"""

from __future__ import annotations

import argparse
import time

import numpy as np


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--soc", default="A3")
    ap.add_argument("--chunk", type=int, default=16)
    ap.add_argument("--lengths", default="40,13")
    ap.add_argument("--new", type=int, default=3)
    a = ap.parse_args()
    from ascend.torch_backend import TorchBackend, simulated_providers
    from common.checkpoint import as_float
    from common.generate import SamplingParams, generate
    from common.loading import load_model
    from common.model import Model
    from ops.numpy_ref import NumpyBackend

    lm = load_model("flash-slice", log=lambda m: None, float_dtype="bfloat16")
    cfg, w = lm.cfg, lm.weights
    del lm
    rng = np.random.default_rng(0)
    prompts = [rng.integers(2, cfg.vocab_size, int(n)).tolist() for n in a.lengths.split(",")]
    params = SamplingParams(max_new_tokens=a.new, stop_on_eos=False)
    B = TorchBackend(soc=a.soc, dtype="bfloat16", providers=simulated_providers("cpu", a.soc, None))
    t0 = time.perf_counter()
    got = generate(Model(cfg, w, B), prompts, params, keep_prompt_logits=True, prefill_chunk=a.chunk)
    t1 = time.perf_counter()
    v = B.variants()
    for op in ("compressor", "compressor_metadata", "lightning_indexer", "sparse_attn_sharedkv", "kv_scatter",
               "hc_pre", "hc_post", "moe_gate", "moe_experts"):
        print(f"{op:22s} {v.get(op)}")
    print(f"bf16 {a.soc}: {t1 - t0:.1f} s (prefill chunk {a.chunk}, lengths {a.lengths})")
    for k in list(w):  # widen one tensor at a time: the reference sees the same bf16-valued weights
        if not k.endswith("tid2eid"):
            w[k] = as_float(w[k], "float32")
    ref = generate(Model(cfg, w, NumpyBackend()), prompts, params, keep_prompt_logits=True)
    print(f"float32 reference: {time.perf_counter() - t1:.1f} s")
    for i, (g, r) in enumerate(zip(got.prompt_logits, ref.prompt_logits, strict=True)):
        g, r = np.asarray(g, np.float64), np.asarray(r, np.float64)
        cos = float((g * r).sum() / np.linalg.norm(g) / np.linalg.norm(r))
        top1 = float(np.mean(g.argmax(-1) == r.argmax(-1)))
        print(f"prompt {i} ({len(prompts[i])} tokens): cosine {cos:.6f}, top-1 {top1:.3f}, max-abs "
              f"{np.abs(g - r).max():.4f}; generated {got.output_ids[i]} vs reference {ref.output_ids[i]}")


if __name__ == "__main__":
    main()
