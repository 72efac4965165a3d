"""Per-request logits processing before sampling: min_tokens, logit_bias and the repetition, frequency and presence
penalties, with the meaning and order vLLM's V1 sampler gives them (vllm/v1/sample/sampler.py; checks as in
vllm/sampling_params.py `_verify_args`):

1. min_tokens: until the reply has that many tokens, EOS (unless ignore_eos) and the stop token ids get -inf;
2. logit_bias: added to the named tokens' logits;
3. repetition_penalty r on every token of the prompt or the reply: a positive logit is divided by r, the others
   multiplied by r (the CTRL paper's form, as in transformers' RepetitionPenaltyLogitsProcessor);
4. frequency_penalty f and presence_penalty p on the reply's tokens: logit -= f * count, then -= p.

Temperature, top-k and top-p then apply as usual. Logprobs stay the model's own (before these), vLLM's default.
A request that asks for none of them never comes here: its sampling is exactly `dsv4 generate`'s.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

PENALTY_RANGE = (-2.0, 2.0)  # presence and frequency penalties, as OpenAI and vLLM bound them
BIAS_RANGE = (-100.0, 100.0)  # logit_bias values (OpenAI)


@dataclass(frozen=True)
class Penalties:
    """What one sequence's logits go through before sampling (neutral values do nothing)."""

    presence: float = 0.0
    frequency: float = 0.0
    repetition: float = 1.0
    bias: tuple[tuple[int, float], ...] = ()
    min_tokens: int = 0
    min_tokens_stop: tuple[int, ...] = ()  # ids masked until the reply has min_tokens tokens

    @property
    def active(self) -> bool:
        return bool(self.presence or self.frequency or self.repetition != 1.0 or self.bias
                    or (self.min_tokens and self.min_tokens_stop))


class History:
    """The tokens a sequence's penalties look at: its prompt and its reply. Tokens fed before its first sample are
    the prompt, except past `n_prompt` (a sequence resumed after a preemption feeds prompt + reply so far)."""

    def __init__(self, n_prompt: int | None = None):
        self.n_prompt = n_prompt
        self.prompt: list[int] = []
        self.counts: dict[int, int] = {}  # reply token -> times in the reply
        self.n_out = 0
        self._seen: np.ndarray | None = None  # unique prompt ids, frozen at the first sample

    def fed(self, ids: list[int]) -> None:
        if self._seen is not None:
            return  # decoding: the token fed back was counted when it was sampled
        for t in ids:
            if self.n_prompt is None or len(self.prompt) < self.n_prompt:
                self.prompt.append(t)
            else:
                self._count(t)

    def sampled(self, tok: int) -> None:
        if self._seen is None:
            self._seen = self.prompt_ids()
            self.prompt = []
        self._count(tok)

    def _count(self, tok: int) -> None:
        self.counts[tok] = self.counts.get(tok, 0) + 1
        self.n_out += 1

    def prompt_ids(self) -> np.ndarray:
        return self._seen if self._seen is not None else np.unique(np.asarray(self.prompt, dtype=np.int64))


def apply_penalties(logits: np.ndarray, p: Penalties, h: History) -> np.ndarray:
    """The processed copy of one sequence's logits row [V] (float32), in vLLM's order (module docstring)."""
    z = np.array(logits, dtype=np.float32, copy=True).reshape(-1)
    V = z.shape[0]
    if p.min_tokens_stop and h.n_out < p.min_tokens:
        z[[t for t in p.min_tokens_stop if 0 <= t < V]] = -np.inf
    if p.bias:
        ids = np.fromiter((t for t, _ in p.bias), dtype=np.int64, count=len(p.bias))
        z[ids] += np.fromiter((b for _, b in p.bias), dtype=np.float32, count=len(p.bias))
    out_ids = np.fromiter(h.counts.keys(), dtype=np.int64, count=len(h.counts))
    if p.repetition != 1.0:
        seen = np.union1d(h.prompt_ids(), out_ids)
        r = np.float32(p.repetition)
        v = z[seen]
        z[seen] = np.where(v > 0, v / r, v * r)
    if (p.frequency or p.presence) and len(out_ids):
        counts = np.fromiter(h.counts.values(), dtype=np.float32, count=len(h.counts))
        z[out_ids] -= np.float32(p.frequency) * counts  # two steps, as vLLM subtracts them
        z[out_ids] -= np.float32(p.presence)
    return z
