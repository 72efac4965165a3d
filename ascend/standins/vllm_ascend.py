"""vllm-ascend `torch.ops._C_ascend` custom kernels the torch backend lowers to, as CPU stand-ins.

Defined from the `ops.def(...)` strings of vllm-ascend csrc/torch_binding.cpp (snapshot 182b75e, kept in
ascend/schemas/vllm_ascend.yaml), with the binding's host-side TORCH_CHECKs mirrored line by line (BINDING:<line>
cites csrc/torch_binding.cpp at that snapshot). The math follows the kernels' golden references (vllm-ascend
tests/e2e/nightly/single_node/ops/singlecard_ops/test_npu_hc_pre.py, cann-recipes-infer ops/ascendc/examples);
tests/test_standin_goldens.py holds the stand-ins to those goldens and criteria. Used only when no custom-op
package is installed.

The V4 attention-side kernels (compressor(+_metadata), npu_sparse_attn_sharedkv(+_metadata),
npu_vllm_quant_lightning_indexer(+_metadata), npu_scatter_nd_update_v2) live in ascend/standins/v4_attention.py,
re-exported at the end of this module so the backend finds the whole `_C_ascend` surface here.
"""

from __future__ import annotations

import torch

from .common import F32, gating_norm, gating_top_k, sinkhorn
from .schema import StandinLibrary, check

__version__ = "standin"
STANDIN = True
LIB = StandinLibrary("vllm_ascend")
SRC = "vllm-ascend@182b75e csrc/torch_binding.cpp"
# npu_hc_pre_v2's limits (BINDING:1289-1292: HC_PRE_HC_LIMIT, HC_PRE_D_LIMIT(_EXTEND), HC_PRE_MIX_HC_LIMIT)
HC_PRE_HC = 4
HC_PRE_D = (4096, 7168)
HC_PRE_MIX = 24
GATING_MAX_EXPERTS = 2048  # BINDING:737


def _b(line: int | str) -> str:
    return f"{SRC}:{line}"


