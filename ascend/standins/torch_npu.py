"""torch_npu (op-plugin) kernels the torch backend calls, as CPU stand-ins bound to the torch-npu 2.14.0 schemas.

Each op is defined from its schema in ascend/schemas/torch_npu.yaml (see schema.py), so argument names, order,
keyword-only markers, defaults and return arity are the real ones. Bodies follow the op docs shipped in the same
wheel (torch_npu/_op_plugin_docs.py, doc line cited per op as DOC:<line>) and raise where the doc says the op
rejects an input. Internals compute in float32 (like the NPU's vector units); integer GEMMs are exact.

Not covered (NotImplementedError rather than a guess): drop/pad and static-quant modes of init_routing, int4 /
fp8 inputs (the x1_dtype / x2_dtype family), graph-mode specifics.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from .common import F32 as _F32
from .common import FLOAT as _FLOAT
from .common import LOW as _LOW
from .common import dtypes as _dtypes
from .common import gating_norm, gating_top_k, sinkhorn
from .common import int_gemm as _int_gemm
from .common import need as _need
from .common import per_token_int8 as _per_token_int8
from .schema import StandinLibrary

__version__ = "standin"
STANDIN = True  # lets callers (and `dsv4 doctor`) tell this module from the real torch_npu
DOC = "torch-npu 2.14.0 torch_npu/_op_plugin_docs.py"
LIB = StandinLibrary("torch_npu")
_EMPTY = torch.empty(0)


@LIB.impl("npu_rms_norm")
def npu_rms_norm(self: torch.Tensor, gamma: torch.Tensor, epsilon: float = 1e-6) -> tuple[torch.Tensor, torch.Tensor]:
    """y = x / sqrt(mean(x^2) + eps) * gamma over the trailing gamma.dim() axes; returns (y, rstd) (DOC:3438).

    rstd is float32 with x's shape, the normalized axes kept as size 1."""
    x = self
    _dtypes("npu_rms_norm x", x, _FLOAT)
    nd = gamma.dim()
    _need(tuple(x.shape[-nd:]) == tuple(gamma.shape), f"npu_rms_norm: gamma {tuple(gamma.shape)} must match the "
                                                      f"trailing dims of x {tuple(x.shape)}")
    xf = x.to(_F32)
    dims = tuple(range(-nd, 0))
    rstd = 1.0 / torch.sqrt(torch.mean(xf * xf, dim=dims, keepdim=True) + epsilon)
    y = (xf * rstd) * gamma.to(_F32)
    return y.to(x.dtype), rstd


