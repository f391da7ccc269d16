"""Prometheus metrics of the service, in a registry of its own (one per service instance).

Counters and gauges that mirror live state (cache bytes, hits, misses, evictions, memory per
device, jobs by state) are read at scrape time from the objects that own them, so they can never
drift; the load latency is a histogram observed as loads finish.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Mapping
from typing import Any

from prometheus_client import CollectorRegistry, Histogram, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

from modelkeeper.orchestrator.jobs import JobManager
from modelkeeper.orchestrator.leases import LeaseTable
from modelkeeper.orchestrator.state import PlacementState, StateView
from modelkeeper.orchestrator.workers import SlotState, WorkerSlot

CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"
LOAD_BUCKETS = (0.01, 0.025, 0.05, 0.1, 0.2, 0.5, 1.0, 2.0, 5.0, 10.0, 30.0, 60.0, 120.0)


class _Live(Collector):
    def __init__(
        self,
        cache_stats: Callable[[], dict[str, Any] | None],
        slots: Mapping[str, WorkerSlot],
        view: StateView,
        jobs: JobManager,
        leases: LeaseTable,
    ) -> None:
        self.cache_stats = cache_stats
        self.slots = slots
        self.view = view
        self.jobs = jobs
        self.leases = leases

    def collect(self) -> Iterator[Metric]:
        st = self.cache_stats()
        if st is not None:
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
        for slot in self.slots.values():
            used.add_metric([slot.id], float(slot.used_bytes))
            budget.add_metric([slot.id], float(slot.budget_bytes))
            up.add_metric([slot.id], 1.0 if slot.state is SlotState.READY else 0.0)
            restarts.add_metric([slot.id], float(len(slot.restarts)))
            loaded = sum(1 for p in self.view.on_device(slot.id) if p.state is PlacementState.LOADED)
            models.add_metric([slot.id], float(loaded))
        yield from (used, budget, up, restarts, models)
        jobs = GaugeMetricFamily("modelkeeper_jobs", "Jobs by state.", labels=["state"])
        for state, n in self.jobs.counts().items():
            jobs.add_metric([state], float(n))
        yield jobs
        yield GaugeMetricFamily("modelkeeper_leases", "Active leases.", value=len(self.leases.list()))


class Metrics:
    """The service's metrics: live figures read at scrape time from the parts that own them
    (``cache_stats`` answers None while the cache is not open), and the load-time histogram."""

    def __init__(
        self,
        cache_stats: Callable[[], dict[str, Any] | None],
        slots: Mapping[str, WorkerSlot],
        view: StateView,
        jobs: JobManager,
        leases: LeaseTable,
    ) -> None:
        self.registry = CollectorRegistry()
        self.load_seconds = Histogram(
            "modelkeeper_load_seconds",
            "Seconds a worker took to load one component.",
            ["device", "source"],
            buckets=LOAD_BUCKETS,
            registry=self.registry,
        )
        self.registry.register(_Live(cache_stats, slots, view, jobs, leases))

    def observe_load(self, device: str, source: str, seconds: float) -> None:
        self.load_seconds.labels(device=device, source=source).observe(seconds)

    def render(self) -> bytes:
        return generate_latest(self.registry)
