"""Arithmetic shared by several stand-in libraries (exact int8 GEMM, per-token int8, gating top-k)."""

from __future__ import annotations

from collections.abc import Sequence

import torch

F32 = torch.float32
LOW = (torch.float16, torch.bfloat16)
FLOAT = (torch.float16, torch.bfloat16, torch.float32)


def need(cond: bool, msg: str) -> None:
    """A documented constraint (op-plugin docs); binding TORCH_CHECKs use schema.check with their line."""
    if not cond:
        raise RuntimeError(msg)


def dtypes(name: str, t: torch.Tensor, allowed: Sequence[torch.dtype]) -> None:
    need(t.dtype in allowed, f"{name}: dtype {t.dtype} not supported (documented: {[str(d) for d in allowed]})")


def int_gemm(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Exact int8 x int8 -> int32 GEMM (batched). Float BLAS on the int8 values is exact integer
    arithmetic: products are <= 2**14 and partial sums <= K * 2**14, exact in float32 up to K = 1024
    and in float64 beyond (the same argument as ops.quant.int_matmul). CPU-only: the stand-ins never
    run on an NPU."""
    K = a.shape[-1]
    ft = torch.float32 if K * 2**14 <= 2**24 else torch.float64
    return torch.matmul(a.to(ft), b.to(ft)).to(torch.int32)


def per_token_int8(xf: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    # scale = rowmax|x| / 127 (a zero row gets scale 1, as ops/quant.py and the CANN golden do);
    # torch.round is round-half-to-even, the same rule as np.rint
    amax = xf.abs().amax(dim=-1) if xf.shape[-1] else torch.zeros(xf.shape[:-1], dtype=F32)
    scale = torch.where(amax > 0, amax / 127.0, torch.ones_like(amax))
    y = torch.clamp(torch.round(xf / scale.unsqueeze(-1)), -127, 127).to(torch.int8)
    return y, scale


def group_limited_topk(choice: torch.Tensor, k: int, k_group: int, group_count: int,
                       group_select_mode: int) -> torch.Tensor:
    """Top-k indices of `choice` [T, E] within the best k_group of group_count expert groups. Stable:
    among equal scores the lower expert index wins (the golden uses a stable argsort)."""
    T, E = choice.shape
    if group_count > 1:
        g = choice.reshape(T, group_count, E // group_count)
        if group_select_mode == 0:
            gscore = g.amax(dim=-1)
        else:
            gscore = torch.topk(g, 2, dim=-1).values.sum(dim=-1)
        keep = torch.sort(-gscore, dim=-1, stable=True).indices[:, :k_group]
        mask = torch.ones(T, group_count, dtype=torch.bool)
        mask.scatter_(1, keep, False)
        choice = torch.where(mask.unsqueeze(-1), float("-inf"), g).reshape(T, E)
    return torch.sort(-choice, dim=-1, stable=True).indices[:, :k]


def gating_top_k(scores: torch.Tensor, k: int, bias: torch.Tensor | None, input_ids: torch.Tensor | None,
                 tid2eid: torch.Tensor | None, k_group: int, group_count: int, group_select_mode: int,
                 renormalize: bool, routed_scaling_factor: float, eps: float) -> tuple[torch.Tensor, torch.Tensor]:
    """The selection and weighting shared by the gating kernels: ids from the hash table (input_ids, tid2eid)
    or the group-limited top-k of scores + bias; weights are the unbiased scores at those ids, renormalized
    (sigmoid / sqrtsoftplus) with eps, times routed_scaling_factor."""
    T, E = scores.shape
    if tid2eid is not None:
        need(input_ids is not None and input_ids.numel() == T, "gating: hash mode needs input_ids [T]")
        need(tid2eid.dim() == 2 and tid2eid.shape[1] == k, f"gating: tid2eid must be [vocab, {k}]")
        idx = tid2eid[input_ids.reshape(-1).to(torch.int64)].to(torch.int64)
    else:
        choice = scores + bias.to(F32) if bias is not None else scores
        idx = group_limited_topk(choice, k, k_group, group_count, group_select_mode)
    y = torch.gather(scores, 1, idx)
    if renormalize:
        y = y / (y.sum(dim=-1, keepdim=True) + eps)
    return y * routed_scaling_factor, idx


def gating_norm(xf: torch.Tensor, norm_type: int) -> torch.Tensor:
    """0 softmax, 1 sigmoid, 2 sqrt(softplus) (V4's sqrtsoftplus), in float32."""
    if norm_type == 0:
        return torch.softmax(xf, dim=-1)
    if norm_type == 1:
        return torch.sigmoid(xf)
    return torch.sqrt(torch.logaddexp(torch.zeros_like(xf), xf))  # softplus without overflow


def sinkhorn(logits: torch.Tensor, iters: int, eps: float) -> torch.Tensor:
    """softmax over the last axis + eps, column-normalize, then iters - 1 row/column passes (each sum + eps)."""
    c = torch.softmax(logits, dim=-1) + eps
    c = c / (c.sum(dim=-2, keepdim=True) + eps)
    for _ in range(iters - 1):
        c = c / (c.sum(dim=-1, keepdim=True) + eps)
        c = c / (c.sum(dim=-2, keepdim=True) + eps)
    return c
