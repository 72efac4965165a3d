"""Our kernels as torch custom ops (namespace `dsv4`), with fake implementations for graph capture.

The Python counterpart of vllm-ascend's csrc/torch_binding.cpp + torch_binding_meta.cpp: `torch.library.custom_op`
defines each schema and its implementation (the triton kernel's host wrapper; on a CPU under triton's
interpreter), `register_fake` gives shapes and dtypes without running it. Registering needs torch only; the first
call imports triton. Host wrappers stay thin so the signatures can follow the Ascend V4 kernels' contract.
"""

from __future__ import annotations

import torch
from torch import Tensor

from . import kernel_module
from .tiles import active

NAMESPACE = "dsv4"
OPS = ("hc_pre", "hc_post", "compress", "compressor", "indexer_topk", "sparse_attention")


@torch.library.custom_op("dsv4::hc_pre", mutates_args=())
def hc_pre(x: Tensor, fn: Tensor, scale: Tensor, base: Tensor, iters: int, hc_eps: float,
           norm_eps: float) -> tuple[Tensor, Tensor, Tensor]:
    return kernel_module("mhc_pre").launch(x, fn, scale, base, iters, hc_eps, norm_eps, tiles=active("mhc_pre"))


@hc_pre.register_fake
def _(x, fn, scale, base, iters, hc_eps, norm_eps):
    T, n, D = x.shape
    return x.new_empty((T, D), dtype=torch.float32), x.new_empty((T, n), dtype=torch.float32), \
        x.new_empty((T, n, n), dtype=torch.float32)


@torch.library.custom_op("dsv4::hc_post", mutates_args=())
def hc_post(y: Tensor, x: Tensor, post: Tensor, comb: Tensor) -> Tensor:
    return kernel_module("mhc_post").launch(y, x, post, comb, tiles=active("mhc_post"))


@hc_post.register_fake
def _(y, x, post, comb):
    return x.new_empty(x.shape, dtype=torch.float32)


@torch.library.custom_op("dsv4::compress", mutates_args=())
def compress(kv: Tensor, score: Tensor) -> Tensor:
    return kernel_module("compressor").launch(kv, score, tiles=active("compressor"))[0]


@compress.register_fake
def _(kv, score):
    return kv.new_empty((kv.shape[0], kv.shape[2]), dtype=torch.float32)


@torch.library.custom_op("dsv4::compressor", mutates_args=())
def compressor(kv: Tensor, score: Tensor, ape: Tensor | None, prev_kv: Tensor | None, prev_score: Tensor | None,
               norm_weight: Tensor | None, eps: float, cos: Tensor | None, sin: Tensor | None,
               overlap: bool) -> tuple[Tensor, Tensor, Tensor]:
    """The fused compressor: (entries [G, C], next state kv [R, C], next state score [R, C]; empty without
    overlap)."""
    out, skv, ssc = kernel_module("compressor").launch(kv, score, ape=ape, prev_kv=prev_kv, prev_score=prev_score,
                                                      norm_weight=norm_weight, eps=eps, cos=cos, sin=sin,
                                                      overlap=overlap, tiles=active("compressor"))
    # outputs may alias neither the inputs nor each other (torch.library): fresh tensors each
    def fresh(t):
        return kv.new_empty((0,), dtype=torch.float32) if t is None else t.clone()

    return out, fresh(skv), fresh(ssc)


@compressor.register_fake
def _(kv, score, ape, prev_kv, prev_score, norm_weight, eps, cos, sin, overlap):
    G, R, W = kv.shape
    C = W // 2 if overlap else W
    st = (R, C) if overlap else (0,)
    return (kv.new_empty((G, C), dtype=torch.float32), kv.new_empty(st, dtype=torch.float32),
            kv.new_empty(st, dtype=torch.float32))


@torch.library.custom_op("dsv4::indexer_topk", mutates_args=())
def indexer_topk(q: Tensor, weights: Tensor, keys: Tensor, q_pos: Tensor, ratio: int, topk: int,
                 scale: float) -> Tensor:
    scores = kernel_module("indexer_score").launch(q, weights, keys, q_pos, ratio, scale,
                                                   tiles=active("indexer_score"))
    return kernel_module("indexer_topk").launch(scores, topk, tiles=active("indexer_topk"))


@indexer_topk.register_fake
def _(q, weights, keys, q_pos, ratio, topk, scale):
    return q.new_empty((q.shape[0], min(topk, keys.shape[0])), dtype=torch.int64)


@torch.library.custom_op("dsv4::sparse_attention", mutates_args=())
def sparse_attention(q: Tensor, q_pos: Tensor, kv: Tensor, kv_pos: Tensor, window: int, comp: Tensor | None,
                     ratio: int, comp_sel: Tensor | None, sinks: Tensor, scale: float) -> Tensor:
    return kernel_module("sparse_attention").launch(q, q_pos, kv, kv_pos, window, comp, ratio, comp_sel, sinks,
                                                    scale, tiles=active("sparse_attention"))


@sparse_attention.register_fake
def _(q, q_pos, kv, kv_pos, window, comp, ratio, comp_sel, sinks, scale):
    return q.new_empty(q.shape, dtype=torch.float32)


def registered(name: str) -> bool:
    return hasattr(getattr(torch.ops, NAMESPACE), name)
