"""Expert parallelism over torch.distributed: the EP group and the MoE communication strategies.

Layout: every rank runs attention, norms and the shared expert for its own tokens (attention data
parallel) and holds routed experts [r*E/W, (r+1)*E/W) (the split of `dsv4 convert --ep W`). `EPBackend`
wraps any contract backend (the NumPy reference or the torch backend) and replaces `moe_experts` with an
exchange: tokens travel to the ranks that hold their experts, the inner backend's `moe_experts` runs the
local experts on what arrived, and the results travel back. Every other op delegates to the inner
backend. Strategies (vllm-ascend's MoECommType, shared/spec/ascend_ecosystem.md section 3.1):

- allgather: all-gather every rank's tokens and routing, compute the local experts for all of them (a
  partial sum per token), reduce-scatter the partial sums back to their owners.
- alltoall: histogram of destination ranks, counts exchange, all_to_all_single of rows / expert ids /
  weights with split sizes, local experts on the received rows, reverse all_to_all_single, sum over k.
- dispatch_combine: the MC2 pair `npu_moe_distribute_dispatch_v2` / `npu_moe_distribute_combine_v2`
  (torch_npu on an NPU, `ascend.standins.mc2` over gloo on a CPU), grouped expert GEMM in between.
- auto: `ascend.soc.select_moe_comm` per forward call from the largest per-rank token count.

Tensors cross ranks as torch tensors; NumPy activations are wrapped with torch.from_numpy and unwrapped
with .numpy() (no copies on the CPU), torch activations pass through.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Callable
from datetime import timedelta
from typing import Any

import numpy as np
import torch
import torch.distributed as dist

from common.parallel import expert_slice, expert_split_error  # noqa: F401  (re-exported)

from . import soc as soc_table
from . import watchdog
from .standins.mc2 import all_gather_flat, reduce_scatter_flat

STRATEGIES = soc_table.MOE_COMM_STRATEGIES
MOE_COMM_CHOICES = soc_table.MOE_COMM_CHOICES


class CollectiveError(RuntimeError):
    """A collective failed: a peer rank died, timed out, or refused its inputs."""


def first_line(e: BaseException) -> str:
    text = str(e).strip().splitlines()
    return text[0] if text else type(e).__name__


def collective(what: str, fn: Callable, *args: Any, **kwargs: Any) -> Any:
    """Run one collective under the watchdog's deadline (the --dist-timeout, or the call's own `timeout`);
    a backend failure (gloo / HCCL raise RuntimeError) becomes a CollectiveError naming the peers to blame."""
    own = kwargs.get("timeout")
    bound = own.total_seconds() if isinstance(own, timedelta) else None
    try:
        with watchdog.watch(what, bound):
            return fn(*args, **kwargs)
    except RuntimeError as e:
        raise failed(what, e) from e


def failed(what: str, e: BaseException) -> CollectiveError:
    verdict = watchdog.blame()
    watchdog.report(verdict)
    return CollectiveError(f"{what} failed: {first_line(e)}" + (f"; {verdict}" if verdict else ""))


def _import_torch_npu() -> Any:
    from .device import require_torch_npu

    return require_torch_npu(RuntimeError)  # registers the "npu" device and the hccl backend


class ExpertParallel:
    """The EP group of this rank and how MoE tokens cross it.

    `device` "cpu" = gloo collectives and the stand-in MC2 ops; "npu" = hccl and torch_npu's ops. The MC2
    ops get a dedicated group: their documentation forbids other ops on the communication domain they use.
    """

    def __init__(self, group: Any, strategy: str = "auto", soc: str = "A2", device: str = "cpu",
                 mc2_group: Any = None):
        if strategy not in MOE_COMM_CHOICES:
            raise ValueError(f"unknown MoE communication strategy {strategy!r}; choose from {MOE_COMM_CHOICES}")
        if soc not in soc_table.SOCS:
            raise ValueError(f"unknown SoC {soc!r}; choose from {sorted(soc_table.SOCS)}")
        self.group = group
        self.rank = dist.get_rank(group)
        self.world = dist.get_world_size(group)
        self.strategy = strategy
        self.soc = soc
        self.device = device
        self.mc2_group = mc2_group if mc2_group is not None else group
        self.stats: Counter = Counter()  # strategy -> MoE layer calls that used it
        self._mc2: tuple[Callable, Callable, int] | None = None
        self._comm_name: str | None = None
        if device == "npu":
            npu = _import_torch_npu()
            self.comm_device = torch.device("npu", npu.npu.current_device())
            has_mc2 = hasattr(npu, "npu_moe_distribute_dispatch_v2") or hasattr(npu, "npu_moe_distribute_dispatch")
            self.providers = {soc_table.COMPOSED} | ({soc_table.TORCH_NPU} if has_mc2 else set())
        else:
            self.comm_device = torch.device("cpu")
            # the stand-in offers torch_npu's MC2 API, so the CPU simulates the chosen SoC's selection
            self.providers = {soc_table.TORCH_NPU, soc_table.COMPOSED}

    @classmethod
    def create(cls, strategy: str = "auto", soc: str = "A2", device: str = "cpu", group: Any = None) -> ExpertParallel:
        """Build the EP object on every rank (collective: new_group must be called by all ranks in order)."""
        group = dist.group.WORLD if group is None else group
        ranks = dist.get_process_group_ranks(group)
        mc2 = dist.new_group(ranks=ranks, backend="hccl" if device == "npu" else "gloo")
        return cls(group, strategy, soc, device, mc2)

    def choose(self, tokens_per_rank: int, hidden: int, topk: int, experts: int | None = None,
               idle_ranks: int = 0) -> str:
        """The strategy for one MoE call; every rank passes the same (global) numbers, so all agree."""
        if self.strategy == "auto":
            return soc_table.select_moe_comm(self.soc, self.providers, self.world, tokens_per_rank, hidden, topk,
                                             experts=experts, idle_ranks=idle_ranks)
        if self.strategy == "dispatch_combine" and self.device == "npu":
            try:
                soc_table.select("moe_comm_dispatch_combine", self.soc, self.providers,
                                 soc_table.moe_comm_call(self.world, tokens_per_rank, hidden, topk, experts,
                                                         idle_ranks=idle_ranks))
            except soc_table.NoVariant as e:
                raise ValueError(f"--moe-comm dispatch_combine cannot run this call: {e}; "
                                 f"use --moe-comm auto or alltoall") from None
        return self.strategy

    def mc2_ops(self) -> tuple[Callable, Callable, int]:
        """(dispatch, combine, version): torch_npu's on an NPU (v2 where the wheel has it), else the stand-in."""
        if self._mc2 is None:
            if self.device == "npu":
                mod = _import_torch_npu()
            else:
                from .standins import torch_npu as mod
            if hasattr(mod, "npu_moe_distribute_dispatch_v2"):
                self._mc2 = (mod.npu_moe_distribute_dispatch_v2, mod.npu_moe_distribute_combine_v2, 2)
            else:
                self._mc2 = (mod.npu_moe_distribute_dispatch, mod.npu_moe_distribute_combine, 1)
        return self._mc2

    @property
    def comm_name(self) -> str:
        """`group_ep` for the MC2 ops: the HCCL communicator name (handshake of spec section 3.1) on an NPU,
        the stand-in's registered name on a CPU."""
        if self._comm_name is None:
            if self.device == "npu":
                rank = dist.get_rank(self.mc2_group)
                self._comm_name = self.mc2_group._get_backend(torch.device("npu")).get_hccl_comm_name(rank)
            else:
                from .standins.mc2 import register_group

                self._comm_name = register_group(self.mc2_group)
        return self._comm_name