@LIB.impl("moe_gating_top_k_hash")
def moe_gating_top_k_hash(x: torch.Tensor, k: int, bias: torch.Tensor | None = None,
                          input_ids: torch.Tensor | None = None, tid2eid: torch.Tensor | None = None,
                          k_group: int = 1, group_count: int = 1, routed_scaling_factor: float = 1.0,
                          eps: float = 1e-20, group_select_mode: int = 0, renorm: int = 0, norm_type: int = 0,
                          out_flag: bool = False) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """V4 router: norm = softmax (0), sigmoid (1) or sqrt(softplus) (2) of x [T, E]; ids = tid2eid[input_ids]
    when the hash table is given, else the group-limited top-k of norm + bias; y = norm at ids, divided by
    (sum + eps) for norm_type 1 and 2, times routed_scaling_factor.
    Returns (y like x, int32 ids [T, k], float32 norm [T, E]; norm's values are defined only with out_flag)."""
    check(x.dim() == 2, f"x must be 2D, but got dim={x.dim()}", _b(712))
    check(x.dtype in (torch.float16, torch.float32, torch.bfloat16),
          f"x dtype must be float16/float32/bfloat16, but got {x.dtype}", _b(713))
    check(k > 0, f"k must be > 0, but got k={k}", _b(717))
    check(k_group >= 1, f"k_group must be >= 1, but got k_group={k_group}", _b(718))
    check(group_count >= 1, f"group_count must be >= 1, but got group_count={group_count}", _b(719))
    check(group_select_mode in (0, 1), f"group_select_mode must be 0 or 1, but got {group_select_mode}", _b(721))
    check(renorm == 0, f"renorm can only be 0 currently, but got {renorm}", _b(723))
    check(norm_type in (0, 1, 2), f"norm_type must be 0 (softmax) or 1 (sigmoid) or 2 (softplus), but got "
                                  f"{norm_type}", _b(725))
    check(eps > 0.0, f"eps must be > 0, but got {eps}", _b(728))
    check(routed_scaling_factor > 0.0, f"routed_scaling_factor must be > 0, but got {routed_scaling_factor}",
          _b(729))
    rows, E = x.shape
    check(E > 0, "expert_num must be > 0", _b(736))
    check(E <= GATING_MAX_EXPERTS, f"expert_num (E) must be <= 2048, but got {E}", _b(737))
    if bias is not None:
        check(bias.dim() == 1, f"bias must be 1D, but got dim={bias.dim()}", _b(742))
        check(bias.shape[0] == E, f"bias.size(0) must equal expert_num. bias.size(0)={bias.shape[0]}, "
                                  f"expert_num={E}", _b(743))
        check(bias.dtype == x.dtype, f"bias dtype must equal x dtype. x={x.dtype}, bias={bias.dtype}", _b(746))
    if input_ids is not None:
        check(input_ids.dtype in (torch.int32, torch.int64),
              f"input_ids dtype must be int32 or int64, but got {input_ids.dtype}", _b(753))
        check(input_ids.numel() == rows, f"input_ids.numel() must equal x.size(0). input_ids.numel()="
                                         f"{input_ids.numel()}, rows={rows}", _b(755))
    if tid2eid is not None:
        check(tid2eid.dtype in (torch.int32, torch.int64),
              f"tid2eid dtype must be int32 or int64, but got {tid2eid.dtype}", _b(762))
        check(tid2eid.dim() >= 1, f"tid2eid must have dim>=1, but got dim={tid2eid.dim()}", _b(764))
    # the kernel's own (aclnn) limits on the group split, as the torch_npu doc of npu_moe_gating_top_k states them
    check(E % group_count == 0 and E // group_count > 2 and k_group <= group_count
          and k <= E // group_count * k_group, f"k={k}, k_group={k_group}, group_count={group_count} do not fit "
                                               f"{E} experts", "torch-npu 2.14.0 _op_plugin_docs.py:10815")
    norm = gating_norm(x.to(F32), norm_type)
    y, idx = gating_top_k(norm, k, bias, input_ids, tid2eid, k_group, group_count, group_select_mode,
                          norm_type != 0, routed_scaling_factor, eps)
    return y.to(x.dtype), idx.to(torch.int32), norm


def check_hc_pre(x: torch.Tensor, hc_fn: torch.Tensor, hc_scale: torch.Tensor, hc_base: torch.Tensor,
                 hc_mult: int) -> None:
    """check_hc_pre_shape_and_dtype (BINDING:1322-1359)."""
    nd = x.dim()
    check(nd in (3, 4), f"Input tensor x's dim num should be 3 or 4, actual {nd}.", _b(1331))
    for i in range(nd):
        check(x.shape[i] > 0, f"Input tensor x's shape should be positive, but x.shape[{i}] is {x.shape[i]}.",
              _b(1333))
    hc, d = (x.shape[2], x.shape[3]) if nd == 4 else (x.shape[1], x.shape[2])
    check(hc_mult == HC_PRE_HC, f"hc_mult only supports {HC_PRE_HC}, actual {hc_mult}.", _b(1339))
    check(hc == HC_PRE_HC, f"The hc of x only supports {HC_PRE_HC}, actual {hc}.", _b(1340))
    check(d in HC_PRE_D, f"The d of x only supports 4096 or 7168, actual {d}.", _b(1341))
    check(hc_fn.dim() == 2, f"Input tensor hc_fn's dim num should be 2, actual {hc_fn.dim()}.", _b(1343))
    check(hc_fn.shape[0] == HC_PRE_MIX, f"The hc_fn.shape[0] only supports {HC_PRE_MIX}, actual {hc_fn.shape[0]}.",
          _b(1344))
    check(hc_fn.shape[1] == hc * d, f"The hc_fn.shape[1] should be hc * d, actual hc_fn.shape[1] is "
                                    f"{hc_fn.shape[1]}, hc is {hc}, d is {d}.", _b(1346))
    check(hc_scale.dim() == 1, f"Input tensor hc_scale's dim num should be 1, actual {hc_scale.dim()}.", _b(1348))
    check(hc_scale.shape[0] == 3, f"Input tensor hc_scale's shape should be [3], actual [{hc_scale.shape[0]}].",
          _b(1349))
    check(hc_base.dim() == 1, f"Input tensor hc_base's dim num should be 1, actual {hc_base.dim()}.", _b(1351))
    check(hc_base.shape[0] == HC_PRE_MIX, f"The hc_base.shape[0] only supports {HC_PRE_MIX}, actual "
                                          f"{hc_base.shape[0]}.", _b(1352))
    check(x.dtype == torch.bfloat16, "x's dtype should be BFLOAT16.", _b(1355))
    check(hc_fn.dtype == F32, "hc_fn's dtype should be FLOAT32.", _b(1356))
    check(hc_scale.dtype == F32, "hc_scale's dtype should be FLOAT32.", _b(1357))
    check(hc_base.dtype == F32, "hc_base's dtype should be FLOAT32.", _b(1358))