@LIB.impl("npu_interleave_rope")
def npu_interleave_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """RoPE on interleaved pairs: q = x.reshape(B,N,S,D/2,2).transpose(-1,-2).reshape(B,N,S,D), then
    q*cos + RotateHalf(q)*sin. The result is in the de-interleaved (rotate-half) layout: element i < D/2
    is the rotated even member of pair i, element D/2 + i the rotated odd member.

    x [B, N, S, D]; cos, sin [B, 1, S or 1, D]. Documented limits: D == 64; cos/sin N == 1;
    fp16/bf16 on A2/A3, also fp32 on 950 (the SoC table enforces the per-SoC dtype)."""
    _need(x.dim() == 4 and cos.dim() == 4 and sin.dim() == 4, "npu_interleave_rope: x, cos, sin must be 4-D")
    _dtypes("npu_interleave_rope x", x, _FLOAT)
    B, N, S, D = x.shape
    _need(D == 64, f"npu_interleave_rope: D must be 64, got {D}")
    _need(cos.shape == sin.shape, "npu_interleave_rope: cos and sin shapes differ")
    _need(cos.shape[0] == B and cos.shape[1] == 1 and cos.shape[2] in (1, S) and cos.shape[3] == D,
          f"npu_interleave_rope: cos must be [B, 1, S or 1, D], got {tuple(cos.shape)} for x {tuple(x.shape)}")
    _need(cos.dtype == x.dtype and sin.dtype == x.dtype, "npu_interleave_rope: cos/sin dtype must match x")
    q = x.to(_F32).reshape(B, N, S, D // 2, 2).transpose(-1, -2).reshape(B, N, S, D)
    rot = torch.cat([-q[..., D // 2:], q[..., : D // 2]], dim=-1)
    return (q * cos.to(_F32) + rot * sin.to(_F32)).to(x.dtype)


@LIB.impl("npu_swiglu")
def npu_swiglu(self: torch.Tensor, dim: int = -1) -> torch.Tensor:
    """Split `dim` into halves a, b; silu(a) * b (DOC:4389)."""
    x = self
    _dtypes("npu_swiglu x", x, _FLOAT)
    _need(x.shape[dim] % 2 == 0, f"npu_swiglu: dim {dim} of {tuple(x.shape)} is odd")
    a, b = x.to(_F32).chunk(2, dim=dim)
    return (torch.nn.functional.silu(a) * b).to(x.dtype)


# ---- quantization -----------------------------------------------------------------------------------------
@LIB.impl("npu_dynamic_quant")
def npu_dynamic_quant(input: torch.Tensor, *, smooth_scales: torch.Tensor | None = None,  # noqa: A002
                      group_index: torch.Tensor | None = None, dst_type: torch.dtype | None = None,
                      quant_mode: str = "pertoken", dst_type_max: float = 0.0) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-token symmetric int8: scale = rowmax(|x * smooth|) / 127, y = round(x * smooth / scale).

    input fp16/bf16 with dim > 1 (DOC:4654); returns (int8 y like input, float32 scale = input.shape[:-1]).
    group_index (MoE) applies smooth_scales[i] to rows [group_index[i-1], group_index[i])."""
    _dtypes("npu_dynamic_quant input", input, _LOW)
    _need(input.dim() > 1, "npu_dynamic_quant: input must have more than one dimension")
    if dst_type not in (None, torch.int8):
        raise NotImplementedError(f"npu_dynamic_quant stand-in: dst_type {dst_type} (only int8)")
    if quant_mode != "pertoken":
        raise NotImplementedError("npu_dynamic_quant stand-in: only quant_mode='pertoken' (A2/A3 ignore it)")
    xf = input.to(_F32)
    if smooth_scales is not None:
        if group_index is None:
            _need(smooth_scales.dim() == 1 and smooth_scales.shape[0] == input.shape[-1],
                  "npu_dynamic_quant: smooth_scales must be [K] without group_index")
            xf = xf * smooth_scales.to(_F32)
        else:
            rows = xf.reshape(-1, xf.shape[-1])
            _need(smooth_scales.dim() == 2 and group_index.shape == (smooth_scales.shape[0],),
                  "npu_dynamic_quant: with group_index, smooth_scales must be [E, K] and group_index [E]")
            ends = group_index.to(torch.int64).tolist()
            _need(ends == sorted(ends) and (not ends or ends[-1] == rows.shape[0]),
                  "npu_dynamic_quant: group_index must be ascending and end at the row count")
            starts = [0] + ends[:-1]
            factor = torch.ones_like(rows)
            for i, (a, b) in enumerate(zip(starts, ends, strict=True)):
                factor[a:b] = smooth_scales[i].to(_F32)
            xf = (rows * factor).reshape(xf.shape)
    elif group_index is not None:
        raise RuntimeError("npu_dynamic_quant: group_index needs smooth_scales")
    return _per_token_int8(xf)


@LIB.impl("npu_quant_matmul")
def npu_quant_matmul(x1: torch.Tensor, x2: torch.Tensor, scale: torch.Tensor, *, offset: torch.Tensor | None = None,
                     pertoken_scale: torch.Tensor | None = None, bias: torch.Tensor | None = None,
                     output_dtype: torch.dtype | None = None, x1_dtype: torch.dtype | None = None,
                     x2_dtype: torch.dtype | None = None, pertoken_scale_dtype: torch.dtype | None = None,
                     scale_dtype: torch.dtype | None = None, group_sizes: list[int] | None = None,
                     y_scale: torch.Tensor | None = None) -> torch.Tensor:
    """int8 x1 [..., M, K] @ int8 x2 [..., K, N] with an exact int32 accumulator, then dequantized.

    x2 is the weight as [K, N] (on the NPU usually the transposed view of an [N, K] weight).
    * output_dtype int32: the accumulator (+ int32 bias), undequantized (the dequant then happens outside;
      `scale` is still required by the signature).
    * pertoken_scale [M] given: y = (acc * pertoken_scale) * scale (per channel [N] or [1]), bf16/fp16 out.
      The float order is the one ops/quant.py fixes as golden (the doc's formula does not pin it).
    * otherwise: y = acc * scale + offset, fp16/bf16, or int8 when output_dtype is None/int8.
    Documented limits (DOC:4952): last dims of x1 and x2 <= 65535; int32 (packed int4) inputs are not covered."""
    if any(v is not None for v in (x1_dtype, x2_dtype, pertoken_scale_dtype, scale_dtype, y_scale)):
        raise NotImplementedError("npu_quant_matmul stand-in: x1/x2/scale dtype overrides (fp8/int4) and y_scale")
    if x1.dtype == torch.int32 or x2.dtype == torch.int32:
        raise NotImplementedError("npu_quant_matmul stand-in: int4 packed in int32 is not covered")
    _need(x1.dtype == torch.int8 and x2.dtype == torch.int8, "npu_quant_matmul: x1 and x2 must both be int8")
    _need(2 <= x1.dim() <= 6 and 2 <= x2.dim() <= 6, "npu_quant_matmul: x1, x2 must be 2-6 dimensional")
    _need(x1.shape[-1] == x2.shape[-2], f"npu_quant_matmul: K differs: {tuple(x1.shape)} @ {tuple(x2.shape)}")
    _need(x1.shape[-1] <= 65535 and x2.shape[-1] <= 65535, "npu_quant_matmul: last dims must be <= 65535")
    N = x2.shape[-1]
    _need(scale.dim() == 1 and scale.shape[0] in (1, N), f"npu_quant_matmul: scale must be [1] or [{N}]")
    if group_sizes is not None:
        raise NotImplementedError("npu_quant_matmul stand-in: group_sizes")
    acc = _int_gemm(x1, x2)
    if bias is not None and bias.dtype == torch.int32:
        acc = acc + bias
    if output_dtype == torch.int32:
        _need(pertoken_scale is None and offset is None, "npu_quant_matmul: int32 output takes no pertoken/offset")
        return acc
    y = acc.to(_F32)
    if pertoken_scale is not None:
        _need(output_dtype in _LOW, "npu_quant_matmul: with pertoken_scale the output is bfloat16 or float16")
        _need(pertoken_scale.dim() == 1 and pertoken_scale.shape[0] == x1.shape[-2],
              f"npu_quant_matmul: pertoken_scale must be [{x1.shape[-2]}]")
        y = y * pertoken_scale.to(_F32).unsqueeze(-1)
    y = y * scale.to(_F32)
    if offset is not None:
        y = y + offset.to(_F32)
    if bias is not None and bias.dtype != torch.int32:
        y = y + bias.to(_F32)
    if output_dtype in (None, torch.int8):
        return torch.clamp(torch.round(y), -128, 127).to(torch.int8)
    _need(output_dtype in _LOW, f"npu_quant_matmul: output_dtype {output_dtype} not supported")
    return y.to(output_dtype)


# ---- MoE routing ---------------------------------------------------------------------------------------------
def _check_gating(x: torch.Tensor, k: int, bias: torch.Tensor | None, k_group: int, group_count: int,
                  renorm: int, max_experts: int) -> None:
    _need(x.dim() == 2, "gating: x must be 2-D [T, E]")
    _dtypes("gating x", x, _FLOAT)
    E = x.shape[1]
    _need(E <= max_experts, f"gating: {E} experts > {max_experts}")
    _need(renorm == 0, "gating: only renorm=0 is supported")
    _need(group_count > 0 and E % group_count == 0 and E // group_count > 2,
          f"gating: {E} experts do not split into {group_count} groups of more than 2")
    _need(1 <= k_group <= group_count, "gating: k_group must be in [1, group_count]")
    _need(1 <= k <= E // group_count * k_group, f"gating: k={k} out of range")
    if bias is not None:
        _need(bias.shape == (E,) and bias.dtype == x.dtype, "gating: bias must be [E] with x's dtype")


@LIB.impl("npu_moe_gating_top_k")
def npu_moe_gating_top_k(x: torch.Tensor, k: int, *, bias: torch.Tensor | None = None,
                         input_ids: torch.Tensor | None = None, tid2eid: torch.Tensor | None = None,
                         k_group: int = 1, group_count: int = 1, group_select_mode: int = 0, renorm: int = 0,
                         norm_type: int = 0, out_flag: bool = False, routed_scaling_factor: float = 1.0,
                         eps: float = 1e-20) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
    """Router: norm = softmax (norm_type 0) or sigmoid (1) of x [T, E]; ids = group-limited top-k of
    norm + bias (or tid2eid[input_ids] in hash mode); y = norm at ids, divided by (sum + eps) for sigmoid,
    times routed_scaling_factor (DOC:10815). Returns (y like x, int32 ids [T, k], float32 norm [T, E]; the real
    op always allocates norm, its values are defined only with out_flag)."""
    _check_gating(x, k, bias, k_group, group_count, renorm, 2048)
    _need(norm_type in (0, 1), f"npu_moe_gating_top_k: norm_type {norm_type} (0 softmax, 1 sigmoid)")
    norm = gating_norm(x.to(_F32), norm_type)
    y, idx = gating_top_k(norm, k, bias, input_ids, tid2eid, k_group, group_count, group_select_mode,
                          norm_type == 1, routed_scaling_factor, eps)
    return y.to(x.dtype), idx.to(torch.int32), norm


@LIB.impl("npu_moe_init_routing_v2")
def npu_moe_init_routing_v2(x: torch.Tensor, expert_idx: torch.Tensor, *, scale: torch.Tensor | None = None,
                            offset: torch.Tensor | None = None, active_num: int = -1, expert_capacity: int = -1,
                            expert_num: int = -1, drop_pad_mode: int = 0, expert_tokens_num_type: int = 0,
                            expert_tokens_num_flag: bool = False, quant_mode: int = -1,
                            active_expert_range: Sequence[int] = (), row_idx_type: int = 0,
                            x_dtype: torch.dtype | None = None
                            ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Permute token copies into expert-contiguous order (dropless mode), DOC:11081.

    The T*k copies (flat index t*k + j, row-major over expert_idx [T, k]) are stably sorted by expert id;
    only ids in active_expert_range [start, end) are kept (expert parallelism: the local experts).
    Returns (expanded_x [T*k, H] whose first n_active rows are valid (the rest undefined; zeros here),
    expanded_row_idx int32 [T*k], counts int64 [end-start] (expert_tokens_num_type 1), expanded_scale float32
    [T*k]). expanded_row_idx with row_idx_type 0 (gather index) maps each source copy to its row in expanded_x,
    -1 for copies outside the range; with row_idx_type 1 (scatter index) it lists the source copy of each
    expanded row. quant_mode 1 also quantizes expanded_x per row to int8 (scale = rowmax/127).
    The doc: "drop_pad_mode 当前仅支持0", "expert_tokens_num_type 当前仅支持1和2", "expert_tokens_num_flag 当前仅支持
    True", "quant_mode 当前仅支持-1和1" (0, static quant, is the 2.9.0 wheel's default: callers pass it explicitly)."""
    _need(x.dim() == 2 and expert_idx.dim() == 2 and x.shape[0] == expert_idx.shape[0],
          "npu_moe_init_routing_v2: x [T, H] and expert_idx [T, k] required")
    _dtypes("npu_moe_init_routing_v2 x", x, (*_FLOAT, torch.int8))
    _need(expert_idx.dtype == torch.int32, "npu_moe_init_routing_v2: expert_idx must be int32")
    _need(drop_pad_mode == 0, f"npu_moe_init_routing_v2: drop_pad_mode {drop_pad_mode}; only 0 is supported")
    _need(quant_mode in (-1, 1), f"npu_moe_init_routing_v2: quant_mode {quant_mode}; only -1 and 1 are supported "
                                 "(0, static quant, is not)")
    _need(expert_tokens_num_flag, "npu_moe_init_routing_v2: expert_tokens_num_flag must be True")
    _need(expert_tokens_num_type in (1, 2), f"npu_moe_init_routing_v2: expert_tokens_num_type "
                                            f"{expert_tokens_num_type}; only 1 (count) and 2 (key_value)")
    if expert_tokens_num_type == 2 or x_dtype is not None:
        raise NotImplementedError("npu_moe_init_routing_v2 stand-in: key_value counts / x_dtype")
    _need(expert_num > 0, "npu_moe_init_routing_v2: expert_num must be > 0")
    _need(expert_num <= 10240, "npu_moe_init_routing_v2: expert_num must be <= 10240")
    _need(quant_mode == -1 or x.dtype != torch.int8, "npu_moe_init_routing_v2: int8 x cannot be quantized again")
    T, k = expert_idx.shape
    if len(active_expert_range):
        _need(len(active_expert_range) == 2, "npu_moe_init_routing_v2: active_expert_range is [start, end]")
        start, end = int(active_expert_range[0]), int(active_expert_range[1])
    else:
        start, end = 0, expert_num
    _need(0 <= start < end <= expert_num, "npu_moe_init_routing_v2: active_expert_range must lie in [0, expert_num]")
    flat = expert_idx.reshape(-1).to(torch.int64)
    # the doc: ids must not exceed the expert count (ids below the range, e.g. -1, are simply not active)
    _need(T * k == 0 or int(flat.max()) < expert_num, "npu_moe_init_routing_v2: expert ids must be < expert_num")
    in_range = (flat >= start) & (flat < end)
    n_active = int(in_range.sum())
    # ids below the range sort last (the golden maps them to INT32_MAX); ids above it already sort after it
    key = torch.where(flat < start, torch.iinfo(torch.int32).max, flat)
    order = torch.sort(key, stable=True).indices
    if active_num > 0:
        n_active = min(n_active, active_num)
    src = order[:n_active]
    if row_idx_type == 1:
        row_idx = order.to(torch.int32)
    else:
        _need(row_idx_type == 0, f"npu_moe_init_routing_v2: row_idx_type {row_idx_type} (0 gather, 1 scatter)")
        row_idx = torch.full((T * k,), -1, dtype=torch.int32)
        row_idx[src] = torch.arange(n_active, dtype=torch.int32)
    valid = x[src // k] if k else x[:0]
    counts = torch.bincount(flat[src] - start, minlength=end - start).to(torch.int64)
    expanded_scale = torch.zeros(T * k, dtype=_F32)
    if quant_mode == 1:
        xf = valid.to(_F32)
        if scale is not None:
            _need(scale.dim() == 2 and scale.shape[1] == x.shape[1] and scale.shape[0] in (1, end - start),
                  "npu_moe_init_routing_v2: dynamic-quant scale must be [1, H] or [end-start, H]")
            xf = xf * (scale[0] if scale.shape[0] == 1 else scale[flat[src] - start]).to(_F32)
        valid, qs = _per_token_int8(xf)
        expanded_scale[:n_active] = qs
    elif scale is not None:
        _need(scale.dim() == 1 and scale.shape[0] == T, "npu_moe_init_routing_v2: scale must be [T]")
        expanded_scale[:n_active] = scale[src // k].to(_F32)
    expanded_x = torch.zeros((T * k, x.shape[1]), dtype=valid.dtype)
    expanded_x[:n_active] = valid
    return expanded_x, row_idx, counts, expanded_scale


def _group_offsets(group_list: torch.Tensor, group_list_type: int, n_groups: int, M: int) -> list[int]:
    """Row offsets [0, e_1, ..., e_G] of the groups, from cumsum (type 0) or counts (type 1); they may end
    before M (trailing rows belong to no group)."""
    _need(group_list.dim() == 1 and group_list.dtype == torch.int64, "npu_grouped_matmul: group_list must be a 1-D "
                                                                     "int64 tensor")
    vals = group_list.tolist()
    _need(len(vals) == n_groups, f"npu_grouped_matmul: group_list has {len(vals)} entries for {n_groups} groups")
    _need(all(v >= 0 for v in vals), "npu_grouped_matmul: group_list must be non-negative")
    if group_list_type == 1:
        ends, acc = [], 0
        for v in vals:
            acc += v
            ends.append(acc)
    elif group_list_type == 0:
        ends = vals
        _need(all(a <= b for a, b in zip(ends, ends[1:], strict=False)), "npu_grouped_matmul: cumsum must not "
                                                                          "decrease")
    else:
        raise NotImplementedError(f"npu_grouped_matmul stand-in: group_list_type {group_list_type}")
    _need(not ends or ends[-1] <= M, f"npu_grouped_matmul: groups cover {ends[-1] if ends else 0} rows, x has {M}")
    return [0, *ends]


@LIB.impl("npu_grouped_matmul")
def npu_grouped_matmul(x: list[torch.Tensor], weight: list[torch.Tensor], *, bias: list[torch.Tensor] | None = None,
                       scale: list[torch.Tensor] | None = None, offset: list[torch.Tensor] | None = None,
                       antiquant_scale: list[torch.Tensor] | None = None,
                       antiquant_offset: list[torch.Tensor] | None = None,
                       per_token_scale: list[torch.Tensor] | None = None,
                       group_list: torch.Tensor | None = None,
                       activation_input: list[torch.Tensor] | None = None,
                       activation_quant_scale: list[torch.Tensor] | None = None,
                       activation_quant_offset: list[torch.Tensor] | None = None, split_item: int | None = 0,
                       group_type: int | None = None, group_list_type: int | None = 0, act_type: int | None = 0,
                       tuning_config: list[int] | None = None, output_dtype: torch.dtype | None = None,
                       x_dtype: torch.dtype | None = None, weight_dtype: torch.dtype | None = None,
                       scale_dtype: torch.dtype | None = None,
                       per_token_scale_dtype: torch.dtype | None = None) -> list[torch.Tensor]:
    """Grouped GEMM split along M (group_type 0): rows [off_g, off_g+1) of the single x [M, K] times
    weight g ([K, N]; `weight` is one [G, K, N] tensor or a list of G [K, N] tensors).

    Float: y_g = x_g @ w_g (+ bias_g). Quantized (int8 x and weight): y_g = (acc_g (+ int32 bias_g))
    * scale_g * per_token_scale (formula 3 of the doc), output bf16/fp16. split_item 2/3 returns [y] with
    all groups in one [M, N] tensor, 0/1 one tensor per group. Empty groups and M = 0 are fine. The groups may
    cover fewer than M rows (init_routing's padded output); the rows past them are undefined (zeros here). DOC:5798"""
    if any(v is not None for v in (x_dtype, weight_dtype, scale_dtype, per_token_scale_dtype)):
        raise NotImplementedError("npu_grouped_matmul stand-in: x/weight/scale dtype overrides (fp8/int4)")
    if any(a is not None for a in (offset, antiquant_scale, antiquant_offset, activation_input,
                                    activation_quant_scale, activation_quant_offset)):
        raise NotImplementedError("npu_grouped_matmul stand-in: offset / antiquant / activation_* arguments")
    _need(act_type == 0, "npu_grouped_matmul stand-in: act_type must be 0")
    _need(len(x) == 1, "npu_grouped_matmul stand-in: a single x tensor (group_type 0)")
    _need(group_type == 0 and group_list is not None, "npu_grouped_matmul stand-in: group_type 0 with a group_list")
    xs = x[0]
    _need(xs.dim() == 2, "npu_grouped_matmul: x must be 2-D")
    if len(weight) == 1 and weight[0].dim() == 3:
        ws = list(weight[0].unbind(0))
        _need(len(ws) <= 1024, "npu_grouped_matmul: at most 1024 groups")
    else:
        ws = list(weight)
        _need(all(w.dim() == 2 for w in ws) and len(ws) <= 128, "npu_grouped_matmul: at most 128 [K, N] weights")
        _need(len({w.shape[1] for w in ws}) <= 1, "npu_grouped_matmul: every weight needs the same N")
    G = len(ws)
    M, K = xs.shape
    _need(all(w.shape[0] == K for w in ws), f"npu_grouped_matmul: weights must be [K={K}, N]")
    _need(K < 65536, "npu_grouped_matmul: inner axis must be < 65536")
    off = _group_offsets(group_list, group_list_type, G, M)
    quant = xs.dtype == torch.int8
    N = ws[0].shape[1] if G else 0
    if quant:
        _need(all(w.dtype == torch.int8 for w in ws), "npu_grouped_matmul: int8 x needs int8 weights")
        _need(scale is not None and output_dtype in _LOW, "npu_grouped_matmul: int8 GEMM needs scale and a bf16/fp16 "
                                                         "output_dtype")
        sc = list(scale[0].unbind(0)) if len(scale) == 1 and scale[0].dim() == 2 else list(scale)
        pts = per_token_scale[0].to(_F32) if per_token_scale is not None else None
        out_dtype = output_dtype
    else:
        _dtypes("npu_grouped_matmul x", xs, _FLOAT)
        _need(all(w.dtype == xs.dtype for w in ws), "npu_grouped_matmul: weight dtype must match x")
        _need(output_dtype in (None, xs.dtype), "npu_grouped_matmul: float output_dtype must match x")
        if xs.dtype == torch.float32:
            _need(len(weight) == 1, "npu_grouped_matmul: float32 needs single x/weight/y tensors (A2/A3)")
        out_dtype = xs.dtype
    bs = None
    if bias is not None:
        bs = list(bias[0].unbind(0)) if len(bias) == 1 and bias[0].dim() == 2 else list(bias)
    outs = []
    for g in range(G):
        a, b = off[g], off[g + 1]
        if quant:
            acc = _int_gemm(xs[a:b], ws[g])
            if bs is not None and bs[g].dtype == torch.int32:
                acc = acc + bs[g]
            y = acc.to(_F32) * sc[g].to(_F32)
            if pts is not None:
                y = y * pts[a:b].unsqueeze(-1)
            if bs is not None and bs[g].dtype != torch.int32:
                y = y + bs[g].to(_F32)
        else:
            y = torch.matmul(xs[a:b], ws[g])
            if bs is not None:
                y = y + bs[g].to(y.dtype)
        outs.append(y.to(out_dtype))
    if split_item in (2, 3):
        y = torch.zeros((M, N), dtype=out_dtype)
        if outs:
            y[:off[-1]] = torch.cat(outs, 0)
        return [y]
    _need(split_item in (0, 1), f"npu_grouped_matmul: split_item {split_item}")
    return outs


@LIB.impl("npu_moe_finalize_routing")
def npu_moe_finalize_routing(expanded_permuted_rows: torch.Tensor, skip1: torch.Tensor | None,
                             skip2: torch.Tensor | None, bias: torch.Tensor | None, scales: torch.Tensor | None,
                             expanded_src_to_dst_row: torch.Tensor, export_for_source_row: torch.Tensor | None,
                             drop_pad_mode: int | None = 0, k: int | None = 1) -> torch.Tensor:
    """out[i] = skip1[i] + skip2[i] + sum_j scales[i, j] * (rows[map[i + j * num_rows]] + bias[expert(i, j)]),
    DOC:10598 (the map is column-major: entry i + j*num_rows is copy j of row i).

    The doc's limits: drop_pad_mode only 0; map values in [0, num_rows*K - 1] (no -1); skip1/skip2/bias/scales
    in expanded_permuted_rows' dtype; skip2 needs skip1; "when scales is None, k must be given" (k exists only
    in the torch-npu 2.14.0 schema, not in 2.9.0: callers that pass scales need no k). The k terms are added
    in ascending j."""
    rows = expanded_permuted_rows
    _need(drop_pad_mode == 0, f"npu_moe_finalize_routing: drop_pad_mode {drop_pad_mode}; only 0 is supported")
    _need(rows.dim() == 2, "npu_moe_finalize_routing: expanded_permuted_rows must be 2-D")
    _dtypes("npu_moe_finalize_routing expanded_permuted_rows", rows, _FLOAT)
    _need(expanded_src_to_dst_row.dim() == 1 and expanded_src_to_dst_row.dtype == torch.int32,
          "npu_moe_finalize_routing: expanded_src_to_dst_row must be 1-D int32")
    for name, t in (("skip1", skip1), ("skip2", skip2), ("bias", bias), ("scales", scales)):
        _need(t is None or t.dtype == rows.dtype, f"npu_moe_finalize_routing: {name} must have "
                                                  f"expanded_permuted_rows' dtype {rows.dtype}")
    _need(skip2 is None or skip1 is not None, "npu_moe_finalize_routing: skip2 needs skip1")
    K = scales.shape[1] if scales is not None else k
    NK = expanded_src_to_dst_row.shape[0]
    _need(K is not None and K > 0 and NK % K == 0, "npu_moe_finalize_routing: map length must be a multiple of K")
    num_rows, H = NK // K, rows.shape[1]
    _need(scales is None or scales.shape == (num_rows, K), f"npu_moe_finalize_routing: scales must be "
                                                           f"[{num_rows}, {K}]")
    m = expanded_src_to_dst_row.to(torch.int64)
    _need(NK == 0 or (int(m.min()) >= 0 and int(m.max()) < rows.shape[0]),
          f"npu_moe_finalize_routing: expanded_src_to_dst_row values must be in [0, {rows.shape[0] - 1}]")
    out = torch.zeros((num_rows, H), dtype=_F32)
    for t in (skip1, skip2):
        if t is not None:
            _need(t.shape == (num_rows, H), f"npu_moe_finalize_routing: skip must be [{num_rows}, {H}]")
            out = out + t.to(_F32)
    m = m.reshape(K, num_rows).t()
    rf = rows.to(_F32)
    for j in range(K):
        r = rf[m[:, j]]
        if bias is not None:
            _need(export_for_source_row is not None, "npu_moe_finalize_routing: bias needs export_for_source_row")
            r = r + bias.to(_F32)[export_for_source_row[:, j].to(torch.int64)]
        out = out + (r * scales[:, j:j + 1].to(_F32) if scales is not None else r)
    return out.to(rows.dtype)


# ---- grouped projection and mHC (950) ----------------------------------------------------------------------
@LIB.impl("npu_transpose_batchmatmul")
def npu_transpose_batchmatmul(input: torch.Tensor, weight: torch.Tensor, *,  # noqa: A002
                              bias: torch.Tensor | None = None, scale: torch.Tensor | None = None,
                              perm_x1: Sequence[int] | None = None, perm_x2: Sequence[int] | None = None,
                              perm_y: Sequence[int] | None = None, batch_split_factor: int | None = 1) -> torch.Tensor:
    """Batched matmul with transposes: (input permuted by perm_x1 -> [B, M, K]) @ weight [B, K, N] -> [B, M, N],
    permuted by perm_y ([1, 0, 2] -> [M, B, N]). Documented: perm_x1 in {[0,1,2], [1,0,2]}, perm_x2 [0,1,2],
    perm_y [1,0,2]; K and N multiples of 16; bias unsupported; fp16/bf16/fp32 (DOC:5612). None perms are the
    identity for x1/x2 and [1, 0, 2] for y (the documented defaults)."""
    perm_x1 = (0, 1, 2) if perm_x1 is None else perm_x1
    perm_x2 = (0, 1, 2) if perm_x2 is None else perm_x2
    perm_y = (1, 0, 2) if perm_y is None else perm_y
    _need(input.dim() == 3 and weight.dim() == 3, "npu_transpose_batchmatmul: 3-D input and weight")
    _dtypes("npu_transpose_batchmatmul input", input, _FLOAT)
    _need(tuple(perm_x1) in ((0, 1, 2), (1, 0, 2)) and tuple(perm_x2) == (0, 1, 2) and tuple(perm_y) == (1, 0, 2),
          "npu_transpose_batchmatmul: unsupported permutation")
    _need(bias is None, "npu_transpose_batchmatmul: bias is not supported")
    if scale is not None or batch_split_factor != 1:
        raise NotImplementedError("npu_transpose_batchmatmul stand-in: scale / batch_split_factor")
    a = input.permute(*perm_x1)
    _need(a.shape[0] == weight.shape[0] and a.shape[2] == weight.shape[1], "npu_transpose_batchmatmul: shapes differ")
    K, N = weight.shape[1], weight.shape[2]
    _need(K % 16 == 0 and N % 16 == 0, f"npu_transpose_batchmatmul: K={K} and N={N} must be multiples of 16")
    return torch.matmul(a, weight).permute(*perm_y)


@LIB.impl("npu_mhc_pre")
def npu_mhc_pre(x: torch.Tensor, phi: torch.Tensor, alpha: torch.Tensor, bias: torch.Tensor, *,
                gamma: torch.Tensor | None = None, norm_eps: float = 1e-6, hc_eps: float = 1e-6, out_flag: int = 0,
                inner_precise: int = 0) -> tuple[torch.Tensor | None, ...]:
    """mHC pre-mapping (950): x' = RmsNorm(x_flat) (gamma optional); mixes = x' @ phi^T;
    H_pre = sigmoid(alpha0 * mixes[:n] + b[:n]) + hc_eps; H_post = 2 sigmoid(alpha1 * mixes[n:2n] + b[n:2n]);
    H_res = alpha2 * mixes[2n:] + b[2n:] (before Sinkhorn); h_in = sum_j H_pre_j x_j.

    x [T, n, D] fp16/bf16, n in {4, 6, 8}, D a multiple of 16. Returns (h_in like x, h_post f32 [T, n],
    h_res f32 [T, n, n], inv_rms, h_mix, h_pre) with the last three only when out_flag=1. (The doc lists
    h_post's shape as [T, D]; h_post is the per-stream weight that npu_mhc_post takes as [T, n].) DOC:4002"""
    _dtypes("npu_mhc_pre x", x, _LOW)
    _need(x.dim() == 3, "npu_mhc_pre stand-in: x [T, n, D]")
    T, n, D = x.shape
    _need(n in (4, 6, 8) and D % 16 == 0 and 1 <= D <= 16384, f"npu_mhc_pre: n={n} must be 4/6/8, D={D} a "
                                                               f"multiple of 16")
    _need(alpha.shape == (3,) and phi.shape == (n * n + 2 * n, n * D) and bias.shape == (n * n + 2 * n,),
          "npu_mhc_pre stand-in: the full form (alpha [3], phi [n^2+2n, nD], bias [n^2+2n])")
    _need(phi.dtype == _F32 and alpha.dtype == _F32 and bias.dtype == _F32, "npu_mhc_pre: phi/alpha/bias float32")
    xf = x.to(_F32)
    flat = xf.reshape(T, n * D)
    inv_rms = 1.0 / torch.sqrt(torch.mean(flat * flat, dim=-1) + norm_eps)
    xn = flat * inv_rms.unsqueeze(-1)
    if gamma is not None:
        xn = xn * gamma.to(_F32).reshape(n * D)
    mix = xn @ phi.t()
    h_pre = torch.sigmoid(mix[:, :n] * alpha[0] + bias[:n]) + hc_eps
    h_post = 2.0 * torch.sigmoid(mix[:, n:2 * n] * alpha[1] + bias[n:2 * n])
    h_res = (mix[:, 2 * n:] * alpha[2] + bias[2 * n:]).reshape(T, n, n)
    h_in = torch.einsum("tn,tnd->td", h_pre, xf).to(x.dtype)
    if out_flag:
        return h_in, h_post, h_res, inv_rms, mix, h_pre
    return h_in, h_post, h_res, _EMPTY, _EMPTY, _EMPTY


@LIB.impl("npu_mhc_sinkhorn")
def npu_mhc_sinkhorn(x: torch.Tensor, *, eps: float = 1e-6, num_iters: int = 20,
                     out_flag: int = 0) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Sinkhorn (950), DOC:4112: softmax(x, -1) + eps, divide by (column sums + eps), then num_iters - 1 times
    row-normalize and column-normalize (each sum + eps). x float32 [T, n, n], n in {4, 6, 8}."""
    _need(x.dtype == _F32, "npu_mhc_sinkhorn: x must be float32")
    _need(x.shape[-1] == x.shape[-2] and x.shape[-1] in (4, 6, 8), "npu_mhc_sinkhorn: x [.., n, n], n in 4/6/8")
    _need(1 <= num_iters <= 100, "npu_mhc_sinkhorn: num_iters in [1, 100]")
    if out_flag:
        raise NotImplementedError("npu_mhc_sinkhorn stand-in: out_flag=1 (training intermediates)")
    return sinkhorn(x, num_iters, eps), _EMPTY, _EMPTY


# the MC2 expert-parallel pair lives in its own module (it needs torch.distributed); imported so this module
# offers the whole torch_npu surface the port calls
from .mc2 import (  # noqa: E402
    npu_moe_distribute_combine,
    npu_moe_distribute_combine_v2,
    npu_moe_distribute_dispatch,
    npu_moe_distribute_dispatch_v2,
)

# the ops defined above, for `dsv4 doctor` and for the backend's kernel check
FUNCTIONS = tuple(sorted(LIB.schemas))
__all__ = ["LIB", "FUNCTIONS", *FUNCTIONS, "npu_moe_distribute_combine", "npu_moe_distribute_combine_v2",
           "npu_moe_distribute_dispatch", "npu_moe_distribute_dispatch_v2"]
