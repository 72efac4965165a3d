"""The serving engine: a scheduler with continuous batching over a cache budget.

One thread runs the loop. Between steps it takes new requests into a bounded waiting queue, retires cancelled
ones (a client that went away), and admits waiting requests while the cache budget and --max-num-seqs allow.
Each step packs, into one forward call, one token of every decoding sequence and chunks of the prompts still
being prefilled (chunked prefill beside decode, at most `max_batched_tokens` tokens per step); sampled tokens
are detokenised incrementally, checked against stop strings / stop ids / EOS / length, and delivered to the
request's asyncio queue. Finished sequences release their cache at once.

Admission goes through `CacheBudget` so the scheduler does not depend on how caches are stored. A request is
refused at once only when its worst case (prompt + max_tokens) could never fit the cache. The head of the waiting
queue is admitted, first come first served, once some rank has room for its prompt and `reserve_ahead` tokens
more; a decoding sequence's reservation grows by `reserve_ahead` tokens before the step that needs it. When its
rank has no room left, the most recently admitted sequences of that rank are preempted (vLLM's recompute
preemption): their cache is released and they go back to the front of the waiting queue, to be prefilled again
with prompt + the tokens already generated, and then continue; what a client has received stays as it was. The
oldest sequence therefore always progresses (alone on a rank, its worst case fits), and reservations are released
when a sequence finishes or is cancelled. `tools/serve/budget.py` BlockBudget implements the budget over the paged
cache manager's fixed block pools (peak blocks per kind), so no forward call meets a full pool.
"""

from __future__ import annotations

import asyncio
import collections
import itertools
import math
import threading
import time
from dataclasses import dataclass, field, replace
from typing import Any, Protocol

from common.generate import SamplingParams, seed_or_draw

from .metrics import Metrics
from .penalties import BIAS_RANGE, PENALTY_RANGE, Penalties
from .runner import SeqSpec, StepItem, StepPlan, TokenResult

# tokens of context a reservation covers beyond what the sequence needs now: it grows every this many tokens
RESERVE_AHEAD = 64


class CacheBudget(Protocol):
    """What the scheduler needs from a cache manager; a sequence is sized by the context tokens it may reach."""

    def too_large(self, n_tokens: int) -> str | None: ...  # why it could never be admitted, or None
    def ranks_with_room(self, n_tokens: int) -> list[int]: ...  # ranks that can hold it now
    def allocate(self, seq_id: int, n_tokens: int, owner: int) -> None: ...
    def grow(self, seq_id: int, n_tokens: int, want: int, decoding: bool) -> bool: ...  # n_tokens covered?
    def release(self, seq_id: int) -> None: ...
    def stats(self) -> dict[str, Any]: ...  # gauges: cache_capacity_tokens, cache_used_tokens, ...


class QueueFull(Exception):
    """The waiting queue is full (HTTP 429)."""


class RequestTooLarge(Exception):
    """The request could never be admitted: its worst case exceeds the whole cache budget (HTTP 400)."""


class EngineUnavailable(Exception):
    """The engine stopped or failed (HTTP 503)."""


@dataclass
class Options(SamplingParams):
    """Per-request generation options: the sampling parameters of `dsv4 generate` (fields, defaults and checks
    live in SamplingParams) plus what serving adds. The API layer validates the request first, so a bad field is
    a 400 naming the request parameter before SamplingParams sees it."""

    stop: list[str] = field(default_factory=list)
    stop_token_ids: list[int] = field(default_factory=list)
    logprobs: int | None = None  # top alternatives per token; None: no logprobs
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    repetition_penalty: float = 1.0
    logit_bias: dict[int, float] = field(default_factory=dict)
    min_tokens: int = 0

    def __post_init__(self) -> None:
        super().__post_init__()
        lo, hi = PENALTY_RANGE
        for name in ("presence_penalty", "frequency_penalty"):
            v = getattr(self, name)
            if not lo <= v <= hi:  # also refuses NaN
                raise ValueError(f"{name} must be in [{lo:g}, {hi:g}], got {v}")
        if not (math.isfinite(self.repetition_penalty) and self.repetition_penalty > 0):
            raise ValueError(f"repetition_penalty must be a finite number > 0, got {self.repetition_penalty}")
        lo, hi = BIAS_RANGE
        bad = [(t, b) for t, b in self.logit_bias.items() if t < 0 or not lo <= b <= hi]
        if bad:
            raise ValueError(f"logit_bias must map token ids >= 0 to biases in [{lo:g}, {hi:g}], got "
                             f"{bad[0][0]}: {bad[0][1]}")
        if not 0 <= self.min_tokens <= self.max_new_tokens:
            raise ValueError(f"min_tokens must be in [0, max_tokens = {self.max_new_tokens}], got {self.min_tokens}")

    def penalties(self, eos: set[int]) -> Penalties | None:
        """What the executor applies to this request's logits, or None when it asks for nothing."""
        stops = tuple(sorted((eos if self.stop_on_eos else set()) | set(self.stop_token_ids)))
        p = Penalties(self.presence_penalty, self.frequency_penalty, self.repetition_penalty,
                      tuple(sorted(self.logit_bias.items())), self.min_tokens, stops)
        return p if p.active else None


