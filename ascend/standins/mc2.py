"""CPU stand-ins of the MC2 expert-parallel ops `npu_moe_distribute_dispatch(_v2)` / `..._combine(_v2)`.

Written from the op-plugin documentation (docs/zh/custom_APIs/torch_npu/torch_npu-npu_moe_distribute_*.md,
digested in shared/spec/ascend_ecosystem.md section 1) on top of torch.distributed collectives, so the
same lowering code that calls `torch_npu.npu_moe_distribute_dispatch_v2` on an NPU runs over gloo on a
CPU. Bound to the torch-npu 2.14.0 schemas (ascend/schemas/torch_npu.yaml) through schema.py; importable on
its own (no torch_npu); `ascend/standins/torch_npu.py` re-exports the four ops.

What the stand-in reproduces (the parts the model may rely on):
- dispatch: optional per-token dynamic int8 quantisation (quant_mode 2), an all-to-all-v over the EP
  group sending each (token, k) copy to the rank owning expert `expert_ids[t, k]` (experts are split
  evenly, rank r owning [r*E/W, (r+1)*E/W)), and the outputs `expand_x` [A, H] with the received rows
  grouped by local expert (within an expert by source rank, within a source rank in (token, k) order;
  rows past the received count are zero), `expert_token_nums` [local_experts] (counts, or prefix sums
  with expert_token_nums_type=0), `ep_recv_counts`, `assist_info_for_combine` [A*128] (v2) or
  `expand_idx` [BS*K] (v1), `tp_recv_counts`, `dynamic_scales` [A] and `expand_scales` [A].
- combine: the reverse all-to-all-v and out[t] = sum_k expert_scales[t, k] * row(t, k) (+ shared_expert_x).

The documentation says model code must not depend on the values of assist_info_for_combine,
ep_recv_counts, tp_recv_counts and expand_scales; the stand-in uses the A3 layout for ep_recv_counts
(prefix sums over (local expert, source rank), shape [ep_world_size * local_experts]) and stores
(source rank, token, k) in the first three int32 of each row's 128-entry assist record.

Documented constraints are checked (BS > 0, K <= 16 and distinct ids per row, ids in [0, moe_expert_num),
moe_expert_num divisible by the EP size, ep_world_size >= 2, A large enough for global_bs); on the
CPU float32 activations are accepted besides bf16/fp16 because float32 is the reference dtype. Features
DeepSeek-V4 does not use are refused with NotImplementedError rather than approximated: TP domain
(tp_world_size 2), shared-expert ranks, zero/copy/constant experts, communication quantisation in combine,
and the v1 combine's fused dequantisation inputs (activation_scale / weight_scale / group_list).

`group_ep` is a communicator *name*, as on the NPU where it comes from
`group._get_backend(torch.device("npu")).get_hccl_comm_name(rank)`; here `register_group(group)` names
a torch.distributed ProcessGroup and returns that name.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist

from .schema import StandinLibrary

__all__ = [
    "register_group", "resolve_group", "npu_moe_distribute_dispatch_v2", "npu_moe_distribute_combine_v2",
    "npu_moe_distribute_dispatch", "npu_moe_distribute_combine",
]

ASSIST_STRIDE = 128  # int32 entries per received row in assist_info_for_combine (shape A * 128)
MAX_K = 16

_GROUPS: dict[str, Any] = {}
LIB = StandinLibrary("torch_npu")  # the same dsv4_torch_npu namespace as ascend/standins/torch_npu.py


def register_group(group: Any = None, name: str | None = None) -> str:
    """Name a ProcessGroup for `group_ep`, like the HCCL comm-name handshake does on an NPU.

    The name is the same on every rank of the group (its torch group name), so ranks can pass it as is."""
    group = dist.group.WORLD if group is None else group
    if name is None:
        name = f"standin_ep_{dist.distributed_c10d._get_process_group_name(group)}"
    if not 1 <= len(name) < 128:
        raise ValueError(f"group_ep names are 1..127 characters long, got {len(name)}")
    _GROUPS[name] = group
    return name


def resolve_group(name: str) -> Any:
    if not isinstance(name, str) or not name:
        raise ValueError("group_ep must be a non-empty communicator name")
    try:
        return _GROUPS[name]
    except KeyError:
        raise ValueError(f"group_ep {name!r} names no registered process group; call "
                         f"ascend.standins.mc2.register_group(group) first (known: {sorted(_GROUPS)})") from None


# ---- shared machinery ----------------------------------------------------------------------------

@dataclass
class _Plan:
    """Where each of this rank's (token, k) copies goes: the send order and per-rank split sizes."""

    order: torch.Tensor  # flat (t*K + k) indices of active copies, sorted by expert id (stable)
    experts: torch.Tensor  # expert id of each copy in `order`
    send_counts: torch.Tensor  # [world, local_experts] copies sent to each rank's each local expert


