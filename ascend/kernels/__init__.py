"""Our own Triton-Ascend kernels for the V4 ops no vendor kernel covers on every SoC.

One source per kernel (mhc_pre, mhc_post, compressor, indexer_score, indexer_topk, sparse_attention); `tiles`
holds the per-SoC tile sizes and the model shape sets; `compile` drives triton-ascend's compiler stages to HIVM
for A2 / A3 / 950; `torch_ops` registers them as torch custom ops (namespace `dsv4`). Nothing here imports
triton at package import: triton-ascend is the optional `kernels` extra and lives in its own environment
(it installs as the package `triton`). On a CPU the kernels run under triton's interpreter (TRITON_INTERPRET=1).
"""

from __future__ import annotations

import importlib
from typing import Any

from ._runtime import interpreting, prepare, triton_installed

# kernel -> (module, SoC-table op it serves (lowering.py), what it computes)
KERNELS: dict[str, tuple[str, str, str]] = {
    "mhc_pre": ("mhc_pre", "hc_pre", "mixes, RMS scale, sigmoid pre/post, Sinkhorn n x n, weighted collapse"),
    "mhc_post": ("mhc_post", "hc_post", "post * y + comb^T x"),
    "compressor": ("compressor", "compressor", "gated pooling (overlap layout), RMSNorm, partial RoPE, state update"),
    "indexer_score": ("indexer_score", "lightning_indexer", "lightning-indexer scores with visibility"),
    "indexer_topk": ("indexer_topk", "lightning_indexer", "top-k selection in the reference order"),
    "sparse_attention": ("sparse_attention", "sparse_attn_sharedkv",
                         "shared-KV attention with sinks over window + selected compressed entries"),
}

__all__ = ["KERNELS", "available", "kernel_module", "prepare", "interpreting", "triton_installed"]


def available() -> bool:
    """triton-ascend is installed (the `triton` provider can be offered)."""
    return triton_installed()


def kernel_module(name: str) -> Any:
    """The kernel's module (imports triton; call `prepare` first on a CPU)."""
    return importlib.import_module(f"{__name__}.{KERNELS[name][0]}")
