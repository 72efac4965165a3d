"""Step execution for the serving engine: one forward call over a packed batch, then per-sequence sampling.

`StepExecutor` owns the model, the caches and the per-request random generators of the sequences on its rank.
`LocalRunner` drives one executor in this process; `DistributedRunner` (rank 0) broadcasts each step's plan to
every rank, all ranks run the same step in lockstep (attention data parallel: a sequence lives on one rank;
MoE expert parallel through ascend.ep.EPBackend, so every rank runs one forward per step, zero tokens when it
holds nothing), and rank 0 gathers the sampled tokens with each rank's cache blocks in use (for /metrics, in the
gather the step makes anyway). `worker_loop` is the other ranks' side.

Sampling reproduces `dsv4 generate` for one prompt: each request has its own numpy Generator seeded with its seed,
and the backend's sampler draws one uniform per row, so a request's tokens do not depend on the rest of the batch.
"""

from __future__ import annotations

import itertools
import math
from dataclasses import dataclass, field
from typing import Any

from common.generate import SamplingParams

from .penalties import History, Penalties, apply_penalties


@dataclass
class StepItem:
    """New tokens of one sequence in this step; `sample` when its last row's logits pick the next token."""

    seq_id: int
    ids: list[int]
    sample: bool
    owner: int = 0


@dataclass
class SeqSpec:
    """What an executor needs to host a sequence."""

    seq_id: int
    owner: int
    sampling: SamplingParams  # with its seed set: the executor seeds the sequence's Generator with it
    logprobs: int | None = None  # None: none; k >= 0: the chosen token's logprob and the top k
    penalties: Penalties | None = None  # logits processing before sampling; None: none
    n_prompt: int | None = None  # the request's prompt tokens: a resumed sequence's feed goes on with its reply
    skip_draws: int = 0  # a resumed sequence: uniforms its Generator drew before (the host sampler draws 1 a token)


@dataclass
class TokenResult:
    token: int
    logprob: float | None = None
    top: list[tuple[int, float]] = field(default_factory=list)


@dataclass
class StepPlan:
    add: list[SeqSpec] = field(default_factory=list)
    release: list[int] = field(default_factory=list)
    items: list[StepItem] = field(default_factory=list)
    stop: bool = False


class StepExecutor:
    """Caches and generators of this rank's sequences; applies plans."""

    def __init__(self, model: Any, rank: int = 0):
        self.model = model
        self.B = model.B
        self.rank = rank
        self.caches: dict[int, Any] = {}
        self.specs: dict[int, SeqSpec] = {}
        self.rngs: dict[int, Any] = {}
        self.history: dict[int, History] = {}  # sequences with penalties: the tokens they look at

    def apply(self, plan: StepPlan, forward_when_empty: bool = False) -> dict[int, TokenResult]:
        import numpy as np

        for sid in plan.release:
            cache = self.caches.pop(sid, None)
            if cache is not None:  # its blocks go back to the pools before this step allocates
                self.model.caches.release(cache)
            self.specs.pop(sid, None)
            self.rngs.pop(sid, None)
            self.history.pop(sid, None)
        for spec in plan.add:
            if spec.owner == self.rank:
                self.caches[spec.seq_id] = self.model.new_cache()
                self.specs[spec.seq_id] = spec
                rng = self.rngs[spec.seq_id] = np.random.default_rng(spec.sampling.seed)
                if spec.skip_draws:
                    rng.random(spec.skip_draws)
                if spec.penalties is not None:
                    self.history[spec.seq_id] = History(spec.n_prompt)
        mine = [it for it in plan.items if it.owner == self.rank]
        if not mine and not (forward_when_empty and plan.items):
            return {}
        for it in mine:
            h = self.history.get(it.seq_id)
            if h is not None:
                h.fed(it.ids)
        out = self.model.forward([self.caches[it.seq_id] for it in mine], [it.ids for it in mine])
        results: dict[int, TokenResult] = {}
        for it, lg in zip(mine, out.logits, strict=True):
            if it.sample:
                results[it.seq_id] = self._sample(it.seq_id, lg)
        return results

    def _sample(self, sid: int, logits: Any) -> TokenResult:
        import numpy as np

        spec = self.specs[sid]
        sp = spec.sampling
        h = self.history.get(sid)
        draw = logits
        if h is not None:
            draw = self.B.from_numpy(apply_penalties(self.B.to_numpy(logits), spec.penalties, h)[None])
        tok = int(self.B.sample(draw, sp.temperature, sp.top_k, sp.top_p, self.rngs[sid])[0])
        if h is not None:
            h.sampled(tok)
        if spec.logprobs is None:
            return TokenResult(tok)
        z = np.asarray(self.B.to_numpy(logits), dtype=np.float64)[0]
        lse = float(z.max() + math.log(np.exp(z - z.max()).sum()))
        top = []
        if spec.logprobs > 0:
            idx = np.argpartition(-z, spec.logprobs - 1)[: spec.logprobs]
            idx = idx[np.argsort(-z[idx], kind="stable")]
            top = [(int(i), float(z[i] - lse)) for i in idx]
        return TokenResult(tok, float(z[tok] - lse), top)

    def blocks_in_use(self) -> dict[str, int]:
        """Blocks per cache kind that this rank's sequences hold."""
        return self.model.caches.blocks_in_use()


