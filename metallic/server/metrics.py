"""What an operator sees: one log line per request, and Prometheus figures at `GET /metrics`.

Request figures are counted as requests go: requests by route and status, why generations ended,
prompt and generated tokens, time to first token, the gaps between tokens, the whole duration.
Engine figures are read at scrape time from the engine process's latest `Engine.stats()` (at most
half a second old while it runs, fresh once it is idle): queue depth, running sequences, KV blocks
used and in all per pool, prefix-cache hits, weight, KV-cache and memory-pool bytes.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Iterator

from prometheus_client import CollectorRegistry, Counter, Histogram, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric

from metallic.server.async_engine import AsyncEngine

log = logging.getLogger("metallic.server")

LATENCY_BUCKETS = (0.005, 0.01, 0.02, 0.04, 0.08, 0.16, 0.32, 0.64, 1.28, 2.56, 5.12, 10.24, 20.48)


class ServerMetrics:
    def __init__(self, engine: AsyncEngine) -> None:
        self.registry = CollectorRegistry()
        r = self.registry
        self.requests = Counter(
            "metallic_requests",
            "HTTP requests by route and status",
            ["route", "status"],
            registry=r,
        )
        self.finished = Counter(
            "metallic_generations_finished", "Generations by finish reason", ["reason"], registry=r
        )
        self.prompt_tokens = Counter("metallic_prompt_tokens", "Prompt tokens", registry=r)
        self.generated_tokens = Counter(
            "metallic_generation_tokens", "Generated tokens", registry=r
        )
        self.ttft = Histogram(
            "metallic_time_to_first_token_seconds",
            "Request arrival to its first generated token",
            buckets=LATENCY_BUCKETS,
            registry=r,
        )
        self.inter_token = Histogram(
            "metallic_inter_token_latency_seconds",
            "Time between consecutive tokens of one generation",
            buckets=LATENCY_BUCKETS,
            registry=r,
        )
        self.duration = Histogram(
            "metallic_request_duration_seconds",
            "Request arrival to its last token",
            buckets=LATENCY_BUCKETS,
            registry=r,
        )
        r.register(_EngineCollector(engine))

    def render(self) -> bytes:
        return generate_latest(self.registry)


class RequestTrace:
    """One request's timing and counts: observed into the metrics as it goes, and logged as one
    line when it ends."""

    def __init__(self, metrics: ServerMetrics, route: str, request_id: str) -> None:
        self.metrics = metrics
        self.route = route
        self.request_id = request_id
        self.started = time.perf_counter()
        self.first_token: float | None = None
        self.last_token: dict[int, float] = {}  # per choice
        self.prompt_tokens = 0
        self.generated = 0
        self.reasons: list[str] = []
        self.ended = False

    def tokens(self, choice: int, n: int) -> None:
        """`n` tokens of `choice` arrived now. Every token after a choice's first gets one
        inter-token observation: tokens that arrive together (outputs merged while a stream
        lagged) share the gap since the last arrival, the first of a choice's first arrival
        counts as its time to first token instead."""
        if not n:
            return
        now = time.perf_counter()
        if self.first_token is None:
            self.first_token = now
            self.metrics.ttft.observe(now - self.started)
        last = self.last_token.get(choice)
        gaps = [(now - last) / n] * n if last is not None else [0.0] * (n - 1)
        for gap in gaps:
            self.metrics.inter_token.observe(gap)
        self.last_token[choice] = now
        self.generated += n

    def finish_reason(self, reason: str) -> None:
        self.reasons.append(reason)
        self.metrics.finished.labels(reason).inc()

    def end(self, status: int) -> None:
        """Count the request and write its log line (once: later calls change nothing)."""
        if self.ended:
            return
        self.ended = True
        m = self.metrics
        total = time.perf_counter() - self.started
        m.requests.labels(self.route, str(status)).inc()
        m.prompt_tokens.inc(self.prompt_tokens)
        m.generated_tokens.inc(self.generated)
        if self.generated:
            m.duration.observe(total)
        ttft = f"{self.first_token - self.started:.3f}s" if self.first_token else "-"
        log.info(
            "%s %s %d: %d prompt tokens, %d generated, first token %s, total %.3fs, %s",
            self.request_id,
            self.route,
            status,
            self.prompt_tokens,
            self.generated,
            ttft,
            total,
            ",".join(self.reasons) or "-",
        )


class _EngineCollector:
    """Engine figures from the latest snapshot, produced when Prometheus scrapes."""

    def __init__(self, engine: AsyncEngine) -> None:
        self.engine = engine

    def collect(self) -> Iterator[Metric]:
        stats = self.engine.stats
        scheduler, prefix = stats["scheduler"], stats["prefix_cache"]
        yield _gauge(
            "metallic_requests_waiting",
            "Requests waiting to run",
            scheduler["waiting"],
        )
        yield _gauge("metallic_requests_running", "Sequences running", scheduler["running"])
        yield CounterMetricFamily(
            "metallic_preemptions", "Sequences preempted", value=scheduler["preemptions"]
        )
        used = GaugeMetricFamily("metallic_kv_blocks_used", "KV blocks held", labels=["pool"])
        total = GaugeMetricFamily("metallic_kv_blocks", "KV blocks in all", labels=["pool"])
        for i, pool in enumerate(stats["kv_pools"]):
            used.add_metric([str(i)], pool["blocks_used"])
            total.add_metric([str(i)], pool["blocks"])
        yield used
        yield total
        looked_up, hits = prefix["prompt_tokens"], prefix["hit_tokens"]
        yield CounterMetricFamily(
            "metallic_prefix_cache_queries_tokens", "Prompt tokens looked up", value=looked_up
        )
        yield CounterMetricFamily(
            "metallic_prefix_cache_hits_tokens", "Prompt tokens found cached", value=hits
        )
        yield _gauge(
            "metallic_prefix_cache_hit_rate",
            "Share of prompt tokens found in the prefix cache",
            hits / looked_up if looked_up else 0.0,
        )
        yield _gauge("metallic_weight_bytes", "Weight bytes on the device", stats["weight_bytes"])
        yield _gauge("metallic_kv_cache_bytes", "KV-cache bytes", stats["kv_cache_bytes"])
        pool = stats.get("memory_pool")
        if pool:
            family = GaugeMetricFamily(
                "metallic_memory_pool_bytes",
                "Device memory pool bytes by kind (current, peak, reserved)",
                labels=["kind", "measure"],
            )
            for kind, figures in pool["kinds"].items():
                for measure in ("current", "peak", "reserved"):
                    family.add_metric([kind, measure], figures[f"{measure}_bytes"])
            yield family


def _gauge(name: str, documentation: str, value: float) -> GaugeMetricFamily:
    return GaugeMetricFamily(name, documentation, value=value)