@dataclass
class Event:
    """A piece of a request's output. `finish_reason` is set on the last one; `error` ends it abnormally."""

    token_ids: list[int]
    text: str
    logprobs: list[TokenResult] = field(default_factory=list)
    finish_reason: str | None = None
    prompt_tokens: int = 0
    completion_tokens: int = 0
    error: str | None = None


class Handle:
    """The API side of one request: an asyncio queue of Events."""

    def __init__(self, req_id: int, loop: asyncio.AbstractEventLoop, prompt_len: int):
        self.id = req_id
        self.loop = loop
        self.queue: asyncio.Queue[Event] = asyncio.Queue()
        self.prompt_len = prompt_len

    def push(self, ev: Event) -> None:
        try:
            self.loop.call_soon_threadsafe(self.queue.put_nowait, ev)
        except RuntimeError:  # the event loop is gone (shutdown)
            pass


class _Seq:
    def __init__(self, req_id: int, prompt: list[int], opts: Options, handle: Handle, tokenizer: Any,
                 context: int):
        self.id = req_id
        self.prompt = prompt
        self.opts = opts
        self.handle = handle
        self.feed = self.prompt  # what a prefill runs: the prompt, or after a preemption prompt + out
        self.fed = 0  # tokens of feed already in the cache
        self.seed: int | None = None  # drawn at the first admission, kept across preemptions
        self.out: list[int] = []
        self.text = ""  # detokenised output (stop string removed)
        self.sent = 0  # characters of self.text delivered
        self.tokenizer = tokenizer
        self.max_stop = max((len(s) for s in opts.stop), default=0)
        self.owner = 0
        self.arrived = time.perf_counter()
        self.last_token: float | None = None
        self.context = context  # its worst case: prompt + max_tokens tokens of context, capped

    def detok(self, finished: bool) -> tuple[str, str | None]:
        """New text to deliver, and 'stop' when a stop string ended the reply."""
        if self.tokenizer is None:
            return "", None
        full = self.tokenizer.decode(self.out, skip_special_tokens=False)
        hit = None
        if self.opts.stop and len(self.out) >= self.opts.min_tokens:  # as vLLM: no stop string before min_tokens
            # only a match that ends in the new text counts (one in text seen before min_tokens does not)
            prev = len(self.text.rstrip("\ufffd"))
            found = [(full.find(s, max(0, prev - len(s) + 1)), s) for s in self.opts.stop]
            found = [(i, s) for i, s in found if i >= 0]
            if found:
                full, hit = full[:min(found)[0]], "stop"
        self.text = full
        end = len(full)
        if not finished and hit is None:
            if full.endswith("\ufffd"):  # an incomplete UTF-8 sequence: wait for its next byte
                end = len(full.rstrip("\ufffd"))
            end = max(self.sent, end - max(self.max_stop - 1, 0))  # may be the start of a stop string
        delta, self.sent = full[self.sent:end], max(self.sent, end)
        return delta, hit


