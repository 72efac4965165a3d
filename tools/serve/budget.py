"""Cache admission for `dsv4 serve`: fixed block pools per cache kind, and a budget that reserves each sequence's
peak blocks before it runs.

The served Model's PagedCacheManager gets fixed pools (`serve_pools`), sized from --cache-tokens T ("room for T
tokens of context"): what T tokens need as sequences of --max-model-len at their peak per kind
(common/paged_cache.py `sequence_peak_blocks`), plus one partial block per sequence slot. `BlockBudget` (the
engine's `CacheBudget`) reserves, when it admits a sequence and again as it grows, the peak blocks per kind of the
context it may reach before its next growth, run in calls of at most --max-batched-tokens while it prefills and of
one token once it decodes (`PagedCacheManager.peak_blocks`: the sliding kinds hold their window / open compressor
groups plus one call's rows before the trim that follows each forward). The reservations of the running sequences
never exceed the pools, so no forward call can hit CacheFull; the engine preempts a sequence when its rank has no
room for one to grow.

Multi-rank: every rank builds the same pools and a sequence lives on one rank (its owner), so rank 0 keeps one
account per rank: arithmetic only, no collectives.
"""

from __future__ import annotations

import functools
import threading
from collections.abc import Callable
from typing import Any

from common.paged_cache import MAIN, sequence_peak_blocks

# rows per block of the served caches: the smallest block the V4 kernels take (a multiple of 16, <= 1024;
# vllm-ascend sparse_attn_sharedkv README) and Model's default, so the CPU reference serves what it is tested with
SERVE_BLOCK_SIZE = 16


def serve_pools(cfg: Any, cache_tokens: int, max_len: int, chunk: int, slots: int,
                block_size: int = SERVE_BLOCK_SIZE) -> dict[str, int]:
    """Blocks per kind for room for `cache_tokens` tokens of context: whole sequences of `max_len` at their peak,
    the remainder as one shorter sequence, plus one partial block for each of `slots` sequences."""
    full, rest = divmod(cache_tokens, max_len)
    peak = sequence_peak_blocks(cfg, max_len, chunk, block_size)
    part = sequence_peak_blocks(cfg, rest, chunk, block_size)
    return {k: full * peak[k] + part[k] + slots for k in peak}


def describe_pools(manager: Any, cache_tokens: int) -> str:
    """One start-up line: blocks x rows per kind and the bytes the pools take (the manager's accounting)."""
    kinds = manager.kinds_of_group(MAIN)
    parts = [f"{k} {manager.capacity[k]} x {manager.kind_bs(k)}" for k in kinds]
    total = sum(manager.capacity[k] * manager.block_bytes(k) for k in kinds)
    return (f"cache pool for {cache_tokens} tokens of context (--cache-tokens), blocks x rows per kind: "
            f"{', '.join(parts)}; {total / 2**20:.1f} MiB")


