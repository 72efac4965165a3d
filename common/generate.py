"""Batched generation: one packed prefill for all prompts, then one packed decode step per token; the same loop
runs on one process or on several data-parallel ranks (`Ranks` hooks)."""

from __future__ import annotations

import math
import random
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

from .model import Model

SEED_END = 2**63  # seeds are in [0, SEED_END): one numpy Generator seed per run (or per served request)


def seed_or_draw(seed: int | None) -> int:
    """`seed`, or for a run (or served request) that names none one drawn from the OS, in [0, 2**32)."""
    return seed if seed is not None else random.SystemRandom().randrange(2**32)


@dataclass
class SamplingParams:
    """How to sample: `dsv4 generate`'s flags and, extended by tools.serve.engine.Options, a served request's."""

    max_new_tokens: int = 32
    temperature: float = 0.0
    top_k: int = 0
    top_p: float = 1.0
    seed: int | None = None
    stop_on_eos: bool = True

    def __post_init__(self) -> None:
        if self.max_new_tokens < 0:
            raise ValueError(f"max_new_tokens must be >= 0, got {self.max_new_tokens}")
        if not math.isfinite(self.temperature) or self.temperature < 0:
            raise ValueError(f"temperature must be a finite number >= 0, got {self.temperature}")
        if not 0 < self.top_p <= 1:
            raise ValueError(f"top_p must be in (0, 1], got {self.top_p}")
        if self.top_k < 0:
            raise ValueError(f"top_k must be >= 0, got {self.top_k}")
        if self.seed is not None and not 0 <= self.seed < SEED_END:
            raise ValueError(f"seed must be in [0, 2**63), got {self.seed}")


@dataclass
class GenerationResult:
    prompt_ids: list[list[int]]
    output_ids: list[list[int]]
    finish_reasons: list[str]
    prompt_logits: list[Any] | None
    prefill_seconds: float
    decode_seconds: float
    decode_steps: int
    stats: dict = field(default_factory=dict)

    @property
    def prefill_tokens_per_s(self) -> float:
        n = sum(len(p) for p in self.prompt_ids)
        return n / self.prefill_seconds if self.prefill_seconds > 0 else float("inf")

    @property
    def decode_tokens_per_s(self) -> float:
        """Tokens produced by decode steps (all sequences) per second of decode time."""
        n = sum(max(len(o) - 1, 0) for o in self.output_ids)
        return n / self.decode_seconds if self.decode_seconds > 0 else 0.0


def advance(outputs: dict[int, list[int]], reasons: dict[int, str], active: list[int], nxt, eos: set[int],
            max_new_tokens: int) -> list[int]:
    """Append each active sequence's sampled token; return those still generating (no EOS, under the limit)."""
    still = []
    for j, s in enumerate(active):
        t = int(nxt[j])
        outputs[s].append(t)
        if t in eos:
            reasons[s] = "eos"
        elif len(outputs[s]) < max_new_tokens:
            still.append(s)
    return still


class Ranks:
    """Hooks that let several processes run `generate` as one batch (attention data parallel). This default is
    the single process: it owns every prompt and nothing crosses a process boundary. A data-parallel rank
    (ascend.distributed.DataParallelRanks) owns a share of the prompts, agrees on the seed and on when to
    stop, and gathers the results; the loop itself is the same."""

    rank: int = 0
    world: int = 1

    def owned(self, n: int) -> list[int]:
        """The prompts (indices into the batch) this process runs."""
        return list(range(n))

    def agree_seed(self, seed: int | None) -> int:
        """One seed for every process: `seed`, or one drawn here when None."""
        return seed_or_draw(seed)

    def active_anywhere(self, active: list[int], n: int) -> list[int]:
        """The sequences of the whole batch still generating, given this process's active ones (sorted)."""
        return active

    def before_step(self, step: int) -> None:
        """Called before the prefill (step 0) and before each decode step."""

    def gather(self, part: dict[str, Any]) -> list[dict[str, Any]] | None:
        """Every process's part on the one that reports (None on the others)."""
        return [part]


class SharedDraws:
    """Stands in for the sampler's numpy Generator: hands the sampler a process's share of the uniforms that the
    single-process run draws for the whole batch."""

    def __init__(self, u: Any):
        self.u = u

    def random(self, size: Any = None) -> Any:
        if self.u is None or size != len(self.u):
            raise RuntimeError(f"the backend's sampler asked for rng.random({size!r}); multi-rank sampling "
                               f"reproduces single-process draws only for samplers that draw one uniform per row")
        return self.u