class Engine:
    def __init__(self, runner: Any, budget: CacheBudget, tokenizer: Any, eos_ids: list[int], max_num_seqs: int,
                 max_model_len: int, max_batched_tokens: int = 512, max_waiting: int | None = None,
                 metrics: Metrics | None = None, heartbeat_s: float = 1.0, log=None,
                 reserve_ahead: int = RESERVE_AHEAD):
        self.runner = runner
        self.budget = budget
        self.tokenizer = tokenizer
        self.eos = set(eos_ids)
        self.max_num_seqs = max_num_seqs
        self.max_model_len = max_model_len
        self.max_batched_tokens = max(1, max_batched_tokens)
        self.max_waiting = max_waiting if max_waiting is not None else 8 * max_num_seqs
        self.metrics = metrics or Metrics()
        self.heartbeat_s = heartbeat_s
        self.reserve_ahead = max(1, reserve_ahead)  # tokens a reservation covers beyond the context it needs now
        self.log = log or (lambda m: None)
        self._ids = itertools.count(1)
        self._cv = threading.Condition()
        self._inbox: collections.deque[_Seq] = collections.deque()
        self._cancel: set[int] = set()
        self.waiting: collections.deque[_Seq] = collections.deque()
        self.running: dict[int, _Seq] = {}
        self._stopping = False
        self.failed: str | None = None
        self._thread: threading.Thread | None = None
        self._loads = [0] * getattr(runner, "world", 1)
        self._finished: list[int] = []

    # ---- API side (event-loop thread) -------------------------------------------------------------
    @property
    def healthy(self) -> bool:
        return self.failed is None and not self._stopping and self._thread is not None and self._thread.is_alive()

    def submit(self, prompt: list[int], opts: Options, loop: asyncio.AbstractEventLoop) -> Handle:
        with self._cv:
            if not self.healthy:
                raise EngineUnavailable(self.failed or "the engine is not running")
            need = min(len(prompt) + opts.max_new_tokens, self.max_model_len)
            why = self.budget.too_large(need)
            if why is not None:
                raise RequestTooLarge(f"prompt + max_tokens = {need} tokens can never fit the cache: {why}")
            if len(self._inbox) + len(self.waiting) >= self.max_waiting:
                raise QueueFull(f"{self.max_waiting} requests are already waiting; retry later")
            rid = next(self._ids)
            h = Handle(rid, loop, len(prompt))
            self._inbox.append(_Seq(rid, list(prompt), opts, h, self.tokenizer, need))
            self._cv.notify()
        return h

    def cancel(self, req_id: int) -> None:
        """The client went away: drop the request before the next step."""
        with self._cv:
            self._cancel.add(req_id)
            self._cv.notify()

    def start(self) -> None:
        self._thread = threading.Thread(target=self._loop, name="dsv4-engine", daemon=True)
        self._thread.start()

    def stop(self, timeout: float = 30.0) -> None:
        with self._cv:
            self._stopping = True
            self._cv.notify()
        if self._thread is not None:
            self._thread.join(timeout)

    def stats(self) -> dict[str, Any]:
        return {"running": len(self.running), "waiting": len(self.waiting) + len(self._inbox),
                **self.budget.stats()}

    # ---- engine thread --------------------------------------------------------------------------------
    def _loop(self) -> None:
        try:
            while True:
                with self._cv:
                    if self._stopping:
                        break
                    if not self._inbox and not self.waiting and not self.running and not self._cancel:
                        self._cv.wait(self.heartbeat_s)
                    new, self._inbox = list(self._inbox), collections.deque()
                    cancels, self._cancel = self._cancel, set()
                self.waiting.extend(new)
                release, self._finished = self._retire_cancelled(cancels) + self._finished, []
                plan = self._schedule(release)
                self.metrics.set_gauges(**self.stats())
                if not plan.items and not plan.add and not plan.release:
                    self.runner.heartbeat()
                    continue
                t0 = time.perf_counter()
                results = self.runner.step(plan)
                self.metrics.observe_step(time.perf_counter() - t0, sum(len(it.ids) for it in plan.items))
                self._deliver(plan, results)
        except Exception as e:  # a collective failed (dead/stuck rank) or a bug: fail every request, stop
            self.failed = f"engine failed: {type(e).__name__}: {e}"
            self.log(f"dsv4 serve: {self.failed}")
        finally:
            err = self.failed or "the server is shutting down"
            for s in list(self.running.values()) + list(self.waiting) + list(self._inbox):
                s.handle.push(Event([], "", finish_reason=None, error=err, prompt_tokens=len(s.prompt),
                                    completion_tokens=len(s.out)))
            self.running.clear()
            self.waiting.clear()
            if self.failed is None:
                try:
                    self.runner.close()
                except Exception as e:  # peers already gone: nothing left to stop
                    self.log(f"dsv4 serve: closing the ranks: {e}")

    def _retire_cancelled(self, cancels: set[int]) -> list[int]:
        release = []
        if not cancels:
            return release
        self.waiting = collections.deque(s for s in self.waiting if s.id not in cancels)
        for rid in cancels:
            s = self.running.pop(rid, None)
            if s is not None:
                self._free(s)
                release.append(rid)
                self.metrics.cancelled += 1
        return release

    def _free(self, s: _Seq) -> None:
        self.budget.release(s.id)
        self._loads[s.owner] -= 1

    def _schedule(self, release: list[int]) -> StepPlan:
        plan = StepPlan(release=release)
        if not self._grow_reservations(plan):  # no admissions in a step that had to preempt
            self._admit(plan)
        budget = self.max_batched_tokens
        decoding = [s for s in self.running.values() if s.fed == len(s.feed)]
        for s in decoding:  # decode first: one token each keeps inter-token latency flat
            plan.items.append(StepItem(s.id, [s.out[-1]], True, s.owner))
            budget -= 1
        for s in self.running.values():  # then prefill chunks, oldest first, within the step's token budget
            if s.fed < len(s.feed) and budget > 0:
                n = min(budget, len(s.feed) - s.fed)
                plan.items.append(StepItem(s.id, s.feed[s.fed:s.fed + n], s.fed + n == len(s.feed), s.owner))
                s.fed += n
                budget -= n
        return plan

    def _ahead(self, s: _Seq, n: int) -> int:
        return min(s.context, n + self.reserve_ahead)

    def _admit(self, plan: StepPlan) -> None:
        while self.waiting and len(self.running) < self.max_num_seqs:
            s = self.waiting[0]
            first = self._ahead(s, len(s.feed))
            rooms = self.budget.ranks_with_room(first)
            if not rooms:
                break  # first come first served: the head waits for room
            self.waiting.popleft()
            s.owner = self.runner.owner_for(self._loads, rooms)
            self.budget.allocate(s.id, first, s.owner)
            self._loads[s.owner] += 1
            self.running[s.id] = s
            if s.seed is None:  # the executor's Generator needs one, the same again after a preemption
                s.seed = seed_or_draw(s.opts.seed)
            # a resumed sequence: its feed holds its first tokens, its Generator skips the draws they took
            skip = len(s.out) if s.opts.temperature > 0 else 0
            plan.add.append(SeqSpec(s.id, s.owner, replace(s.opts, seed=s.seed), s.opts.logprobs,
                                    s.opts.penalties(self.eos), len(s.prompt), skip))

    def _grow_reservations(self, plan: StepPlan) -> bool:
        """Every decoding sequence's reservation covers the context this step takes it to (prompt + its tokens);
        where its rank has no room, that rank's newest sequences are preempted. Whether any was."""
        preempted = False
        for s in list(self.running.values()):  # oldest first: admission order
            if s.id not in self.running or s.fed < len(s.feed):
                continue  # preempted just now, or still prefilling (admission covered its feed)
            n = len(s.prompt) + len(s.out)
            while not self.budget.grow(s.id, n, self._ahead(s, n), decoding=True):
                victim = next(v for v in reversed(self.running.values()) if v.owner == s.owner)
                self._preempt(victim, plan)
                preempted = True
                if victim is s:
                    break
        return preempted

    def _preempt(self, s: _Seq, plan: StepPlan) -> None:
        self.running.pop(s.id)
        self._free(s)
        plan.release.append(s.id)  # the executor drops its cache before this step allocates
        s.feed, s.fed = s.prompt + s.out, 0
        self.waiting.appendleft(s)  # victims go newest first: the oldest ends up at the head
        self.metrics.preempted += 1
        self.log(f"dsv4 serve: preempted request {s.id} ({len(s.feed)} tokens to recompute): the cache is full")

    def _deliver(self, plan: StepPlan, results: dict[int, TokenResult]) -> None:
        now = time.perf_counter()
        done = []
        for it in plan.items:
            if not it.sample:
                continue
            s = self.running.get(it.seq_id)
            r = results.get(it.seq_id)
            if s is None or r is None:
                continue
            tok = r.token
            reason = None
            emit = [tok]
            if (tok in self.eos and s.opts.stop_on_eos) or tok in s.opts.stop_token_ids:
                reason, emit = "stop", []
            else:
                s.out.append(tok)
                if len(s.out) >= s.opts.max_new_tokens or len(s.prompt) + len(s.out) >= self.max_model_len:
                    reason = "length"
            text, hit = s.detok(reason is not None)
            reason = hit or reason
            if s.last_token is None:
                self.metrics.ttft.observe(now - s.arrived)
            else:
                self.metrics.itl.observe(now - s.last_token)
            s.last_token = now
            self.metrics.generated_tokens += 1
            s.handle.push(Event(emit, text, [r] if s.opts.logprobs is not None and emit else [], reason,
                                len(s.prompt), len(s.out)))
            if reason is not None:
                done.append(s)
        for s in done:
            self.running.pop(s.id, None)
            self._free(s)
            self.metrics.finished += 1
            self._finished.append(s.id)  # the executors drop its cache with the next plan
