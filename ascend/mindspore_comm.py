"""Expert parallelism on MindSpore: the EP group over mindspore.communication and the MoE exchanges.

Each rank holds experts [rank * E / W, (rank + 1) * E / W) (`common.parallel.expert_slice`) and runs attention on
its own tokens; the MoE layer moves token rows to the ranks that hold their experts and back, with one of the
strategies of `ascend.soc.select_moe_comm` (the same rule the torch backend uses):

* dispatch_combine: MoeDistributeDispatch / MoeDistributeCombine (MC2, HCCS), within their token limits;
* alltoall: a per-expert count exchange, then AlltoAllV of the rows out and back (the phases below are
  plain functions, so a test can run them for several simulated ranks in one CPU process).

Only the Ascend target with more than one rank takes these paths (`MindSporeBackend(device="ascend",
expert_parallel=True)`); nothing here was run on an NPU. The msrun entry point is `ascend/mindspore_ep.py`.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np

from common.parallel import expert_slice
from ops.contract import ExpertWeights

from . import soc as socmod

EP_GROUP = "dsv4_ep"


# ---- all-to-all strategy, as phases around the two exchanges -----------------------------------------------------
@dataclass
class A2APlan:
    """One rank's routing of its own T tokens x k slots."""

    order: np.ndarray  # flat (token * k + slot) indices grouped by expert, stable: the send order
    expert_counts: np.ndarray  # [E] rows this rank sends to each expert
    send_rows: list[int]  # rows to each destination rank


def a2a_plan(ids: np.ndarray, n_experts: int, size: int) -> A2APlan:
    flat = np.asarray(ids, dtype=np.int64).reshape(-1)
    order = np.argsort(flat, kind="stable")
    counts = np.bincount(flat, minlength=n_experts)
    per = n_experts // size
    return A2APlan(order, counts, [int(c) for c in counts.reshape(size, per).sum(axis=1)])