class BlockBudget:
    """Per-rank reservations of peak blocks per kind against fixed pools (the engine's CacheBudget)."""

    def __init__(self, manager: Any, chunk: int, world: int = 1, cache_tokens: int = 0,
                 in_use: Callable[[], list[dict[str, int]]] | None = None):
        """`in_use`: blocks per kind held on each rank (the runner's `blocks_in_use`); default: this manager's, as
        rank 0 of one."""
        if not manager.fixed:
            raise ValueError("a block budget needs fixed pools (PagedCacheManager num_blocks)")
        self.mgr = manager
        self.chunk = max(1, chunk)
        self.world = world
        self.cache_tokens = cache_tokens
        self.pool = {k: manager.capacity[k] for k in manager.kinds_of_group(MAIN)}
        self._lock = threading.Lock()  # /metrics reads from the HTTP thread while the engine thread admits
        # seq -> (owner, tokens, blocks per kind, tokens per call the blocks allow for)
        self._held: dict[int, tuple[int, int, dict[str, int], int]] = {}
        self._reserved = [dict.fromkeys(self.pool, 0) for _ in range(world)]
        self.need = functools.lru_cache(maxsize=4096)(self._need)
        self._in_use = in_use or (lambda: [manager.blocks_in_use()])

    def _need(self, n_tokens: int, chunk: int | None = None) -> dict[str, int]:
        """Peak blocks per kind of a sequence whose context grows to `n_tokens` (the engine feeds at most that) in
        calls of up to `chunk` tokens (default: a prefill chunk, --max-batched-tokens)."""
        return self.mgr.peak_blocks(n_tokens, chunk or self.chunk, MAIN)

    def too_large(self, n_tokens: int) -> str | None:
        """Why a sequence of `n_tokens` can never be admitted (its peak exceeds a whole pool), or None."""
        for k, n in self.need(n_tokens).items():
            if n > self.pool[k]:
                return (f"its cache peak needs {n} {k} blocks, more than the whole pool of {self.pool[k]} "
                        f"(--cache-tokens {self.cache_tokens})")
        return None

    def ranks_with_room(self, n_tokens: int) -> list[int]:
        need = self.need(n_tokens)
        with self._lock:
            return [r for r in range(self.world)
                    if all(self._reserved[r][k] + n <= self.pool[k] for k, n in need.items())]

    def allocate(self, seq_id: int, n_tokens: int, owner: int) -> None:
        need = self.need(n_tokens)
        with self._lock:
            short = {k: n for k, n in need.items() if self._reserved[owner][k] + n > self.pool[k]}
            if short:
                raise RuntimeError(f"cache budget: rank {owner} has no room for {short} blocks")
            for k, n in need.items():
                self._reserved[owner][k] += n
            self._held[seq_id] = (owner, n_tokens, need, self.chunk)

    def grow(self, seq_id: int, n_tokens: int, want: int, decoding: bool = False) -> bool:
        """Make the sequence's reservation cover `n_tokens` of context: True when it already does; else it grows
        to `want` tokens (>= n_tokens) if its rank has room, or to `n_tokens`; False (unchanged) when neither fits.
        `decoding`: its calls are one token from now on, so the sliding kinds no longer need a prefill chunk's rows
        (its last chunk was trimmed after its forward): the first such call also gives those blocks back."""
        chunk = 1 if decoding else self.chunk
        with self._lock:
            owner, held, old, held_chunk = self._held[seq_id]
            if n_tokens <= held and held_chunk == chunk:
                return True
            for target in (want, n_tokens) if n_tokens > held else (held,):
                new = self.need(target, chunk)
                if all(self._reserved[owner][k] - old[k] + n <= self.pool[k] for k, n in new.items()):
                    for k, n in new.items():
                        self._reserved[owner][k] += n - old[k]
                    self._held[seq_id] = (owner, target, new, chunk)
                    return True
            return False

    def release(self, seq_id: int) -> None:
        with self._lock:
            held = self._held.pop(seq_id, None)
            if held is None:
                return
            owner, _, need, _ = held
            for k, n in need.items():
                self._reserved[owner][k] -= n

    def stats(self) -> dict[str, Any]:
        """Gauges: tokens reserved, blocks per kind (pool per rank, reserved and in use per rank), bytes (one
        rank's pools; in use over all ranks), and the usage ratio of the tightest pool."""
        with self._lock:
            reserved = [dict(r) for r in self._reserved]
            tokens = sum(t for _, t, _, _ in self._held.values())
        in_use = self._in_use()
        block_bytes = {k: self.mgr.block_bytes(k) for k in self.pool}
        ratio = max((sum(r[k] for r in reserved) / (self.pool[k] * self.world) for k in self.pool if self.pool[k]),
                    default=0.0)
        return {
            "cache_capacity_tokens": self.cache_tokens * self.world,
            "cache_used_tokens": tokens,
            "cache_usage_ratio": ratio,
            "cache_bytes_total": sum(self.pool[k] * block_bytes[k] for k in self.pool),
            "cache_bytes_in_use": sum(u.get(k, 0) * block_bytes[k] for u in in_use for k in self.pool),
            "cache_blocks": {k: {"pool": self.pool[k], "reserved": [r[k] for r in reserved],
                                 "in_use": [u.get(k, 0) for u in in_use]} for k in self.pool},
        }