def hc_pre_math(x: torch.Tensor, hc_fn: torch.Tensor, hc_scale: torch.Tensor, hc_base: torch.Tensor, n: int,
                iters: int, norm_eps: float, hc_eps: float) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """mixes = (x_flat @ hc_fn^T) * rsqrt(mean(x_flat^2) + norm_eps); pre = sigmoid(mixes[:n] s0 + b[:n]) + hc_eps;
    post = 2 sigmoid(mixes[n:2n] s1 + b[n:2n]); comb = Sinkhorn(mixes[2n:] s2 + b[2n:]); y = sum_j pre_j x_j,
    over any leading axes of x [..., n, D]. Returns (y float32, post, comb)."""
    lead, D = x.shape[:-2], x.shape[-1]
    xf = x.to(F32).reshape(-1, n, D)
    flat = xf.reshape(-1, n * D)
    r = torch.rsqrt(torch.mean(flat * flat, dim=-1, keepdim=True) + norm_eps)
    m = (flat @ hc_fn.to(F32).t()) * r
    pre = torch.sigmoid(m[:, :n] * hc_scale[0] + hc_base[:n]) + hc_eps
    post = 2.0 * torch.sigmoid(m[:, n:2 * n] * hc_scale[1] + hc_base[n:2 * n])
    comb = sinkhorn((m[:, 2 * n:] * hc_scale[2] + hc_base[2 * n:]).reshape(-1, n, n), iters, hc_eps)
    y = torch.einsum("tn,tnd->td", pre, xf)
    return y.reshape(*lead, D), post.reshape(*lead, n), comb.reshape(*lead, n, n)


@LIB.impl("npu_hc_pre_v2")
def npu_hc_pre_v2(x: torch.Tensor, hc_fn: torch.Tensor, hc_scale: torch.Tensor, hc_base: torch.Tensor,
                  hc_mult: int, hc_sinkhorn_iters: int, norm_eps: float,
                  hc_eps: float) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """mHC pre-mapping with Sinkhorn (A2/A3). x [T, hc, D] or [B, S, hc, D] bf16; hc_fn [24, hc*D], hc_scale [3],
    hc_base [24] float32 (hc 4, D 4096 or 7168). Returns (y bf16 [T, D] / [B, S, D], post f32 [.., hc],
    comb f32 [.., hc, hc]) as construct_hc_pre_output_tensor (BINDING:1294) allocates them."""
    check_hc_pre(x, hc_fn, hc_scale, hc_base, hc_mult)
    y, post, comb = hc_pre_math(x, hc_fn, hc_scale, hc_base, hc_mult, hc_sinkhorn_iters, norm_eps, hc_eps)
    return y.to(torch.bfloat16), post, comb


