"""Batched generation: one packed prefill for all prompts, then one packed decode step per token."""

from __future__ import annotations

import random
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

from .model import Model


@dataclass
class SamplingParams:
    max_new_tokens: int = 32
    temperature: float = 0.0
    top_k: int = 0
    top_p: float = 1.0
    seed: int | None = None
    stop_on_eos: bool = True

    def __post_init__(self) -> None:
        if self.max_new_tokens < 0:
            raise ValueError(f"max_new_tokens must be >= 0, got {self.max_new_tokens}")
        if self.temperature < 0:
            raise ValueError(f"temperature must be >= 0, got {self.temperature}")
        if not 0 < self.top_p <= 1:
            raise ValueError(f"top_p must be in (0, 1], got {self.top_p}")
        if self.top_k < 0:
            raise ValueError(f"top_k must be >= 0, got {self.top_k}")


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


def advance(outputs: list[list[int]], reasons: list[str], active: list[int], nxt, eos: set[int],
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
             prefill_chunk: int | None = None) -> GenerationResult:
    """Generate for several prompts at once. `on_step(n)` is called after each decode step (progress);
    `prefill_chunk` feeds the prompts in chunks of that many tokens (chunked prefill)."""
    B = model.B
    prompts = [list(map(int, p)) for p in prompts]
    if not prompts or any(len(p) == 0 for p in prompts):
        raise ValueError("every prompt needs at least one token")
    import numpy as np  # host-side RNG for sampling; logits come back to the host anyway

    seed = params.seed if params.seed is not None else random.SystemRandom().randrange(2**32)
    rng = np.random.default_rng(seed)
    eos = set(model.cfg.eos_token_id) if params.stop_on_eos else set()
    caches = [model.new_cache() for _ in prompts]
    outputs: list[list[int]] = [[] for _ in prompts]
    reasons = ["length"] * len(prompts)

    t0 = time.perf_counter()
    logits = prefill(model, caches, prompts, keep_prompt_logits, prefill_chunk)
    last = B.cat([lg[-1:] for lg in logits])
    prompt_logits = [B.to_numpy(lg) for lg in logits] if keep_prompt_logits else None
    nxt = B.sample(last, params.temperature, params.top_k, params.top_p, rng) if params.max_new_tokens else []
    t1 = time.perf_counter()

    active = list(range(len(prompts)))
    steps = 0
    while active and params.max_new_tokens:
        active = advance(outputs, reasons, active, nxt, eos, params.max_new_tokens)
        if not active:
            break
        out = model.forward([caches[s] for s in active], [[outputs[s][-1]] for s in active])
        nxt = B.sample(B.cat(out.logits), params.temperature, params.top_k, params.top_p, rng)
        steps += 1
        if on_step:
            on_step(steps)
    t2 = time.perf_counter()
    return GenerationResult(prompts, outputs, reasons, prompt_logits, t1 - t0, t2 - t1, steps,
                            {"seed": seed})
