"""Prometheus metrics of the service, in a registry of its own (one per service instance).

Counters and gauges that mirror live state (cache bytes, hits, misses, evictions, memory per
device, jobs by state) are read at scrape time from the objects that own them, so they can never
drift; the load latency is a histogram observed as loads finish.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import TYPE_CHECKING

from prometheus_client import CollectorRegistry, Histogram, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

if TYPE_CHECKING:
    from modelkeeper.orchestrator.service import Orchestrator

CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"
LOAD_BUCKETS = (0.01, 0.025, 0.05, 0.1, 0.2, 0.5, 1.0, 2.0, 5.0, 10.0, 30.0, 60.0, 120.0)


class _Live(Collector):
    def __init__(self, service: Orchestrator) -> None:
        self.service = service

    def collect(self) -> Iterator[Metric]:
        s = self.service
        if s._cache is not None:
            st = s._cache.stats()
            yield GaugeMetricFamily(
                "modelkeeper_cache_bytes", "Bytes held by the RAM cache.", value=st["bytes_used"]
            )
            yield GaugeMetricFamily(
                "modelkeeper_cache_budget_bytes", "Budget of the RAM cache.", value=st["budget_bytes"]
            )
            yield GaugeMetricFamily(
                "modelkeeper_cache_segments", "Segments in the RAM cache.", value=st["segments"]
            )
            yield CounterMetricFamily("modelkeeper_cache_hits", "RAM cache hits.", value=st["hits"])
            yield CounterMetricFamily("modelkeeper_cache_misses", "RAM cache misses.", value=st["misses"])
            yield CounterMetricFamily(
                "modelkeeper_cache_evictions", "RAM cache evictions.", value=st["evictions"]
            )
        used = GaugeMetricFamily(
            "modelkeeper_device_memory_used_bytes", "Bytes of loaded models per device.", labels=["device"]
        )
        budget = GaugeMetricFamily(
            "modelkeeper_device_memory_budget_bytes", "What models may use per device.", labels=["device"]
        )
        up = GaugeMetricFamily(
            "modelkeeper_worker_up", "1 when the device's worker is ready.", labels=["device"]
        )
        restarts = CounterMetricFamily("modelkeeper_worker_restarts", "Worker restarts.", labels=["device"])
        models = GaugeMetricFamily(
            "modelkeeper_models_loaded", "Models loaded per device.", labels=["device"]
        )
        for slot in s.slots.values():
            used.add_metric([slot.id], float(slot.memory.get("models_bytes", 0)))
            budget.add_metric([slot.id], float(slot.memory.get("budget_bytes", 0)))
            up.add_metric([slot.id], 1.0 if slot.state.value == "ready" else 0.0)
            restarts.add_metric([slot.id], float(len(slot.restarts)))
            models.add_metric(
                [slot.id], float(sum(1 for p in s.view.on_device(slot.id) if p.state == "loaded"))
            )
        yield from (used, budget, up, restarts, models)
        jobs = GaugeMetricFamily("modelkeeper_jobs", "Jobs by state.", labels=["state"])
        for state, n in s.jobs.counts().items():
            jobs.add_metric([state], float(n))
        yield jobs
        yield GaugeMetricFamily("modelkeeper_leases", "Active leases.", value=len(s.leases.list()))


class Metrics:
    def __init__(self, service: Orchestrator) -> None:
        self.registry = CollectorRegistry()
        self.load_seconds = Histogram(
            "modelkeeper_load_seconds",
            "Seconds a worker took to load one component.",
            ["device", "source"],
            buckets=LOAD_BUCKETS,
            registry=self.registry,
        )
        self.registry.register(_Live(service))

    def observe_load(self, device: str, source: str, seconds: float) -> None:
        self.load_seconds.labels(device=device, source=source).observe(seconds)

    def render(self) -> bytes:
        return generate_latest(self.registry)