def _pair_mask(x_active_mask: torch.Tensor | None, bs: int, k: int) -> torch.Tensor | None:
    if x_active_mask is None:
        return None
    m = x_active_mask.to(torch.bool)
    if m.dim() == 1:
        if m.shape[0] != bs:
            raise ValueError(f"x_active_mask has shape {tuple(m.shape)}, expected ({bs},)")
        on = m.to(torch.int8)
        if bool((on[1:] > on[:-1]).any()):
            raise ValueError("x_active_mask: active tokens (True) must all come before inactive ones")
        return m[:, None].expand(bs, k)
    if tuple(m.shape) != (bs, k):
        raise ValueError(f"x_active_mask has shape {tuple(m.shape)}, expected ({bs},) or ({bs}, {k})")
    return m


def _plan(expert_ids: torch.Tensor, mask: torch.Tensor | None, world: int, local: int) -> _Plan:
    flat = expert_ids.reshape(-1).to(torch.int64).cpu()
    idx = torch.arange(flat.numel())
    if mask is not None:
        keep = mask.reshape(-1).cpu()
        idx, flat = idx[keep], flat[keep]
    srt = torch.sort(flat, stable=True)
    order = idx[srt.indices]
    experts = srt.values
    counts = torch.bincount(experts, minlength=world * local).reshape(world, local)
    return _Plan(order, experts, counts)


def _validate_common(op: str, expert_ids: torch.Tensor, bs: int, ep_world_size: int, ep_rank_id: int,
                     moe_expert_num: int, group: Any, tp_world_size: int, shared_expert_rank_num: int,
                     special: int) -> int:
    """Local checks of the documented constraints; returns local_expert_num."""
    if tp_world_size not in (0, 1):
        raise NotImplementedError(f"{op} stand-in: TP communication domain (tp_world_size={tp_world_size}) "
                                  f"is not implemented")
    if shared_expert_rank_num:
        raise NotImplementedError(f"{op} stand-in: shared-expert ranks are not implemented")
    if special:
        raise NotImplementedError(f"{op} stand-in: zero/copy/constant experts are not implemented")
    if ep_world_size < 2:
        raise ValueError(f"{op}: ep_world_size must be >= 2 (documented range), got {ep_world_size}")
    if group.size() != ep_world_size or dist.get_rank(group) != ep_rank_id:
        raise ValueError(f"{op}: ep_world_size={ep_world_size}, ep_rank_id={ep_rank_id} do not match the "
                         f"group (size {group.size()}, this rank {dist.get_rank(group)})")
    if moe_expert_num < 1 or moe_expert_num % ep_world_size:
        raise ValueError(f"{op}: moe_expert_num={moe_expert_num} must be a positive multiple of "
                         f"ep_world_size={ep_world_size}")
    if expert_ids.dim() != 2 or expert_ids.shape[0] != bs:
        raise ValueError(f"{op}: expert_ids must be [BS={bs}, K], got {tuple(expert_ids.shape)}")
    if expert_ids.dtype != torch.int32:
        raise TypeError(f"{op}: expert_ids must be int32, got {expert_ids.dtype}")
    k = expert_ids.shape[1]
    if not 0 < k <= min(MAX_K, moe_expert_num):
        raise ValueError(f"{op}: K={k} must be in (0, min(16, moe_expert_num={moe_expert_num})]")
    if bs:
        lo, hi = int(expert_ids.min()), int(expert_ids.max())
        if lo < 0 or hi >= moe_expert_num:
            raise ValueError(f"{op}: expert id {lo if lo < 0 else hi} outside [0, {moe_expert_num})")
        srt = torch.sort(expert_ids.to(torch.int64), dim=1).values
        if bool((srt[:, 1:] == srt[:, :-1]).any()):
            raise ValueError(f"{op}: the K expert ids of a token must be distinct")
    return moe_expert_num // ep_world_size