def a2a_send_rows(B: Any, x: Any, plan: A2APlan, k: int) -> Any:
    """The rows to send, [T * k, D] in plan.order (destination ranks' blocks are contiguous)."""
    return B._ms.ops.gather(x, B.from_numpy((plan.order // k).astype(np.int64)), 0)


def a2a_compute(B: Any, recv: Any, recv_counts: np.ndarray, experts: ExpertWeights, limit: float) -> Any:
    """Run the local experts on the received rows. recv [R, D] holds, per source rank in rank order, that rank's
    rows grouped by local expert; recv_counts [W, E_local] their counts. Output rows match the input order."""
    ms = B._ms
    out = ms.ops.zeros(tuple(recv.shape), ms.float32)
    offsets = np.concatenate([[0], np.cumsum(recv_counts.reshape(-1))])[:-1].reshape(recv_counts.shape)
    for le in range(experts.count):
        idx = np.concatenate([np.arange(offsets[s, le], offsets[s, le] + recv_counts[s, le])
                              for s in range(recv_counts.shape[0])]).astype(np.int64)
        if not len(idx):
            continue
        rows = B.from_numpy(idx)
        out[rows] = B.expert_rows(ms.ops.gather(recv, rows, 0), experts.w1[le], experts.w3[le], experts.w2[le],
                                  None, limit)
    return out


def a2a_combine(B: Any, back: Any, plan: A2APlan, weights: Any, T: int, k: int) -> Any:
    """back [T * k, D] in plan.order -> [T, D]: scatter to (token, slot), weight, sum the k slots. The routing
    weight is applied after w2 here (it is linear), so results match the local path to float rounding."""
    ms = B._ms
    D = int(back.shape[1])
    ys = ms.ops.zeros((T * k, D), ms.float32)
    if T:
        ys[B.from_numpy(plan.order.astype(np.int64))] = back
    return (ys * weights.reshape(-1, 1)).reshape(T, k, D).sum(1)


def moe_alltoall(B: Any, comm: Any, x: Any, weights: Any, ids: Any, experts: ExpertWeights, limit: float) -> Any:
    T, k = (int(s) for s in ids.shape)
    D = int(x.shape[1])
    W, per = comm.size, experts.count
    if (experts.first, per) != expert_slice(experts.n_experts, W, comm.rank):
        raise ValueError(f"rank {comm.rank} of {W} holds experts [{experts.first}, {experts.first + per}), "
                         f"not its even share {expert_slice(experts.n_experts, W, comm.rank)}")
    plan = a2a_plan(B.to_numpy(ids), experts.n_experts, W)
    # 1. per-expert counts: rank r learns how many rows each source sends to each of its local experts
    counts = comm.alltoallv(B.from_numpy(plan.expert_counts.astype(np.int64)), [per] * W, [per] * W)
    recv_counts = B.to_numpy(counts).reshape(W, per)
    recv_rows = [int(c) for c in recv_counts.sum(axis=1)]
    # 2. rows out, 3. experts, 4. rows back (counts in rows of D elements)
    recv = comm.alltoallv(a2a_send_rows(B, x, plan, k).reshape(-1), plan.send_rows, recv_rows, block=D)
    out = a2a_compute(B, recv.reshape(-1, D), recv_counts, experts, limit)
    back = comm.alltoallv(out.reshape(-1), recv_rows, plan.send_rows, block=D)
    return a2a_combine(B, back.reshape(-1, D), plan, weights, T, k)


# ---- dispatch / combine (MC2) ------------------------------------------------------------------------------------
def moe_dispatch_combine(B: Any, comm: Any, x: Any, weights: Any, ids: Any, experts: ExpertWeights,
                         limit: float, max_tokens: int, min_tokens: int | None = None) -> Any:
    """MoeDistributeDispatch -> local experts -> MoeDistributeCombine (bfloat16 rows, as the kernels take).

    The MindSpore 2.10 docstrings (ops.auto_generate moe_distribute_dispatch): x_active_mask is reserved, so
    every rank needs BS >= 1 (the SoC table sends a call with an idle rank to all-to-all); global_bs is
    256 * ep_world_size on 910B when ranks' BS differ, 0 or BS * ep_world_size when equal; expert_scales is
    unsupported by dispatch on 910_93 (combine still weights by it)."""
    ms = B._ms
    T = int(x.shape[0])
    if T == 0:
        raise ValueError("MindSpore MoeDistributeDispatch needs BS >= 1 on every rank (x_active_mask is reserved)")
    uniform = min_tokens is not None and min_tokens == max_tokens
    if uniform:
        global_bs = max_tokens * comm.size
    elif B.soc == socmod.A2:
        global_bs = 256 * comm.size
    else:
        global_bs = max_tokens * comm.size
    common = dict(ep_world_size=comm.size, ep_rank_id=comm.rank, moe_expert_num=experts.n_experts,
                  group_ep=comm.group, global_bs=global_bs)
    dispatch_scales = None if B.soc == socmod.A3 else weights
    active = None
    # outputs (CANN aclnnMoeDistributeDispatch): expand_x, dynamic_scales, expand_idx, expert_token_nums,
    # ep_recv_counts, tp_recv_counts, expand_scales
    expand_x, _, expand_idx, token_nums, ep_recv, tp_recv, expand_scales = ms.ops.moe_distribute_dispatch(
        x.astype(ms.bfloat16), ids.astype(ms.int32), expert_scales=dispatch_scales, x_active_mask=active,
        expert_token_nums_type=1, **common)  # 1: counts per local expert, not a cumsum
    counts = B.to_numpy(token_nums).astype(np.int64)
    rows = expand_x.astype(ms.float32)
    out = ms.ops.zeros(tuple(rows.shape), ms.float32)
    start = 0
    for le, n in enumerate(counts[: experts.count]):
        if n:
            out[start:start + int(n)] = B.expert_rows(rows[start:start + int(n)], experts.w1[le], experts.w3[le],
                                                      experts.w2[le], None, limit)
        start += int(n)
    y = ms.ops.moe_distribute_combine(out.astype(ms.bfloat16), ids.astype(ms.int32), expand_idx, ep_recv, weights,
                                      tp_send_counts=tp_recv, x_active_mask=active, expand_scales=expand_scales,
                                      **common)
    return y.astype(ms.float32)[:T]


class MindSporeEP:
    """The msrun job's expert-parallel group over mindspore.communication (HCCL on Ascend)."""

    def __init__(self, group: str = EP_GROUP):
        from mindspore import ops
        from mindspore.communication import create_group, get_group_size, get_rank, init

        init()  # msrun provides the rank, size and master address; backend hccl on Ascend
        self.rank, self.size = get_rank(), get_group_size()
        self.group = group
        if self.size > 1:
            create_group(group, list(range(self.size)))
        self._ops = ops
        self._a2a: dict[int, Any] = {}
        self._max = ops.AllReduce(ops.ReduceOp.MAX, group) if self.size > 1 else None
        self.strategies: dict[str, int] = {}

    def expert_range(self, n_experts: int) -> tuple[int, int]:
        return expert_slice(n_experts, self.size, self.rank)

    def alltoallv(self, flat: Any, send: list[int], recv: list[int], block: int = 1) -> Any:
        if block not in self._a2a:
            self._a2a[block] = self._ops.AlltoAllV(group=self.group, block_size=block)
        out = self._a2a[block](flat, send, recv)
        return out if sum(recv) else flat[:0]  # AlltoAllV returns a shape-() tensor when nothing arrives

    def max_int(self, v: int, B: Any) -> int:
        return int(B.to_numpy(self._max(B.from_numpy(np.array([v], dtype=np.int32))))[0])

    def moe(self, B: Any, x: Any, weights: Any, ids: Any, experts: ExpertWeights, limit: float) -> Any:
        # every rank must take the same strategy: decide on the largest token count of the group
        T, k = (int(s) for s in ids.shape)
        tokens = self.max_int(T, B)
        fewest = -self.max_int(-T, B)  # x_active_mask is reserved in MindSpore 2.10: an idle rank rules MC2 out
        strategy = socmod.select_moe_comm(B.soc, B.providers, self.size, tokens, int(x.shape[1]), k,
                                          experts=experts.n_experts, idle_ranks=int(fewest == 0))
        B._variants["moe_comm"] = strategy
        self.strategies[strategy] = self.strategies.get(strategy, 0) + 1
        if strategy == "dispatch_combine":
            return moe_dispatch_combine(B, self, x, weights, ids, experts, limit, tokens, fewest)
        return moe_alltoall(B, self, x, weights, ids, experts, limit)
