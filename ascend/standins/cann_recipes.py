"""cann-recipes-infer `torch.ops.custom` kernels (Huawei's V4 reference ops), as CPU stand-ins.

Defined from the `m.def(...)` strings of ops/ascendc/torch_ops_extension/custom_ops/csrc/ops_def_registration.cpp
(snapshot fbc225d, kept in ascend/schemas/cann_recipes.yaml), with each op's host-side TORCH_CHECKs from
custom_ops/csrc/<op>.cpp mirrored and cited. Their golden tests (ops/ascendc/examples/test_npu_<op>.py) are
held against these stand-ins in tests/test_standin_goldens.py.

The torch backend lowers to vllm-ascend's `_C_ascend` kernels, not to these: same kernel names, different
binding rules (e.g. this npu_hc_post also takes the flat [bs, d] form but only d in {4096, 7168}); `dsv4
doctor` reports the package when installed.
"""

from __future__ import annotations

import torch

from .common import F32, gating_norm, gating_top_k, sinkhorn
from .schema import StandinLibrary, check
from .vllm_ascend import hc_post_math, hc_pre_math

__version__ = "standin"
STANDIN = True
LIB = StandinLibrary("cann_recipes")
_SRC = "cann-recipes-infer@fbc225d ops/ascendc/torch_ops_extension/custom_ops/csrc/"
HC = 4  # HC_LIMIT in npu_hc_post.cpp / npu_hc_pre.cpp
D_LIMITS = (4096, 7168)  # D_LIMIT_4096 / D_LIMIT_7168
MIX_HC = 24  # MIX_HC_LIMIT in npu_hc_pre.cpp


def _c(op: str, line: int | str) -> str:
    return f"{_SRC}{op}.cpp:{line}"


@LIB.impl("npu_hc_post")
def npu_hc_post(x: torch.Tensor, residual: torch.Tensor, post: torch.Tensor, comb: torch.Tensor) -> torch.Tensor:
    """out = post * x + comb^T @ residual, in residual's shape and dtype. Forms: x [bs, d] with residual
    [bs, hc, d], post [bs, hc], comb [bs, hc, hc]; or x [b, s, d] with residual [b, s, hc, d], post [b, s, hc],
    comb [b, s, hc, hc]. hc 4, d 4096 or 7168."""
    c = "npu_hc_post"
    check(x.dim() in (2, 3), f"Input tensor x's dim num should be 2 or 3, actual {x.dim()}.", _c(c, 139))
    for i in range(x.dim()):
        check(x.shape[i] > 0, f"Input tensor x's shape should be positive, but x.shape[{i}] is :{x.shape[i]}.",
              _c(c, 142))
    lead, d = tuple(x.shape[:-1]), x.shape[-1]
    form = _c(c, 50 if x.dim() == 2 else 91)
    check(d in D_LIMITS, f"The d of x only support 4096 or 7168, actual {d}.", form)
    check(residual.dim() == x.dim() + 1, f"Input tensor residual's dim num should be {x.dim() + 1}, actual "
                                         f"{residual.dim()}.", form)
    hc = residual.shape[-2]
    check(tuple(residual.shape[:-2]) == lead and residual.shape[-1] == d,
          f"residual {tuple(residual.shape)} must be [{', '.join(map(str, lead))}, hc, {d}]", form)
    check(hc == HC, f"The hc of residual only support {HC}, actual {hc}.", form)
    check(tuple(post.shape) == (*lead, hc), f"post {tuple(post.shape)} must be {(*lead, hc)}", form)
    check(tuple(comb.shape) == (*lead, hc, hc), f"com {tuple(comb.shape)} must be {(*lead, hc, hc)}", form)
    low = (torch.float32, torch.float16, torch.bfloat16)
    check(x.dtype in low, "x should be FLOAT16, BFLOAT16, or FLOAT32.", _c(c, 151))
    check(residual.dtype == x.dtype, "x's dtype should be equal to residual's dtype.", _c(c, 153))
    check(post.dtype in low, "post should be FLOAT16, BFLOAT16, or FLOAT32.", _c(c, 154))
    check(comb.dtype == post.dtype, "com's dtype should be equal to post's dtype.", _c(c, 156))
    return hc_post_math(x, residual, post, comb).to(residual.dtype)