def check_hc_post(x: torch.Tensor, residual: torch.Tensor, post: torch.Tensor, comb: torch.Tensor) -> None:
    """check_hc_post_shape_and_dtype (BINDING:1240-1274): x [b, s, d], residual [b, s, hc, d], post [b, s, hc],
    comb [b, s, hc, hc]."""
    check(x.dim() == 3, f"Input tensor x's dim num should be 3, actual {x.dim()}.", _b(1242))
    for i in range(3):
        check(x.shape[i] > 0, f"Input tensor x's shape should be positive, but x.shape[{i}] is :{x.shape[i]}.",
              _b(1244))
    b, s, d = x.shape
    check(residual.dim() == 4, f"Input tensor residual's dim num should be 4, actual {residual.dim()}.", _b(1250))
    hc = residual.shape[2]
    check(hc > 0, f"The hc of residual should be positive, actual {hc}.", _b(1252))
    check(tuple(residual.shape[:2]) == (b, s) and residual.shape[3] == d,
          f"residual {tuple(residual.shape)} must be [batch={b}, sequence={s}, hc, d={d}]", _b("1253-1255"))
    check(post.dim() == 3, f"Input tensor post's dim num should be 3, actual {post.dim()}.", _b(1257))
    check(tuple(post.shape) == (b, s, hc), f"post {tuple(post.shape)} must be [{b}, {s}, {hc}]", _b("1258-1260"))
    check(comb.dim() == 4, f"Input tensor com's dim num should be 4, actual {comb.dim()}.", _b(1262))
    check(tuple(comb.shape) == (b, s, hc, hc), f"com {tuple(comb.shape)} must be [{b}, {s}, {hc}, {hc}]",
          _b("1263-1266"))
    low = (torch.float32, torch.float16, torch.bfloat16)
    check(x.dtype in low, "x should be FLOAT16, BFLOAT16, or FLOAT32.", _b(1268))
    check(residual.dtype == x.dtype, "x's dtype should be equal to residual's dtype.", _b(1270))
    check(post.dtype in low, "post should be FLOAT16, BFLOAT16, or FLOAT32.", _b(1271))
    check(comb.dtype == post.dtype, "com's dtype should be equal to post's dtype.", _b(1273))


def hc_post_math(x: torch.Tensor, residual: torch.Tensor, post: torch.Tensor, comb: torch.Tensor) -> torch.Tensor:
    """out[.., i, :] = post_i * x + sum_j comb[.., j, i] * residual[.., j, :] (comb used transposed, as the
    reference's (comb[..., None] * residual[..., None, :]).sum(-3)), in float32, any leading axes."""
    return (post.to(F32).unsqueeze(-1) * x.to(F32).unsqueeze(-2)
            + torch.matmul(comb.to(F32).transpose(-1, -2), residual.to(F32)))


@LIB.impl("npu_hc_post")
def npu_hc_post(x: torch.Tensor, residual: torch.Tensor, post: torch.Tensor, comb: torch.Tensor) -> torch.Tensor:
    """mHC post-mapping (A2/A3): x [b, s, d] the layer output, residual [b, s, hc, d], post [b, s, hc],
    comb [b, s, hc, hc]; out [b, s, hc, d] in residual's dtype (construct_hc_post_output_tensor, BINDING:1227)."""
    check_hc_post(x, residual, post, comb)
    return hc_post_math(x, residual, post, comb).to(residual.dtype)


FUNCTIONS = tuple(sorted(LIB.schemas))


# the V4 attention-side kernels, same library and namespace (ascend/standins/v4_attention.py)
from .v4_attention import (  # noqa: E402, F401
    compressor,
    compressor_metadata,
    indexer_compress_epilog_v2,
    kv_compress_epilog,
    npu_scatter_nd_update_v2,
    npu_sparse_attn_sharedkv,
    npu_sparse_attn_sharedkv_metadata,
    npu_vllm_quant_lightning_indexer,
    npu_vllm_quant_lightning_indexer_metadata,
)

