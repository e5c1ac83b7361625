"""/metrics in the Prometheus text exposition format (version 0.0.4), written by hand: a few gauges and
counters read from the engine's EngineStats, and two latency histograms the HTTP layer observes.

Names follow Prometheus conventions (`_total` counters, `_seconds` units) under the `dsmoe_` prefix.
"""

from __future__ import annotations

import bisect
import threading
from collections import Counter

from .protocol import EngineStats

CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"

# Seconds. TTFT spans a queue wait plus a prefill; per-token latency a decode step.
TTFT_BUCKETS = (0.001, 0.005, 0.01, 0.02, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0)
TPOT_BUCKETS = (0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5)


class Histogram:
    """Cumulative buckets, sum and count, as Prometheus histograms expose them. Thread-safe."""

    def __init__(self, name: str, help: str, buckets: tuple[float, ...]) -> None:
        self.name, self.help, self.buckets = name, help, tuple(sorted(buckets))
        self.counts = [0] * (len(self.buckets) + 1)  # the last slot is +Inf
        self.sum = 0.0
        self.count = 0
        self._lock = threading.Lock()

    def observe(self, value: float, times: int = 1) -> None:
        with self._lock:
            self.counts[bisect.bisect_left(self.buckets, value)] += times
            self.sum += value * times
            self.count += times

    def lines(self) -> list[str]:
        with self._lock:
            out = [f"# HELP {self.name} {self.help}", f"# TYPE {self.name} histogram"]
            total = 0
            for bound, n in zip((*self.buckets, float("inf")), self.counts):
                total += n
                le = "+Inf" if bound == float("inf") else repr(bound)
                out.append(f'{self.name}_bucket{{le="{le}"}} {total}')
            out += [f"{self.name}_sum {self.sum!r}", f"{self.name}_count {self.count}"]
        return out


class ServerMetrics:
    """What the HTTP layer measures itself; `render(stats)` adds the engine's gauges and counters."""

    def __init__(self) -> None:
        self.ttft = Histogram("dsmoe_time_to_first_token_seconds",
                              "Time from a request's arrival to its first generated token.", TTFT_BUCKETS)
        self.tpot = Histogram("dsmoe_time_per_output_token_seconds",
                              "Time between consecutive generated tokens of a request.", TPOT_BUCKETS)
        self.finished: Counter[str] = Counter()  # finish_reason -> requests
        self.http_errors: Counter[int] = Counter()  # status -> answers
        self._lock = threading.Lock()

    def request_finished(self, reason: str) -> None:
        with self._lock:
            self.finished[reason] += 1

    def error_answered(self, status: int) -> None:
        with self._lock:
            self.http_errors[status] += 1

    def render(self, stats: EngineStats) -> str:
        lines: list[str] = []

        def metric(name: str, kind: str, help: str, value: float | int) -> None:
            lines.extend((f"# HELP {name} {help}", f"# TYPE {name} {kind}", f"{name} {value}"))

        metric("dsmoe_requests_running", "gauge", "Requests in the running batch.", stats.running)
        metric("dsmoe_requests_waiting", "gauge", "Requests queued for admission.", stats.waiting)
        metric("dsmoe_cache_blocks_used", "gauge", "KV/latent cache blocks in use.", stats.blocks_used)
        metric("dsmoe_cache_blocks_free", "gauge", "KV/latent cache blocks free.", stats.blocks_free)
        metric("dsmoe_cache_block_size_tokens", "gauge", "Tokens per cache block.", stats.block_size)
        metric("dsmoe_prefix_cache_hits_total", "counter", "Prompt tokens served from the prefix cache.",
               stats.prefix_cache_hit_tokens)
        metric("dsmoe_prefix_cache_queries_total", "counter", "Prompt tokens looked up in the prefix cache.",
               stats.prefix_cache_queried_tokens)
        metric("dsmoe_generation_tokens_total", "counter", "Generated tokens.", stats.generated_tokens)
        metric("dsmoe_prompt_tokens_total", "counter", "Prompt tokens admitted.", stats.prompt_tokens)
        metric("dsmoe_preemptions_total", "counter", "Sequences preempted for lack of cache blocks.",
               stats.preemptions)
        metric("dsmoe_speculative_drafted_total", "counter", "MTP draft tokens verified (--speculative).",
               stats.speculative_drafted)
        metric("dsmoe_speculative_accepted_total", "counter", "MTP draft tokens the main model agreed with.",
               stats.speculative_accepted)
        with self._lock:
            name = "dsmoe_requests_finished_total"
            lines += [f"# HELP {name} Finished requests by finish reason.", f"# TYPE {name} counter"]
            for reason in sorted(set(self.finished) | {"stop", "length"}):
                lines.append(f'{name}{{finish_reason="{reason}"}} {self.finished[reason]}')
            name = "dsmoe_http_errors_total"
            lines += [f"# HELP {name} Error answers by HTTP status.", f"# TYPE {name} counter"]
            for status in sorted(self.http_errors):
                lines.append(f'{name}{{status="{status}"}} {self.http_errors[status]}')
        lines += self.ttft.lines() + self.tpot.lines()
        return "\n".join(lines) + "\n"
