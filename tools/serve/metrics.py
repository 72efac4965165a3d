"""Prometheus text exposition of the engine's counters, gauges and latency histograms (no client library)."""

from __future__ import annotations

import threading
from typing import Any

LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0)


class Histogram:
    def __init__(self, buckets: tuple[float, ...] = LATENCY_BUCKETS):
        self.buckets = buckets
        self.counts = [0] * len(buckets)
        self.total = 0
        self.sum = 0.0
        self._lock = threading.Lock()

    def observe(self, v: float) -> None:
        with self._lock:
            for i, b in enumerate(self.buckets):
                if v <= b:
                    self.counts[i] += 1
            self.total += 1
            self.sum += v

    def lines(self, name: str, help_text: str) -> list[str]:
        with self._lock:
            out = [f"# HELP {name} {help_text}", f"# TYPE {name} histogram"]
            out += [f'{name}_bucket{{le="{b}"}} {c}' for b, c in zip(self.buckets, self.counts, strict=True)]
            out += [f'{name}_bucket{{le="+Inf"}} {self.total}', f"{name}_sum {self.sum:.6f}",
                    f"{name}_count {self.total}"]
        return out


class Metrics:
    def __init__(self) -> None:
        self.ttft = Histogram()
        self.itl = Histogram()
        self.step = Histogram()
        self.generated_tokens = 0
        self.step_tokens = 0  # prompt and decode tokens run through the model
        self.finished = 0
        self.cancelled = 0
        self.preempted = 0
        self.rejected = 0
        self.gauges: dict[str, Any] = {"running": 0, "waiting": 0, "cache_capacity_tokens": 0,
                                       "cache_used_tokens": 0, "cache_usage_ratio": 0.0, "cache_bytes_total": 0,
                                       "cache_bytes_in_use": 0, "cache_blocks": {}}

    def set_gauges(self, **kw: Any) -> None:
        self.gauges.update(kw)

    def observe_step(self, seconds: float, tokens: int) -> None:
        self.step.observe(seconds)
        self.step_tokens += tokens

    def render(self) -> str:
        g = self.gauges
        lines = [
            "# HELP dsv4_num_requests_running Sequences in the running batch.",
            "# TYPE dsv4_num_requests_running gauge", f"dsv4_num_requests_running {g['running']}",
            "# HELP dsv4_num_requests_waiting Requests waiting for admission.",
            "# TYPE dsv4_num_requests_waiting gauge", f"dsv4_num_requests_waiting {g['waiting']}",
            "# HELP dsv4_cache_usage_ratio Fraction of the tightest cache pool (blocks of one kind over all ranks) "
            "reserved by running sequences.",
            "# TYPE dsv4_cache_usage_ratio gauge", f"dsv4_cache_usage_ratio {g['cache_usage_ratio']:.6f}",
            "# HELP dsv4_cache_capacity_tokens Tokens of context the cache pools were sized for (--cache-tokens, "
            "all ranks).",
            "# TYPE dsv4_cache_capacity_tokens gauge", f"dsv4_cache_capacity_tokens {g['cache_capacity_tokens']}",
            "# HELP dsv4_cache_used_tokens Context tokens the running sequences' reservations cover.",
            "# TYPE dsv4_cache_used_tokens gauge", f"dsv4_cache_used_tokens {g['cache_used_tokens']}",
            "# HELP dsv4_cache_bytes_total Bytes of one rank's cache pools.",
            "# TYPE dsv4_cache_bytes_total gauge", f"dsv4_cache_bytes_total {g['cache_bytes_total']}",
            "# HELP dsv4_cache_bytes_in_use Bytes of the cache blocks sequences hold, all ranks.",
            "# TYPE dsv4_cache_bytes_in_use gauge", f"dsv4_cache_bytes_in_use {g['cache_bytes_in_use']}",
            "# HELP dsv4_generation_tokens_total Tokens generated.",
            "# TYPE dsv4_generation_tokens_total counter", f"dsv4_generation_tokens_total {self.generated_tokens}",
            "# HELP dsv4_processed_tokens_total Prompt and decode tokens run through the model.",
            "# TYPE dsv4_processed_tokens_total counter", f"dsv4_processed_tokens_total {self.step_tokens}",
            "# HELP dsv4_requests_finished_total Requests finished (stop or length).",
            "# TYPE dsv4_requests_finished_total counter", f"dsv4_requests_finished_total {self.finished}",
            "# HELP dsv4_requests_cancelled_total Requests whose client went away mid-generation.",
            "# TYPE dsv4_requests_cancelled_total counter", f"dsv4_requests_cancelled_total {self.cancelled}",
            "# HELP dsv4_requests_preempted_total Preemptions: a sequence's cache released for room, to be "
            "recomputed.",
            "# TYPE dsv4_requests_preempted_total counter", f"dsv4_requests_preempted_total {self.preempted}",
            "# HELP dsv4_requests_rejected_total Requests refused because the waiting queue was full.",
            "# TYPE dsv4_requests_rejected_total counter", f"dsv4_requests_rejected_total {self.rejected}",
        ]
        lines += self._block_lines(g["cache_blocks"])
        lines += self.ttft.lines("dsv4_time_to_first_token_seconds", "Time from arrival to the first token.")
        lines += self.itl.lines("dsv4_inter_token_latency_seconds", "Time between consecutive tokens of a request.")
        lines += self.step.lines("dsv4_engine_step_seconds", "Duration of one engine step (one forward call).")
        return "\n".join(lines) + "\n"

    @staticmethod
    def _block_lines(blocks: dict[str, dict[str, Any]]) -> list[str]:
        """Per-kind block gauges: the pool (the same on every rank), reserved and in use per rank."""
        pool = ["# HELP dsv4_cache_blocks_pool Blocks of each cache kind in one rank's pool.",
                "# TYPE dsv4_cache_blocks_pool gauge"]
        res = ["# HELP dsv4_cache_blocks_reserved Blocks of each kind reserved (peak per sequence) on each rank.",
               "# TYPE dsv4_cache_blocks_reserved gauge"]
        use = ["# HELP dsv4_cache_blocks_in_use Blocks of each kind held by sequences on each rank (ranks other "
               "than 0: as of the last engine step).",
               "# TYPE dsv4_cache_blocks_in_use gauge"]
        for kind, b in blocks.items():
            pool.append(f'dsv4_cache_blocks_pool{{kind="{kind}"}} {b["pool"]}')
            res += [f'dsv4_cache_blocks_reserved{{kind="{kind}",rank="{r}"}} {n}' for r, n in enumerate(b["reserved"])]
            use += [f'dsv4_cache_blocks_in_use{{kind="{kind}",rank="{r}"}} {n}' for r, n in enumerate(b["in_use"])]
        return pool + res + use
