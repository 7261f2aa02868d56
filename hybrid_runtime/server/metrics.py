"""Server counters in the Prometheus text format (no client library needed)."""

from __future__ import annotations

import threading
from collections import Counter
from dataclasses import dataclass, field

_BUCKETS = (0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120, 300)


@dataclass(slots=True)
class Histogram:
    counts: list[int] = field(default_factory=lambda: [0] * len(_BUCKETS))
    total: float = 0.0
    n: int = 0

    def observe(self, v: float) -> None:
        for i, b in enumerate(_BUCKETS):
            if v <= b:
                self.counts[i] += 1
        self.total += v
        self.n += 1

    def lines(self, name: str) -> list[str]:
        out = [f'{name}_bucket{{le="{b}"}} {c}' for b, c in zip(_BUCKETS, self.counts)]
        return out + [f'{name}_bucket{{le="+Inf"}} {self.n}', f"{name}_sum {self.total:.6f}", f"{name}_count {self.n}"]


@dataclass(slots=True)
class Metrics:
    requests: Counter = field(default_factory=Counter)  # (endpoint, status code) → count
    prompt_tokens: int = 0
    cached_tokens: int = 0
    generated_tokens: int = 0
    cancelled: int = 0
    latency: Histogram = field(default_factory=Histogram)
    ttft: Histogram = field(default_factory=Histogram)
    lock: threading.Lock = field(default_factory=threading.Lock)

    def count_request(self, endpoint: str, status: int) -> None:
        with self.lock:
            self.requests[(endpoint, status)] += 1

    def finished(self, stats, latency_s: float, ttft_s: float | None, cancelled: bool) -> None:
        with self.lock:
            if stats is not None:
                self.prompt_tokens += stats.prompt_tokens
                self.cached_tokens += stats.cached_tokens
                self.generated_tokens += stats.generated_tokens
            self.cancelled += int(cancelled)
            self.latency.observe(latency_s)
            if ttft_s is not None:
                self.ttft.observe(ttft_s)

    def render(self, engine, loaded: bool) -> str:
        """engine: the Engine's EngineStats (None before the model is loaded)."""
        p = "hybrid_runtime"
        with self.lock:
            lines = [f"# TYPE {p}_requests_total counter"]
            lines += [f'{p}_requests_total{{endpoint="{e}",status="{s}"}} {n}' for (e, s), n in sorted(self.requests.items())]
            for name, v in (("prompt_tokens_total", self.prompt_tokens), ("cached_prompt_tokens_total", self.cached_tokens),
                            ("generated_tokens_total", self.generated_tokens), ("requests_cancelled_total", self.cancelled)):
                lines += [f"# TYPE {p}_{name} counter", f"{p}_{name} {v}"]
            lines += [f"# TYPE {p}_request_duration_seconds histogram", *self.latency.lines(f"{p}_request_duration_seconds")]
            lines += [f"# TYPE {p}_time_to_first_token_seconds histogram", *self.ttft.lines(f"{p}_time_to_first_token_seconds")]
        e = engine
        gauges = [("queue_length", e.waiting if e else 0), ("running_requests", e.running if e else 0),
                  ("model_loaded", int(loaded))]
        counters = []
        if e is not None:
            gauges += [("batch_size", e.batch_size), ("generated_tokens_per_second", round(e.tokens_per_s, 3)),
                       ("cache_reserved_tokens", e.reserved_tokens), ("cache_budget_tokens", e.budget_tokens)]
            if e.cache_blocks is not None:
                gauges += [("cache_blocks_in_use", e.cache_blocks_in_use), ("cache_blocks", e.cache_blocks)]
            counters += [("decode_steps_total", e.steps), ("decode_step_tokens_total", e.step_tokens),
                         ("decode_step_seconds_total", round(e.step_seconds, 6)),
                         ("shared_prefix_tokens_total", e.shared_tokens)]
            if e.expert_reads is not None:
                counters += [("expert_reads_total", e.expert_reads), ("expert_read_bytes_total", e.expert_bytes)]
        for name, v in gauges:
            lines += [f"# TYPE {p}_{name} gauge", f"{p}_{name} {v}"]
        for name, v in counters:
            lines += [f"# TYPE {p}_{name} counter", f"{p}_{name} {v}"]
        return "\n".join(lines) + "\n"