@LIB.impl("npu_hc_pre")
def npu_hc_pre(x: torch.Tensor, hc_fn: torch.Tensor, hc_scale: torch.Tensor, hc_base: torch.Tensor, *,
               hc_mult: int = 4, hc_sinkhorn_iters: int = 20, norm_eps: float = 1e-6,
               hc_eps: float = 1e-6) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """vllm-ascend's npu_hc_pre_v2 math with cann's binding: x [bs, hc, d] or [b, s, hc, d] bf16, hc 4,
    d 4096/7168, hc_fn [24, hc*d], hc_scale [3], hc_base [24] float32; hc_mult etc. keyword-only."""
    c = "npu_hc_pre"
    check(x.dim() in (3, 4), f"Input tensor x's dim num should be 4, actual {x.dim()}.", _c(c, 99))
    for i in range(3):
        check(x.shape[i] > 0, f"Input tensor x's shape should be positive, but x.shape[{i}] is :{x.shape[i]}.",
              _c(c, 102))
    hc, d = x.shape[-2], x.shape[-1]
    check(hc == HC, f"The hc of x only support {HC}, actual {hc}.", _c(c, 111))
    check(d in D_LIMITS, f"The d of x only support 4096 or 7168, actual {d}.", _c(c, 112))
    check(hc_fn.dim() == 2, f"Input tensor hc_fn's dim num should be 2, actual {hc_fn.dim()}.", _c(c, 116))
    check(hc_fn.shape[0] == MIX_HC, f"The mix_hc of hc_fn only support {MIX_HC}, actual {hc_fn.shape[0]}.",
          _c(c, 118))
    check(hc_fn.shape[1] == hc * d, f"The hc_fn.shape[1] should be hc * d, actual {hc_fn.shape[1]}.", _c(c, 120))
    check(hc_scale.dim() == 1 and hc_scale.shape[0] == 3, "Input tensor hc_scale's shape should be [3].",
          _c(c, "124-126"))
    check(hc_base.dim() == 1 and hc_base.shape[0] == hc_fn.shape[0], "The hc_base.shape[0] should be mix_hc.",
          _c(c, "129-131"))
    check(x.dtype == torch.bfloat16, "x's dtype should be BFLOAT16.", _c(c, 135))
    for name, t, line in (("hc_fn", hc_fn, 136), ("hc_scale", hc_scale, 137), ("hc_base", hc_base, 138)):
        check(t.dtype == F32, f"{name}'s dtype should be FLOAT32.", _c(c, line))
    y, post, comb = hc_pre_math(x, hc_fn, hc_scale, hc_base, hc, hc_sinkhorn_iters, norm_eps, hc_eps)
    return y.to(torch.bfloat16), post, comb