def all_gather_flat(inp: torch.Tensor, group: Any) -> torch.Tensor:
    """Concatenate equal-shaped tensors of every rank along dim 0. torch 2.13 names this all_gather_single
    (all_gather_into_tensor is deprecated there); older torch (as paired with torch_npu) lacks it."""
    inp = inp.contiguous()
    out = inp.new_empty((group.size() * inp.shape[0],) + tuple(inp.shape[1:]))
    fn = getattr(dist, "all_gather_single", None) or dist.all_gather_into_tensor
    fn(out, inp, group=group)
    return out


def reduce_scatter_flat(inp: torch.Tensor, group: Any) -> torch.Tensor:
    """Sum over ranks of `inp` [world * n, ...], this rank keeping rows [rank*n, (rank+1)*n)."""
    inp = inp.contiguous()
    out = inp.new_empty((inp.shape[0] // group.size(),) + tuple(inp.shape[1:]))
    fn = getattr(dist, "reduce_scatter_single", None) or dist.reduce_scatter_tensor
    fn(out, inp, group=group)
    return out


def _a2a(group: Any, send: torch.Tensor, send_splits: list[int], recv_splits: list[int]) -> torch.Tensor:
    send = send.contiguous()
    out = send.new_empty((sum(recv_splits),) + tuple(send.shape[1:]))
    dist.all_to_all_single(out, send, recv_splits, send_splits, group=group)
    return out


def _recv_layout(recv_counts: torch.Tensor, world: int, local: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Received rows come source-major (then local expert, then source order). Returns the permutation to
    expert-major order and the source rank of each row in that order."""
    cnt = recv_counts.reshape(-1)
    le = torch.repeat_interleave(torch.arange(local).repeat(world), cnt)
    src = torch.repeat_interleave(torch.arange(world).repeat_interleave(local), cnt)
    perm = torch.sort(le * world + src, stable=True).indices
    return perm, src[perm]


def _dispatch(op: str, x: torch.Tensor, expert_ids: torch.Tensor, group_ep: str, ep_world_size: int,
              ep_rank_id: int, moe_expert_num: int, scales: torch.Tensor | None, x_active_mask: torch.Tensor | None,
              expert_scales: torch.Tensor | None, tp_world_size: int, shared_expert_rank_num: int, quant_mode: int,
              global_bs: int, expert_token_nums_type: int, special: int) -> dict[str, Any]:
    group = resolve_group(group_ep)
    dev = x.device
    bs = x.shape[0] if x.dim() == 2 else -1
    exc: Exception | None = None
    try:
        if x.dim() != 2:
            raise ValueError(f"{op}: x must be [BS, H], got {tuple(x.shape)}")
        if not x.is_floating_point():
            raise TypeError(f"{op}: x must be bfloat16/float16 (float32 accepted on CPU), got {x.dtype}")
        if bs <= 0:
            raise ValueError(f"{op}: BS must be > 0 (documented 0 < BS); pad an idle rank with one token")
        if quant_mode not in (0, 2):
            raise NotImplementedError(f"{op} stand-in: quant_mode={quant_mode} (only 0 and 2 are implemented)")
        if expert_token_nums_type not in (0, 1):
            raise ValueError(f"{op}: expert_token_nums_type must be 0 (prefix sums) or 1 (counts)")
        local = _validate_common(op, expert_ids, bs, ep_world_size, ep_rank_id, moe_expert_num, group,
                                 tp_world_size, shared_expert_rank_num, special)
        if expert_scales is not None and tuple(expert_scales.shape) != tuple(expert_ids.shape):
            raise ValueError(f"{op}: expert_scales must be [BS, K] like expert_ids")
        if scales is not None and tuple(scales.shape) != (moe_expert_num, x.shape[1]):
            raise ValueError(f"{op}: scales must be [moe_expert_num, H] = ({moe_expert_num}, {x.shape[1]})")
        mask = _pair_mask(x_active_mask, bs, expert_ids.shape[1])
    except (ValueError, TypeError, NotImplementedError) as e:
        exc = e
    # every rank learns every rank's BS and whether its inputs were valid, so a bad call fails on all
    # ranks together instead of leaving the others blocked in the exchange
    me = torch.tensor([max(bs, 0), 0 if exc is not None else 1], dtype=torch.int64, device=dev)
    allv = all_gather_flat(me, group).reshape(-1, 2).cpu()
    if exc is not None:
        raise exc
    bad = [r for r in range(group.size()) if not allv[r, 1]]
    if bad:
        raise RuntimeError(f"{op}: rank {bad[0]} of group {group_ep!r} refused its inputs")
    world, k, h = ep_world_size, expert_ids.shape[1], x.shape[1]
    all_bs = allv[:, 0]
    if global_bs == 0:
        if bool((all_bs != bs).any()):
            raise ValueError(f"{op}: global_bs=0 requires the same BS on every rank (got {all_bs.tolist()}); "
                             f"pass global_bs = max_bs * ep_world_size")
        gbs = bs * world
    else:
        if global_bs < int(all_bs.max()) * world:
            raise ValueError(f"{op}: global_bs={global_bs} < max_bs * ep_world_size = {int(all_bs.max()) * world}")
        gbs = global_bs
    a = gbs * min(local, k)

    plan = _plan(expert_ids, mask, world, local)
    recv_counts = _a2a(group, plan.send_counts.reshape(-1).to(dev), [local] * world, [local] * world)
    recv_counts = recv_counts.cpu().reshape(world, local)
    send_splits = plan.send_counts.sum(1).tolist()
    recv_splits = recv_counts.sum(1).tolist()
    n = sum(recv_splits)
    if n > a:
        raise RuntimeError(f"{op}: {n} rows received > A = {a}")
    tok = (plan.order // k).to(dev)
    rows = x[tok].float()
    dyn = None
    if quant_mode == 2:
        if scales is not None:
            rows = rows * scales.float()[plan.experts.to(dev)]
        amax = rows.abs().amax(dim=1).clamp_min(torch.finfo(torch.float32).tiny)
        dyn = 127.0 / amax  # dynamic_scales_value of the documentation
        rows = torch.round(rows * dyn[:, None]).clamp(-128, 127).to(torch.int8)
    else:
        rows = x[tok]
    got = _a2a(group, rows, send_splits, recv_splits)
    meta = torch.stack([plan.order // k, plan.order % k], dim=1).to(dev)
    got_meta = _a2a(group, meta, send_splits, recv_splits).cpu()
    perm, src = _recv_layout(recv_counts, world, local)
    pd = perm.to(dev)

    expand_x = got.new_zeros((a, h))
    expand_x[:n] = got[pd]
    out: dict[str, Any] = {"expand_x": expand_x}
    if dyn is not None:
        got_scale = _a2a(group, (1.0 / dyn).contiguous(), send_splits, recv_splits)
        out["dynamic_scales"] = torch.zeros(a, dtype=torch.float32, device=dev)
        out["dynamic_scales"][:n] = got_scale[pd]
    else:
        out["dynamic_scales"] = torch.zeros(0, dtype=torch.float32, device=dev)  # undefined without quant
    if expert_scales is not None:
        w = expert_scales.reshape(-1)[plan.order.to(dev)].float()
        got_w = _a2a(group, w, send_splits, recv_splits)
        out["expand_scales"] = torch.zeros(a, dtype=torch.float32, device=dev)
        out["expand_scales"][:n] = got_w[pd]
    else:
        out["expand_scales"] = torch.zeros(0, dtype=torch.float32, device=dev)  # undefined without expert_scales
    per_expert = recv_counts.sum(0)
    out["expert_token_nums"] = (per_expert if expert_token_nums_type == 1 else per_expert.cumsum(0)).to(dev)
    out["ep_recv_counts"] = recv_counts.t().reshape(-1).cumsum(0).to(torch.int32).to(dev)
    out["tp_recv_counts"] = torch.tensor([n], dtype=torch.int32, device=dev)
    assist = torch.zeros((a, ASSIST_STRIDE), dtype=torch.int32)
    if n:
        assist[:n, 0] = src.to(torch.int32)
        assist[:n, 1:3] = got_meta[perm].to(torch.int32)
    out["assist_info_for_combine"] = assist.reshape(-1).to(dev)
    # v1's expand_idx: for each of this rank's (t, k) copies, its position within its (expert, this rank)
    # block at the destination; -1 for copies that were not sent
    idx = torch.full((bs * k,), -1, dtype=torch.int32)
    if plan.order.numel():
        first = torch.searchsorted(plan.experts, plan.experts, right=False)
        idx[plan.order] = (torch.arange(plan.order.numel()) - first).to(torch.int32)
    out["expand_idx"] = idx.to(dev)
    return out


def _combine(op: str, expand_x: torch.Tensor, expert_ids: torch.Tensor, ep_send_counts: torch.Tensor,
             expert_scales: torch.Tensor, group_ep: str, ep_world_size: int, ep_rank_id: int, moe_expert_num: int,
             x_active_mask: torch.Tensor | None, shared_expert_x: torch.Tensor | None, tp_world_size: int,
             shared_expert_rank_num: int, comm_quant_mode: int, special: int,
             assist_info_for_combine: torch.Tensor | None) -> torch.Tensor:
    group = resolve_group(group_ep)
    bs, k = expert_ids.shape[0], expert_ids.shape[1] if expert_ids.dim() == 2 else -1
    if comm_quant_mode:
        raise NotImplementedError(f"{op} stand-in: comm_quant_mode={comm_quant_mode} is not implemented")
    local = _validate_common(op, expert_ids, bs, ep_world_size, ep_rank_id, moe_expert_num, group, tp_world_size,
                             shared_expert_rank_num, special)
    if expert_scales is None or tuple(expert_scales.shape) != (bs, k) or expert_scales.dtype != torch.float32:
        raise ValueError(f"{op}: expert_scales must be float32 [BS, K] = ({bs}, {k})")
    if not expand_x.is_floating_point() or expand_x.dim() != 2:
        raise ValueError(f"{op}: expand_x must be a floating [A, H] tensor (the expert outputs)")
    world, h, dev = ep_world_size, expand_x.shape[1], expand_x.device
    cum = ep_send_counts.reshape(-1)[: world * local].to(torch.int64).cpu()
    if cum.numel() != world * local:
        raise ValueError(f"{op}: ep_send_counts must hold {world * local} prefix sums (dispatch's ep_recv_counts)")
    counts = torch.diff(cum, prepend=cum.new_zeros(1)).reshape(local, world)  # [local expert, source]
    n = int(cum[-1]) if cum.numel() else 0
    if n > expand_x.shape[0]:
        raise ValueError(f"{op}: ep_send_counts says {n} rows but expand_x has {expand_x.shape[0]}")
    src_of_row = torch.repeat_interleave(torch.arange(world).repeat(local), counts.reshape(-1))
    if assist_info_for_combine is not None and n:
        assist = assist_info_for_combine.reshape(-1, ASSIST_STRIDE)[:n, 0].cpu().to(torch.int64)
        if not torch.equal(assist, src_of_row):
            raise ValueError(f"{op}: assist_info_for_combine does not belong to this ep_send_counts "
                             f"(pass dispatch's outputs unchanged)")
    le_of_row = torch.repeat_interleave(torch.arange(local).repeat_interleave(world), counts.reshape(-1))
    # back to each source in the order it sent: by source, then by expert, then by its (t, k) order
    back = torch.sort(src_of_row * local + le_of_row, stable=True).indices
    send_splits = counts.sum(0).tolist()
    mask = _pair_mask(x_active_mask, bs, k)
    plan = _plan(expert_ids, mask, world, local)
    recv_splits = plan.send_counts.sum(1).tolist()
    rows = _a2a(group, expand_x[:n][back.to(dev)], send_splits, recv_splits)
    buf = torch.zeros((bs * k, h), dtype=torch.float32, device=dev)
    buf[plan.order.to(dev)] = rows.float()
    out = (buf.reshape(bs, k, h) * expert_scales.to(dev)[:, :, None]).sum(dim=1)
    if shared_expert_x is not None:
        out = out + shared_expert_x.reshape(bs, h).float()
    return out.to(expand_x.dtype)


# ---- the documented entry points ----------------------------------------------------------------

@LIB.impl("npu_moe_distribute_dispatch_v2")
def npu_moe_distribute_dispatch_v2(x: torch.Tensor, expert_ids: torch.Tensor, group_ep: str, ep_world_size: int,
                                   ep_rank_id: int, moe_expert_num: int, *, scales: torch.Tensor | None = None,
                                   x_active_mask: torch.Tensor | None = None,
                                   expert_scales: torch.Tensor | None = None, elastic_info: Any = None,
                                   performance_info: Any = None, group_tp: str = "", tp_world_size: int = 0,
                                   tp_rank_id: int = 0, expert_shard_type: int = 0, shared_expert_num: int = 1,
                                   shared_expert_rank_num: int = 0, quant_mode: int = 0, global_bs: int = 0,
                                   expert_token_nums_type: int = 1, comm_alg: str = "", zero_expert_num: int = 0,
                                   copy_expert_num: int = 0, const_expert_num: int = 0,
                                   y_dtype: torch.dtype | None = None, x_dtype: torch.dtype | None = None,
                                   scales_dtype: torch.dtype | None = None) -> tuple:
    """-> (expand_x, dynamic_scales, assist_info_for_combine, expert_token_nums, ep_recv_counts,
    tp_recv_counts, expand_scales)."""
    if elastic_info is not None:
        raise NotImplementedError("npu_moe_distribute_dispatch_v2: elastic_info is reserved (pass None)")
    if any(v is not None for v in (y_dtype, x_dtype, scales_dtype)):
        raise NotImplementedError("npu_moe_distribute_dispatch_v2 stand-in: y/x/scales dtype overrides (fp8/int4)")
    o = _dispatch("npu_moe_distribute_dispatch_v2", x, expert_ids, group_ep, ep_world_size, ep_rank_id,
                  moe_expert_num, scales, x_active_mask, expert_scales, tp_world_size, shared_expert_rank_num,
                  quant_mode, global_bs, expert_token_nums_type, zero_expert_num + copy_expert_num + const_expert_num)
    return (o["expand_x"], o["dynamic_scales"], o["assist_info_for_combine"], o["expert_token_nums"],
            o["ep_recv_counts"], o["tp_recv_counts"], o["expand_scales"])


@LIB.impl("npu_moe_distribute_combine_v2")
def npu_moe_distribute_combine_v2(expand_x: torch.Tensor, expert_ids: torch.Tensor,
                                  assist_info_for_combine: torch.Tensor, ep_send_counts: torch.Tensor,
                                  expert_scales: torch.Tensor, group_ep: str, ep_world_size: int, ep_rank_id: int,
                                  moe_expert_num: int, *, tp_send_counts: torch.Tensor | None = None,
                                  x_active_mask: torch.Tensor | None = None,
                                  expand_scales: torch.Tensor | None = None,
                                  shared_expert_x: torch.Tensor | None = None, elastic_info: Any = None,
                                  ori_x: torch.Tensor | None = None, const_expert_alpha_1: Any = None,
                                  const_expert_alpha_2: Any = None, const_expert_v: Any = None,
                                  performance_info: Any = None, group_tp: str = "", tp_world_size: int = 0,
                                  tp_rank_id: int = 0, expert_shard_type: int = 0, shared_expert_num: int = 1,
                                  shared_expert_rank_num: int = 0, global_bs: int = 0, comm_quant_mode: int = 0,
                                  comm_alg: str = "", zero_expert_num: int = 0, copy_expert_num: int = 0,
                                  const_expert_num: int = 0) -> torch.Tensor:
    """-> [BS, H]: sum over k of expert_scales[t, k] * (expert output of copy (t, k)), + shared_expert_x."""
    if elastic_info is not None:
        raise NotImplementedError("npu_moe_distribute_combine_v2: elastic_info is reserved (pass None)")
    return _combine("npu_moe_distribute_combine_v2", expand_x, expert_ids, ep_send_counts, expert_scales, group_ep,
                    ep_world_size, ep_rank_id, moe_expert_num, x_active_mask, shared_expert_x, tp_world_size,
                    shared_expert_rank_num, comm_quant_mode, zero_expert_num + copy_expert_num + const_expert_num,
                    assist_info_for_combine)


@LIB.impl("npu_moe_distribute_dispatch")
def npu_moe_distribute_dispatch(x: torch.Tensor, expert_ids: torch.Tensor, group_ep: str, ep_world_size: int,
                                ep_rank_id: int, moe_expert_num: int, *, scales: torch.Tensor | None = None,
                                x_active_mask: torch.Tensor | None = None, expert_scales: torch.Tensor | None = None,
                                group_tp: str = "", tp_world_size: int = 0, tp_rank_id: int = 0,
                                expert_shard_type: int = 0, shared_expert_num: int = 1,
                                shared_expert_rank_num: int = 0, quant_mode: int = 0, global_bs: int = 0,
                                expert_token_nums_type: int = 1) -> tuple:
    """v1: -> (expand_x, dynamic_scales, expand_idx, expert_token_nums, ep_recv_counts, tp_recv_counts,
    expand_scales)."""
    o = _dispatch("npu_moe_distribute_dispatch", x, expert_ids, group_ep, ep_world_size, ep_rank_id, moe_expert_num,
                  scales, x_active_mask, expert_scales, tp_world_size, shared_expert_rank_num, quant_mode, global_bs,
                  expert_token_nums_type, 0)
    return (o["expand_x"], o["dynamic_scales"], o["expand_idx"], o["expert_token_nums"], o["ep_recv_counts"],
            o["tp_recv_counts"], o["expand_scales"])


@LIB.impl("npu_moe_distribute_combine")
def npu_moe_distribute_combine(expand_x: torch.Tensor, expert_ids: torch.Tensor, expand_idx: torch.Tensor,
                               ep_send_counts: torch.Tensor, expert_scales: torch.Tensor, group_ep: str,
                               ep_world_size: int, ep_rank_id: int, moe_expert_num: int, *,
                               tp_send_counts: torch.Tensor | None = None, x_active_mask: torch.Tensor | None = None,
                               activation_scale: torch.Tensor | None = None, weight_scale: torch.Tensor | None = None,
                               group_list: torch.Tensor | None = None, expand_scales: torch.Tensor | None = None,
                               shared_expert_x: torch.Tensor | None = None, group_tp: str = "",
                               tp_world_size: int = 0, tp_rank_id: int = 0, expert_shard_type: int = 0,
                               shared_expert_num: int = 1, shared_expert_rank_num: int = 0, global_bs: int = 0,
                               out_dtype: int = 0, comm_quant_mode: int = 0, group_list_type: int = 0) -> torch.Tensor:
    """v1 combine: same result as v2; the fused int32 dequantisation inputs are not implemented."""
    if activation_scale is not None or weight_scale is not None or group_list is not None:
        raise NotImplementedError("npu_moe_distribute_combine stand-in: fused dequantisation of an int32 "
                                  "expand_x (activation_scale / weight_scale / group_list) is not implemented")
    if expand_idx.numel() != expert_ids.numel():
        raise ValueError("npu_moe_distribute_combine: expand_idx must be dispatch's [BS*K] output")
    return _combine("npu_moe_distribute_combine", expand_x, expert_ids, ep_send_counts, expert_scales, group_ep,
                    ep_world_size, ep_rank_id, moe_expert_num, x_active_mask, shared_expert_x, tp_world_size,
                    shared_expert_rank_num, comm_quant_mode, 0, None)