class EPBackend:
    """A contract backend whose `moe_experts` runs expert-parallel; everything else is the inner backend's."""

    def __init__(self, inner: Any, ep: ExpertParallel):
        self.inner = inner
        self.ep = ep
        self.name = getattr(inner, "name", "?")

    def __getattr__(self, attr: str) -> Any:
        if attr == "inner":  # not set yet (e.g. during copy): no recursion
            raise AttributeError(attr)
        return getattr(self.inner, attr)

    # ---- conversions between the inner backend's tensors and the communication tensors ----------------
    def _to_comm(self, a: Any) -> torch.Tensor:
        if isinstance(a, np.ndarray):
            if not a.flags.writeable:
                a = a.copy()
            a = torch.from_numpy(np.ascontiguousarray(a))
        return a.to(self.ep.comm_device)

    def _to_inner(self, t: torch.Tensor, like: Any) -> Any:
        if isinstance(like, np.ndarray):
            return t.cpu().numpy()
        return t.to(like.device)

    def _local(self, x: torch.Tensor, w: torch.Tensor, ids: torch.Tensor, experts: Any, limit: float,
               like: Any) -> torch.Tensor:
        """The inner backend's moe_experts on rows that reached this rank (a partial sum over local experts)."""
        if x.shape[0] == 0:
            return x.new_zeros(x.shape)
        y = self.inner.moe_experts(self._to_inner(x, like[0]), self._to_inner(w, like[0]),
                                   self._to_inner(ids, like[1]), experts, limit)
        return self._to_comm(y)

    # ---- the contract op ----------------------------------------------------------------------------------
    def moe_experts(self, x: Any, weights: Any, ids: Any, experts: Any, limit: float) -> Any:
        ep = self.ep
        if ep.world == 1:  # every expert is local: nothing to exchange
            ep.stats["local"] += 1
            return self.inner.moe_experts(x, weights, ids, experts, limit)
        per = experts.n_experts // ep.world
        if experts.first != ep.rank * per or experts.count != per:
            raise ValueError(f"rank {ep.rank} holds experts [{experts.first}, {experts.first + experts.count}), "
                             f"expected [{ep.rank * per}, {(ep.rank + 1) * per}) for {ep.world} ranks")
        xt, wt, it = self._to_comm(x), self._to_comm(weights), self._to_comm(ids)
        n_tok, hidden = xt.shape[0], xt.shape[1]
        topk = it.shape[1]
        counts = collective("token count all-gather", all_gather_flat,
                            torch.tensor([n_tok], dtype=torch.int64, device=ep.comm_device), ep.group).cpu()
        counts = [int(c) for c in counts]
        tmax = max(counts)
        if tmax == 0:  # no rank has tokens (all idle): nothing to exchange
            return self.inner.zeros((0, hidden))
        strategy = ep.choose(tmax, hidden, topk, experts.n_experts, sum(c == 0 for c in counts))
        ep.stats[strategy] += 1
        like = (x, ids)
        if strategy == "allgather":
            y = self._allgather(xt, wt, it, experts, limit, counts, like)
        elif strategy == "alltoall":
            y = self._alltoall(xt, wt, it, experts, limit, like)
        else:
            y = self._dispatch_combine(xt, wt, it, experts, limit, tmax, like)
        return self._to_inner(y, x)

    def _allgather(self, x, w, ids, experts, limit, counts, like) -> torch.Tensor:
        """Equal-size all_gather + reduce_scatter over buffers padded to the largest rank: gloo's all_gather
        refuses uneven sizes, and HCCL's reduce_scatter takes equal blocks; the padding rows are never
        computed (only the valid rows reach the experts) and come back as zeros."""
        ep = self.ep
        tmax, n = max(counts), x.shape[0]

        def pad(t: torch.Tensor) -> torch.Tensor:
            return torch.cat([t, t.new_zeros((tmax - n,) + tuple(t.shape[1:]))]) if n < tmax else t

        gx = collective("allgather of MoE tokens", all_gather_flat, pad(x), ep.group)
        gw = collective("allgather of routing weights", all_gather_flat, pad(w), ep.group)
        gi = collective("allgather of expert ids", all_gather_flat, pad(ids), ep.group)
        valid = torch.cat([torch.arange(r * tmax, r * tmax + c) for r, c in enumerate(counts)]).to(x.device)
        part = self._local(gx[valid], gw[valid], gi[valid], experts, limit, like)
        buf = part.new_zeros((ep.world * tmax, x.shape[1]))
        buf[valid] = part
        out = collective("reduce_scatter of MoE outputs", reduce_scatter_flat, buf, ep.group)
        return out[:n]

    def _alltoall(self, x, w, ids, experts, limit, like) -> torch.Tensor:
        ep = self.ep
        n, k = ids.shape
        dst = ids.reshape(-1) // experts.count  # owner rank of each (token, k) copy
        order = torch.sort(dst, stable=True).indices
        send = torch.bincount(dst, minlength=ep.world)
        recv = torch.empty_like(send)
        collective("all_to_all of MoE counts", dist.all_to_all_single, recv, send, group=ep.group)
        ss, rs = send.tolist(), recv.tolist()

        def a2a(t: torch.Tensor, what: str, out_splits: list[int], in_splits: list[int]) -> torch.Tensor:
            t = t.contiguous()
            out = t.new_empty((sum(out_splits),) + tuple(t.shape[1:]))
            collective(f"all_to_all of {what}", dist.all_to_all_single, out, t, out_splits, in_splits, group=ep.group)
            return out

        rows = a2a(x[order // k], "MoE tokens", rs, ss)
        rid = a2a(ids.reshape(-1)[order], "expert ids", rs, ss)
        rw = a2a(w.reshape(-1)[order], "routing weights", rs, ss)
        y = self._local(rows, rw[:, None], rid[:, None], experts, limit, like)
        back = a2a(y, "MoE outputs", ss, rs)
        buf = back.new_zeros((n * k, x.shape[1]))
        buf[order] = back
        return buf.reshape(n, k, x.shape[1]).sum(dim=1)  # finalize_routing: sum each token's k expert outputs

    def _dispatch_combine(self, x, w, ids, experts, limit, tmax, like) -> torch.Tensor:
        """MC2 dispatch -> grouped GEMM of the local experts on expand_x (weight 1) -> combine, which applies
        the top-k weights through expert_scales as the fused op does."""
        ep = self.ep
        dispatch, combine, version = ep.mc2_ops()
        n, k = ids.shape
        if n == 0:
            # the op documents 0 < BS: an idle rank sends one dummy token (to k distinct experts) and drops
            # its result; global_bs below already counts one token for every rank
            x = x.new_zeros((1, x.shape[1]))
            ids = torch.arange(k, device=x.device)[None]
            w = w.new_zeros((1, k))
        wire = torch.bfloat16 if ep.device == "npu" and x.dtype == torch.float32 else x.dtype  # bf16/fp16 on NPU
        kw = dict(group_ep=ep.comm_name, ep_world_size=ep.world, ep_rank_id=ep.rank, moe_expert_num=experts.n_experts,
                  expert_shard_type=0, shared_expert_rank_num=0, global_bs=max(tmax, 1) * ep.world)
        ids32 = ids.to(torch.int32)
        try:
            with watchdog.watch("MoE dispatch"):
                expand_x, _dyn, assist, token_nums, recv_counts, _tp, expand_scales = dispatch(
                    x=x.to(wire), expert_ids=ids32, quant_mode=0, expert_token_nums_type=1, **kw)
        except RuntimeError as e:
            raise failed("MoE dispatch", e) from e
        rows = int(token_nums.sum())
        local_ids = torch.repeat_interleave(torch.arange(experts.first, experts.first + experts.count,
                                                         device=expand_x.device), token_nums.to(torch.int64))
        y = self._local(expand_x[:rows].to(x.dtype), torch.ones((rows, 1), dtype=torch.float32, device=x.device),
                        local_ids[:, None], experts, limit, like)
        expert_out = expand_x.new_zeros(expand_x.shape)
        expert_out[:rows] = y.to(expand_x.dtype)
        info = {"assist_info_for_combine": assist} if version == 2 else {"expand_idx": assist}
        try:
            with watchdog.watch("MoE combine"):
                out = combine(expand_x=expert_out, expert_ids=ids32, ep_send_counts=recv_counts,
                              expert_scales=w.to(torch.float32), expand_scales=expand_scales, **info, **kw)
        except RuntimeError as e:
            raise failed("MoE combine", e) from e
        return out[:n].to(x.dtype)
