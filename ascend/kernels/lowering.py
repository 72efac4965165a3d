"""The torch backend's lowerings onto our kernels (provider "triton"): contract op -> torch.ops.dsv4.*.

Attached to ascend.torch_backend.TorchBackend by that module; each takes the backend as `self` and calls the
custom op with float32 tensors (the kernels read any float dtype and accumulate in float32).
"""

from __future__ import annotations

import torch

F32 = torch.float32


def _ops():
    from . import torch_ops  # noqa: F401  (registers torch.ops.dsv4.*)

    return torch.ops.dsv4


def hc_pre(self, x, fn, scale, base, iters, hc_eps, norm_eps):
    return _ops().hc_pre(self._k(x), fn.to(F32), scale.to(F32), base.to(F32), iters, hc_eps, norm_eps)


def hc_post(self, y, x, post, comb):
    return _ops().hc_post(self._k(y), self._k(x), post.to(F32), comb.to(F32))


def compress(self, kv, score):
    return _ops().compress(kv.contiguous(), score.contiguous())


def indexer_topk(self, q, weights, keys, q_pos, ratio, topk, scale):
    return _ops().indexer_topk(self._k(q), weights.to(F32), self._k(keys), q_pos.to(torch.int64), ratio, topk, scale)


def sparse_attention(self, q, q_pos, kv, kv_pos, window, comp, ratio, comp_sel, sinks, scale):
    return _ops().sparse_attention(self._k(q), q_pos.to(torch.int64), self._k(kv), kv_pos.to(torch.int64), window,
                                   None if comp is None else self._k(comp), ratio, comp_sel, sinks.to(F32), scale)


# table op -> (kernel name in the SoC table, function)
LOWERINGS = {
    "hc_pre": ("dsv4.hc_pre", hc_pre),
    "hc_post": ("dsv4.hc_post", hc_post),
    "compress": ("dsv4.compress", compress),
    "indexer_topk": ("dsv4.indexer_topk", indexer_topk),
    "sparse_attention": ("dsv4.sparse_attention", sparse_attention),
}
