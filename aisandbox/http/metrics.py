"""Prometheus metrics, one registry per app (so tests can build many apps in one process)."""

from __future__ import annotations

from collections.abc import Iterator

from prometheus_client import CollectorRegistry, Counter, Histogram
from prometheus_client.core import GaugeMetricFamily
from prometheus_client.registry import Collector

from aisandbox.runtime.engine import Engine

__all__ = ["Metrics"]

_LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120)


class _EngineGauges(Collector):
    """Reads the engine's stats at scrape time."""

    def __init__(self, engine: Engine) -> None:
        self._engine = engine

    def collect(self) -> Iterator[GaugeMetricFamily]:
        stats = self._engine.stats()
        health = self._engine.health()
        yield GaugeMetricFamily("aisandbox_requests_running", "Sequences being decoded.", value=stats.running)
        yield GaugeMetricFamily("aisandbox_requests_waiting", "Sequences waiting for prefill.", value=stats.waiting)
        yield GaugeMetricFamily("aisandbox_kv_cache_usage_ratio", "KV cache in use, 0..1.", value=stats.kv_cache_usage)
        yield GaugeMetricFamily("aisandbox_engine_ready", "1 when the engine serves.", value=int(health.ready))
        for name, value in sorted(stats.extra.items()):
            yield GaugeMetricFamily(f"aisandbox_engine_{name}", f"Backend gauge '{name}'.", value=value)


class Metrics:
    """The server's counters and histograms."""

    def __init__(self, engine: Engine) -> None:
        self.registry = CollectorRegistry()
        self.registry.register(_EngineGauges(engine))
        self.requests = Counter(
            "aisandbox_http_requests", "HTTP requests by route and status.", ["route", "status"], registry=self.registry
        )
        self.prompt_tokens = Counter("aisandbox_prompt_tokens", "Prompt tokens processed.", registry=self.registry)
        self.generation_tokens = Counter(
            "aisandbox_generation_tokens", "Completion tokens generated.", registry=self.registry
        )
        self.ttft = Histogram(
            "aisandbox_time_to_first_token_seconds",
            "Time from request to the first generated text.",
            buckets=_LATENCY_BUCKETS,
            registry=self.registry,
        )
        self.e2e = Histogram(
            "aisandbox_request_latency_seconds",
            "Time from request to its last token.",
            buckets=_LATENCY_BUCKETS,
            registry=self.registry,
        )
        self.refused = Counter(
            "aisandbox_requests_refused",
            "Requests refused, by reason (unauthorized, limit_<field>, overloaded, draining, ...).",
            ["reason"],
            registry=self.registry,
        )
        self.finished = Counter(
            "aisandbox_request_finished", "Finished choices by finish reason.", ["reason"], registry=self.registry
        )