def prefill(model: Model, caches: list, prompts: list[list[int]], all_logits: bool, chunk: int | None) -> list:
    """Run the prompts into their caches, `chunk` tokens per sequence per forward call (None: one call);
    -> per prompt its logits (all rows with `all_logits`, else the last row)."""
    if not chunk:
        return model.forward(caches, prompts, all_logits=all_logits).logits
    if chunk < 1:
        raise ValueError(f"prefill chunk must be >= 1, got {chunk}")
    parts: list[list] = [[] for _ in prompts]
    for a in range(0, max(len(p) for p in prompts), chunk):
        live = [i for i, p in enumerate(prompts) if len(p) > a]
        out = model.forward([caches[i] for i in live], [prompts[i][a:a + chunk] for i in live], all_logits=all_logits)
        for j, i in enumerate(live):
            parts[i].append(out.logits[j])
    return [model.B.cat(p) if all_logits else p[-1] for p in parts]


def generate(model: Model, prompts: Sequence[Sequence[int]], params: SamplingParams,
             keep_prompt_logits: bool = False, on_step: Callable[[int], None] | None = None,
             ranks: Ranks | None = None, prefill_chunk: int | None = None) -> GenerationResult | None:
    """Generate for several prompts at once. `on_step(n)` is called after each decode step (progress);
    `prefill_chunk` feeds the prompts in chunks of that many tokens (chunked prefill, single process).

    With `ranks` (data-parallel hooks) every process runs its own prompts in lockstep: MoE layers are
    collectives, so each runs one prefill and then decode steps while ANY process still has an active sequence
    (a process with nothing left runs zero-token forwards). Sampling draws, at each step, the uniforms the
    single process draws for the whole active batch and keeps those of its own sequences, so each sequence
    receives the single-process draws. Returns the whole batch's result on the reporting process, None on the
    others."""
    B = model.B
    ranks = ranks or Ranks()
    if prefill_chunk and ranks.world > 1:  # ranks prefilling different chunk counts would desynchronise the MoE
        raise ValueError("chunked prefill (prefill_chunk) runs in a single process only")
    prompts = [list(map(int, p)) for p in prompts]
    if not prompts or any(len(p) == 0 for p in prompts):
        raise ValueError("every prompt needs at least one token")
    longest = max(len(p) for p in prompts)
    if longest + params.max_new_tokens > model.cfg.max_position_embeddings:  # refused before any forward
        raise ValueError(f"a prompt of {longest} tokens + {params.max_new_tokens} new tokens exceeds "
                         f"max_position_embeddings ({model.cfg.max_position_embeddings})")
    import numpy as np  # host-side RNG for sampling; logits come back to the host anyway

    n = len(prompts)
    mine = ranks.owned(n)
    seed = ranks.agree_seed(params.seed)
    rng = np.random.default_rng(seed)
    eos = set(model.cfg.eos_token_id) if params.stop_on_eos else set()
    caches = {i: model.new_cache() for i in mine}
    outputs: dict[int, list[int]] = {i: [] for i in mine}
    reasons = {i: "length" for i in mine}
    sampling = params.temperature > 0

    def sample(logits: list[Any], active_all: list[int], local: list[int]) -> Any:
        if local == active_all:  # this process holds the whole active batch: the generator itself
            return B.sample(B.cat(logits), params.temperature, params.top_k, params.top_p, rng)
        u = rng.random(len(active_all)) if sampling else None  # the single-process draws, whole batch
        if not local:
            return []
        if u is not None:
            pos = {s: j for j, s in enumerate(active_all)}
            u = u[[pos[s] for s in local]]
        return B.sample(B.cat(logits), params.temperature, params.top_k, params.top_p, SharedDraws(u))

    ranks.before_step(0)
    t0 = time.perf_counter()
    logits = prefill(model, [caches[i] for i in mine], [prompts[i] for i in mine], keep_prompt_logits,
                     prefill_chunk)
    prompt_logits = ({i: B.to_numpy(lg) for i, lg in zip(mine, logits, strict=True)} if keep_prompt_logits
                     else None)
    nxt = sample([lg[-1:] for lg in logits], list(range(n)), mine) if params.max_new_tokens else []
    t1 = time.perf_counter()

    active = list(mine)
    steps = 0
    while params.max_new_tokens:
        active = advance(outputs, reasons, active, nxt, eos, params.max_new_tokens)
        active_all = ranks.active_anywhere(active, n)
        if not active_all:
            break
        ranks.before_step(steps + 1)
        out = model.forward([caches[s] for s in active], [[outputs[s][-1]] for s in active])
        nxt = sample(out.logits, active_all, active)
        steps += 1
        if on_step:
            on_step(steps)
    t2 = time.perf_counter()

    parts = ranks.gather({"outputs": outputs, "reasons": reasons, "logits": prompt_logits})
    if parts is None:
        return None
    all_out: dict[int, list[int]] = {}
    all_reasons: dict[int, str] = {}
    all_logits: dict[int, Any] = {}
    for p in parts:
        all_out.update(p["outputs"])
        all_reasons.update(p["reasons"])
        all_logits.update(p["logits"] or {})
    return GenerationResult(prompts, [all_out[i] for i in range(n)], [all_reasons[i] for i in range(n)],
                            [all_logits[i] for i in range(n)] if keep_prompt_logits else None,
                            t1 - t0, t2 - t1, steps, {"seed": seed})