@LIB.impl("npu_hc_pre_sinkhorn")
def npu_hc_pre_sinkhorn(mixes: torch.Tensor, rsqrt: torch.Tensor, hc_scale: torch.Tensor, hc_base: torch.Tensor,
                        x: torch.Tensor, hc_mult: int = 4, hc_sinkhorn_iters: int = 20,
                        hc_eps: float = 1e-5) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The epilogue of hc_pre after the mixes matmul: m = mixes * rsqrt; pre/post/comb as in hc_pre;
    y = sum_j pre_j x_j in bf16. mixes [.., (2+hc)hc], rsqrt [..], x [.., hc, d]. The binding has no host-side
    checks (npu_hc_pre_sinkhorn.cpp); shapes are checked here only as far as the math needs them."""
    n = hc_mult
    check(mixes.shape[-1] == (2 + n) * n and tuple(rsqrt.shape) == tuple(mixes.shape[:-1])
          and tuple(x.shape[:-2]) == tuple(mixes.shape[:-1]) and x.shape[-2] == n,
          "mixes [.., (2+hc)hc], rsqrt [..], x [.., hc, d]", _c("npu_hc_pre_sinkhorn", "meta"))
    m = mixes.to(F32) * rsqrt.to(F32).unsqueeze(-1)
    pre = torch.sigmoid(m[..., :n] * hc_scale[0] + hc_base[:n]) + hc_eps
    post = 2.0 * torch.sigmoid(m[..., n:2 * n] * hc_scale[1] + hc_base[n:2 * n])
    comb = sinkhorn((m[..., 2 * n:] * hc_scale[2] + hc_base[2 * n:]).reshape(*m.shape[:-1], n, n),
                    hc_sinkhorn_iters, hc_eps)
    y = (pre.unsqueeze(-1) * x.to(F32)).sum(dim=-2)
    return y.to(torch.bfloat16), post, comb


@LIB.impl("npu_moe_gating_top_k")
def npu_moe_gating_top_k(x: torch.Tensor, k: int, *, bias: torch.Tensor | None = None,
                         input_ids: torch.Tensor | None = None, tid2eid: torch.Tensor | None = None,
                         k_group: int = 1, group_count: int = 1, routed_scaling_factor: float = 1.0,
                         eps: float = 9.9999999999999995e-21, group_select_mode: int = 0, renorm: int = 0,
                         norm_type: int = 0, out_flag: bool = False
                         ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The V4 router (softmax / sigmoid / sqrtsoftplus, tid2eid hash), cann's binding of MoeGatingTopKHash."""
    c = "npu_moe_gating_top_k"
    check(x.numel() > 0, "Input tensor x should not be empty.", _c(c, 74))
    check(k > 0, "k should be greater than 0.", _c(c, 75))
    check(k_group > 0 and group_count > 0, "kGroup and groupCount should be greater than 0.", _c(c, "76-77"))
    check(k <= x.shape[-1] // group_count * k_group, "k should be <= x_shape[-1] / groupCount * kGroup.", _c(c, 78))
    check(k_group <= group_count, "kGroup should be <= groupCount.", _c(c, 79))
    check(group_select_mode in (0, 1), "groupSelectMode should be 0 or 1.", _c(c, 80))
    check(norm_type in (0, 1, 2), "normType should be 0, 1 or 2.", _c(c, 81))
    check(renorm == 0, "renorm only supports 0.", _c(c, 82))
    if bias is not None:
        check(bias.numel() > 0 and bias.dim() == 1 and bias.shape[0] == x.shape[-1],
              "Bias tensor should be 1-dimensional with x_shape[-1] entries.", _c(c, "87-89"))
    check(input_ids is None or input_ids.numel() > 0, "input_ids tensor should not be empty when not null.",
          _c(c, 96))
    check(tid2eid is None or tid2eid.numel() > 0, "tid2eid tensor should not be empty when not null.", _c(c, 101))
    check(x.dtype in (torch.float32, torch.float16, torch.bfloat16), "x dtype must be float16/bfloat16/float32.",
          _c(c, 105))
    check(x.dim() == 2, "x must be [T, E]", _c(c, "meta"))
    norm = gating_norm(x.to(F32), norm_type)
    y, idx = gating_top_k(norm, k, bias, input_ids, tid2eid, k_group, group_count, group_select_mode,
                          norm_type != 0, routed_scaling_factor, eps)
    return y.to(x.dtype), idx.to(torch.int32), norm


FUNCTIONS = tuple(sorted(LIB.schemas))


# ---- the compress epilogs in cann's binding (keyword arguments, no layout; hifloat8 not modelled) --------------
@LIB.impl("kv_compress_epilog")
def kv_compress_epilog(kv_compress_cache: torch.Tensor, x: torch.Tensor, slot_mapping: torch.Tensor, *,
                       quant_group_size: int = 64, quant_mode: int = 2, round_scale_flag: bool = True,
                       scale: float = 1.0) -> None:
    """The same aclnnKvCompressEpilog as vllm-ascend's (layout 1 rows; ascend/standins/v4_attention.py)."""
    check(x.dim() == 2, f"x must be 2D tensor, but got dimensions: {x.dim()}", _c("npu_kv_compress_epilog", 25))
    check(x.dtype == torch.bfloat16, f"x must be BF16, but got {x.dtype}", _c("npu_kv_compress_epilog", 43))
    check(kv_compress_cache.dtype in (torch.float8_e5m2, torch.float8_e4m3fn, torch.uint8),
          f"kv_compress_cache must be FP8_E5M2, FP8_E4M3 or HIFLOAT8, but got {kv_compress_cache.dtype}",
          _c("npu_kv_compress_epilog", 47))
    check(quant_mode != 3 and kv_compress_cache.dtype != torch.uint8,
          "hifloat8 (quant_mode 3, scale) not modelled", "stand-in")
    from .v4_attention import kv_compress_epilog as vllm_kv  # same kernel, vllm-ascend's binding checks

    vllm_kv(kv_compress_cache, x, slot_mapping, quant_group_size, quant_mode, round_scale_flag, 1)


@LIB.impl("indexer_compress_epilog")
def indexer_compress_epilog(indexer_compress_cache: torch.Tensor, indexer_compress_scale: torch.Tensor,
                            x: torch.Tensor, slot_mapping: torch.Tensor, *, quant_mode: int = 1,
                            round_scale: bool = True, scale: float = 1.0) -> None:
    """Rows of x [T, d] into cache[slot] (fp8) and scale[slot] per 128 columns: quant_mode 1 float32 scale =
    amax / fp8 max; quant_mode 0 MX, e8m0 scale rounded up to a power of two (cann-recipes-infer@fbc225d
    ops/ascendc/examples/test_npu_indexer_compress_epilog.py dynamic_block_quant / act_quant). The binding
    (npu_indexer_compress_epilog.cpp:18-30) checks nothing; the checks here only keep the writes in bounds."""
    fmax = {torch.float8_e4m3fn: 448.0, torch.float8_e5m2: 57344.0}.get(indexer_compress_cache.dtype)
    check(fmax is not None and quant_mode in (0, 1), "quant_mode 2 / hifloat8 not modelled; cache must be fp8",
          "stand-in")
    t, d = slot_mapping.numel(), x.shape[-1]
    nb = -(-d // 128)
    check(x.numel() == t * d and indexer_compress_cache.shape[-1] == d
          and indexer_compress_scale.shape[-1] == nb, f"x [T, d], cache [N, d], scale [N, {nb}] expected", "stand-in")
    check(indexer_compress_scale.dtype == (F32 if quant_mode == 1 else torch.float8_e8m0fnu),
          "scale must be float32 (quant_mode 1) or float8_e8m0fnu (quant_mode 0)", "stand-in")
    keep = slot_mapping.reshape(-1) >= 0
    slots = slot_mapping.reshape(-1)[keep].to(torch.int64)
    if slots.numel() == 0:
        return
    check(int(slots.max()) < indexer_compress_cache.shape[0], "slot outside the cache", "stand-in")
    g = torch.nn.functional.pad(x.reshape(t, d)[keep].to(F32), (0, nb * 128 - d)).reshape(-1, nb, 128)
    fin = torch.isfinite(g)
    s = torch.where(fin, g.abs(), torch.zeros_like(g)).amax(-1) / fmax
    bits = s.view(torch.int32)
    if quant_mode == 0:
        exp = (bits >> 23) & 0xFF
        if round_scale:  # 2**ceil(log2(scale)); a zero scale stays zero
            exp = exp + ((bits & 0x7FFFFF) != 0).to(torch.int32)
            s = (exp << 23).view(F32)
    q = torch.where(fin, g / s[..., None], g).clamp(-fmax, fmax)
    q = torch.nan_to_num(q, nan=0.0).reshape(-1, nb * 128)[:, :d]
    indexer_compress_cache[slots] = q.to(indexer_compress_cache.dtype)
    if quant_mode == 1:
        indexer_compress_scale[slots] = s
    else:
        indexer_compress_scale.view(torch.uint8)[slots] = exp.to(torch.uint8)
