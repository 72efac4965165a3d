"""The CANN custom-op kernels the torch backend lowers to, in plain torch, from their documented semantics.

These are vllm-ascend `torch.ops._C_ascend.*` kernels (schemas in its csrc/torch_binding.cpp; math from the
kernel READMEs, xLLM's golden tests and vllm-ascend's own reference code, as digested in
shared/spec/ascend_ecosystem.md section 1). Used only when no custom-op package is installed.

Not lowered (the backend keeps its composed path for them, see TorchBackend.KERNELS): `compressor` (fuses
the kv/gate projections, the state cache, RMSNorm and RoPE, a larger region than the contract's `compress`),
`npu_sparse_attn_sharedkv` and `npu_vllm_quant_lightning_indexer` (paged caches, per-batch metadata ops and
int8-quantized keys, none of which the contract's float, unpaged ops carry).
"""

from __future__ import annotations

import torch

from .npu_standin import _check_gating, _dtypes, _need, gating_top_k

__version__ = "standin"
STANDIN = True

_F32 = torch.float32


def moe_gating_top_k_hash(x: torch.Tensor, k: int, bias: torch.Tensor | None = None,
                          input_ids: torch.Tensor | None = None, tid2eid: torch.Tensor | None = None,
                          k_group: int = 1, group_count: int = 1, routed_scaling_factor: float = 1.0,
                          eps: float = 1e-20, group_select_mode: int = 0, renorm: int = 0, norm_type: int = 0,
                          out_flag: bool = False) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
    """V4 router: norm = softmax (0), sigmoid (1) or sqrt(softplus) (2) of x [T, E]; ids = tid2eid[input_ids]
    when the hash table is given, else the group-limited top-k of norm + bias; y = norm at ids, divided by
    (sum + eps) for norm_type 1 and 2, times routed_scaling_factor. renorm must be 0 (the op rejects others).
    Returns (y like x, int32 ids [T, k], float32 norm [T, E] if out_flag)."""
    _check_gating(x, k, bias, k_group, group_count, renorm, 2048)
    _need(norm_type in (0, 1, 2), f"moe_gating_top_k_hash: norm_type {norm_type}")
    xf = x.to(_F32)
    if norm_type == 0:
        norm = torch.softmax(xf, dim=-1)
    elif norm_type == 1:
        norm = torch.sigmoid(xf)
    else:
        norm = torch.sqrt(torch.logaddexp(torch.zeros_like(xf), xf))  # softplus without overflow
    y, idx = gating_top_k(norm, k, bias, input_ids, tid2eid, k_group, group_count, group_select_mode,
                          norm_type != 0, routed_scaling_factor, eps)
    return y.to(x.dtype), idx.to(torch.int32), (norm if out_flag else None)


def npu_hc_pre_v2(x: torch.Tensor, hc_fn: torch.Tensor, hc_scale: torch.Tensor, hc_base: torch.Tensor,
                  hc_mult: int, hc_sinkhorn_iters: int, norm_eps: float,
                  hc_eps: float) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """mHC pre-mapping with Sinkhorn (A2/A3): x [T, hc_mult, D] bf16; hc_fn [(2+n)n, nD], hc_scale [3],
    hc_base [(2+n)n] float32. mixes = (x_flat @ hc_fn^T) * rsqrt(mean(x_flat^2) + norm_eps);
    pre = sigmoid(mixes[:n] s0 + b[:n]) + hc_eps; post = 2 sigmoid(mixes[n:2n] s1 + b[n:2n]);
    comb = Sinkhorn(softmax(mixes[2n:] s2 + b[2n:]) + hc_eps) with hc_sinkhorn_iters passes;
    y = sum_j pre_j x_j. Returns (y bf16 [T, D], post f32 [T, n], comb f32 [T, n, n])."""
    _dtypes("npu_hc_pre_v2 x", x, (torch.bfloat16,))
    _need(x.dim() == 3 and x.shape[1] == hc_mult, f"npu_hc_pre_v2: x must be [T, {hc_mult}, D]")
    T, n, D = x.shape
    _need(hc_fn.shape == ((2 + n) * n, n * D) and hc_scale.shape == (3,) and hc_base.shape == ((2 + n) * n,),
          "npu_hc_pre_v2: hc_fn [(2+n)n, nD], hc_scale [3], hc_base [(2+n)n]")
    _need(hc_fn.dtype == _F32 and hc_scale.dtype == _F32 and hc_base.dtype == _F32,
          "npu_hc_pre_v2: hc_fn / hc_scale / hc_base must be float32")
    xf = x.to(_F32)
    flat = xf.reshape(T, n * D)
    r = 1.0 / torch.sqrt(torch.mean(flat * flat, dim=-1, keepdim=True) + norm_eps)
    m = (flat @ hc_fn.t()) * r
    pre = torch.sigmoid(m[:, :n] * hc_scale[0] + hc_base[:n]) + hc_eps
    post = 2.0 * torch.sigmoid(m[:, n:2 * n] * hc_scale[1] + hc_base[n:2 * n])
    comb = torch.softmax((m[:, 2 * n:] * hc_scale[2] + hc_base[2 * n:]).reshape(T, n, n), dim=-1) + hc_eps
    comb = comb / (comb.sum(dim=-2, keepdim=True) + hc_eps)
    for _ in range(hc_sinkhorn_iters - 1):
        comb = comb / (comb.sum(dim=-1, keepdim=True) + hc_eps)
        comb = comb / (comb.sum(dim=-2, keepdim=True) + hc_eps)
    y = torch.einsum("tn,tnd->td", pre, xf)
    return y.to(x.dtype), post, comb


def npu_hc_post(x: torch.Tensor, residual: torch.Tensor, post: torch.Tensor, comb: torch.Tensor) -> torch.Tensor:
    """mHC post-mapping (A2/A3): out[:, i] = post_i * x + sum_j comb[j, i] * residual[:, j] (comb used
    transposed, as the reference's (comb[..., None] * residual[:, :, None]).sum(-3)). x [T, D] the layer
    output; residual [T, n, D]; post [T, n], comb [T, n, n] float32; fp16/bf16/fp32 accepted."""
    _dtypes("npu_hc_post x", x, (torch.float16, torch.bfloat16, _F32))
    _need(residual.dim() == 3 and x.shape == (residual.shape[0], residual.shape[2]), "npu_hc_post: x [T, D] and "
                                                                                      "residual [T, n, D]")
    T, n, _ = residual.shape
    _need(post.shape == (T, n) and comb.shape == (T, n, n), "npu_hc_post: post [T, n], comb [T, n, n]")
    out = post.to(_F32).unsqueeze(-1) * x.to(_F32).unsqueeze(1) + torch.matmul(comb.to(_F32).transpose(1, 2),
                                                                               residual.to(_F32))
    return out.to(residual.dtype)


FUNCTIONS = ("moe_gating_top_k_hash", "npu_hc_pre_v2", "npu_hc_post")
