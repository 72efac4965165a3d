"""Prometheus text exposition of the engine's counters, gauges and latency histograms (no client library)."""

from __future__ import annotations

import threading

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
        self.rejected = 0
        self.gauges = {"running": 0, "waiting": 0, "cache_capacity_tokens": 0, "cache_used_tokens": 0}

    def set_gauges(self, **kw: int) -> None:
        self.gauges.update(kw)

    def observe_step(self, seconds: float, tokens: int) -> None:
        self.step.observe(seconds)
        self.step_tokens += tokens

    def render(self) -> str:
        g = self.gauges
        cap = max(g["cache_capacity_tokens"], 1)
        lines = [
            "# HELP dsv4_num_requests_running Sequences in the running batch.",
            "# TYPE dsv4_num_requests_running gauge", f"dsv4_num_requests_running {g['running']}",
            "# HELP dsv4_num_requests_waiting Requests waiting for admission.",
            "# TYPE dsv4_num_requests_waiting gauge", f"dsv4_num_requests_waiting {g['waiting']}",
            "# HELP dsv4_cache_usage_ratio Fraction of the cache budget (tokens) reserved by running sequences.",
            "# TYPE dsv4_cache_usage_ratio gauge", f"dsv4_cache_usage_ratio {g['cache_used_tokens'] / cap:.6f}",
            "# HELP dsv4_cache_capacity_tokens Tokens the cache budget holds.",
            "# TYPE dsv4_cache_capacity_tokens gauge", f"dsv4_cache_capacity_tokens {g['cache_capacity_tokens']}",
            "# HELP dsv4_generation_tokens_total Tokens generated.",
            "# TYPE dsv4_generation_tokens_total counter", f"dsv4_generation_tokens_total {self.generated_tokens}",
            "# HELP dsv4_processed_tokens_total Prompt and decode tokens run through the model.",
            "# TYPE dsv4_processed_tokens_total counter", f"dsv4_processed_tokens_total {self.step_tokens}",
            "# HELP dsv4_requests_finished_total Requests finished (stop or length).",
            "# TYPE dsv4_requests_finished_total counter", f"dsv4_requests_finished_total {self.finished}",
            "# HELP dsv4_requests_cancelled_total Requests whose client went away mid-generation.",
            "# TYPE dsv4_requests_cancelled_total counter", f"dsv4_requests_cancelled_total {self.cancelled}",
            "# HELP dsv4_requests_rejected_total Requests refused because the waiting queue was full.",
            "# TYPE dsv4_requests_rejected_total counter", f"dsv4_requests_rejected_total {self.rejected}",
        ]
        lines += self.ttft.lines("dsv4_time_to_first_token_seconds", "Time from arrival to the first token.")
        lines += self.itl.lines("dsv4_inter_token_latency_seconds", "Time between consecutive tokens of a request.")
        lines += self.step.lines("dsv4_engine_step_seconds", "Duration of one engine step (one forward call).")
        return "\n".join(lines) + "\n"
