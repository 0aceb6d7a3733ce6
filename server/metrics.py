"""Prometheus metrics for one app, in its own CollectorRegistry (never the process-global one).

Request counts and token/latency figures are recorded by the server as requests run; engine
gauges (running, waiting, KV cache usage) are read from `engine.stats()` at scrape time.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator

from prometheus_client import CollectorRegistry, Counter, Histogram, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.registry import Collector
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from athena_runtime.outputs import EngineStats

CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"

# Paths counted under their own label; anything else is "other" (bounded label cardinality).
ENDPOINTS = ("/v1/chat/completions", "/v1/completions", "/v1/models", "/health", "/metrics")

_TTFT_BUCKETS = (0.005, 0.01, 0.02, 0.04, 0.06, 0.08, 0.1, 0.25, 0.5, 0.75, 1.0, 2.5, 5.0, 7.5, 10.0, 20.0, 40.0)
_TPOT_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.075, 0.1, 0.15, 0.2, 0.3, 0.4, 0.5, 0.75, 1.0, 2.5)


class _EngineCollector(Collector):
    """Engine gauges, read when /metrics is scraped."""

    def __init__(self, stats: Callable[[], EngineStats | None]) -> None:
        self._stats = stats

    def collect(self) -> Iterator[Metric]:
        s = self._stats()
        if s is None:  # engine still loading
            return
        yield GaugeMetricFamily("athena_requests_running", "Requests in the running batch.", value=s.running)
        yield GaugeMetricFamily("athena_requests_waiting", "Requests queued for admission.", value=s.waiting)
        yield GaugeMetricFamily("athena_kv_cache_blocks_used", "KV cache blocks in use.", value=s.kv_blocks_used)
        yield GaugeMetricFamily("athena_kv_cache_blocks_total", "KV cache blocks in all.", value=s.kv_blocks_total)
        yield GaugeMetricFamily(
            "athena_kv_cache_usage_ratio",
            "Fraction of KV cache blocks in use (0..1).",
            value=s.kv_blocks_used / s.kv_blocks_total if s.kv_blocks_total else 0.0,
        )
        yield CounterMetricFamily(
            "athena_engine_preemptions", "Sequences preempted for lack of KV blocks.", value=s.preemptions_total
        )
        # hit rate: rate(athena_prefix_cache_hits_total[5m]) / rate(athena_prefix_cache_queries_total[5m])
        yield CounterMetricFamily(
            "athena_prefix_cache_queries",
            "Prompt tokens looked up in the prefix cache.",
            value=s.prefix_cache_queries_total,
        )
        yield CounterMetricFamily(
            "athena_prefix_cache_hits",
            "Prompt tokens whose KV blocks the prefix cache held.",
            value=s.prefix_cache_hits_total,
        )


class ServerMetrics:
    def __init__(self, engine_stats: Callable[[], EngineStats | None]) -> None:
        self.registry = CollectorRegistry()
        r = self.registry
        self.requests = Counter(
            "athena_http_requests", "HTTP requests by endpoint and status.", ["endpoint", "status"], registry=r
        )
        self.prompt_tokens = Counter("athena_prompt_tokens", "Prompt tokens of started generations.", registry=r)
        self.generation_tokens = Counter("athena_generation_tokens", "Tokens generated.", registry=r)
        self.time_to_first_token = Histogram(
            "athena_time_to_first_token_seconds",
            "From request arrival to the first generated token.",
            buckets=_TTFT_BUCKETS,
            registry=r,
        )
        self.time_per_output_token = Histogram(
            "athena_time_per_output_token_seconds",
            "Between generated tokens, after the first.",
            buckets=_TPOT_BUCKETS,
            registry=r,
        )
        r.register(_EngineCollector(engine_stats))

    def render(self) -> bytes:
        return generate_latest(self.registry)


class RequestCountMiddleware:
    """Counts every HTTP response by endpoint and status (499: the client left before a response)."""

    def __init__(self, app: ASGIApp, metrics: ServerMetrics) -> None:
        self.app, self.metrics = app, metrics

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        path = scope.get("path", "")
        endpoint = path if path in ENDPOINTS else "other"
        status: list[int] = []

        async def send_and_count(message: Message) -> None:
            if message["type"] == "http.response.start" and not status:
                status.append(int(message["status"]))
                self.metrics.requests.labels(endpoint, str(status[0])).inc()
            await send(message)

        try:
            await self.app(scope, receive, send_and_count)
        except BaseException as exc:
            if not status:
                self.metrics.requests.labels(endpoint, "500" if isinstance(exc, Exception) else "499").inc()
            raise