class LocalRunner:
    """One process holds every sequence."""

    world = 1

    def __init__(self, model: Any):
        self.executor = StepExecutor(model, 0)

    def owner_for(self, loads: list[int], ranks: list[int]) -> int:
        return 0

    def step(self, plan: StepPlan) -> dict[int, TokenResult]:
        return self.executor.apply(plan)

    def blocks_in_use(self) -> list[dict[str, int]]:
        return [self.executor.blocks_in_use()]

    def heartbeat(self) -> None:
        pass

    def close(self) -> None:
        pass


class DistributedRunner:
    """Rank 0's side of a multi-rank server: broadcast the plan, run this rank's share, gather the tokens."""

    def __init__(self, model: Any, rank: int, world: int, ctrl: Any):
        self.executor = StepExecutor(model, rank)
        self.rank, self.world, self.ctrl = rank, world, ctrl
        self.closed = False
        self._in_use: list[dict[str, int]] = [{} for _ in range(world)]  # other ranks: as of the last step

    def owner_for(self, loads: list[int], ranks: list[int]) -> int:
        """The least loaded (sequences it holds) of `ranks`, those with cache room."""
        return min(ranks, key=lambda r: (loads[r], r))

    def step(self, plan: StepPlan) -> dict[int, TokenResult]:
        import torch.distributed as dist

        from ascend.ep import collective

        collective("serve plan broadcast", dist.broadcast_object_list, [plan], src=0, group=self.ctrl)
        if plan.stop:
            self.closed = True
            return {}
        results = self.executor.apply(plan, forward_when_empty=True)
        parts: list[Any] = [None] * self.world
        collective("serve token gather", dist.gather_object, (results, self.executor.blocks_in_use()), parts,
                   dst=0, group=self.ctrl)
        merged: dict[int, TokenResult] = {}
        for r, (res, in_use) in enumerate(parts):
            merged.update(res)
            self._in_use[r] = in_use
        return merged

    def blocks_in_use(self) -> list[dict[str, int]]:
        """Per rank: this rank's now, the others' as they reported them with the last step's tokens (an idle
        engine's heartbeat steps every second)."""
        return [self.executor.blocks_in_use() if r == self.rank else dict(u) for r, u in enumerate(self._in_use)]

    def heartbeat(self) -> None:
        """An empty step: a dead or stuck rank shows up as a collective failure within the timeout."""
        self.step(StepPlan())

    def close(self) -> None:
        if not self.closed:
            self.step(StepPlan(stop=True))


def worker_loop(model: Any, rank: int, world: int, ctrl: Any) -> None:
    """Ranks other than 0: apply every plan rank 0 broadcasts until it says stop. The fault-injection hook of
    ascend/distributed.py (DSV4_FAULT_INJECT=rank:R,step:S[,hang:1], tests only) counts plans here."""
    import os

    import torch.distributed as dist

    from ascend.distributed import FAULT_ENV, _maybe_fault, _parse_fault
    from ascend.ep import collective

    fault = _parse_fault(os.environ.get(FAULT_ENV))
    executor = StepExecutor(model, rank)
    for n in itertools.count():
        _maybe_fault(fault, rank, n)
        box: list[Any] = [None]
        collective("serve plan broadcast", dist.broadcast_object_list, box, src=0, group=ctrl)
        plan: StepPlan = box[0]
        if plan.stop:
            return
        results = executor.apply(plan, forward_when_empty=True)
        collective("serve token gather", dist.gather_object, (results, executor.blocks_in_use()), None, dst=0,
                   group=ctrl)
