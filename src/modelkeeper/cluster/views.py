"""What the API reads of the cluster: status, devices, the model list and detail, health, metrics.

The shapes follow the single-host views (``orchestrator/views.py``) so that the same routes, client
and CLI work: devices are ``node/device``, a model's ``id`` is its cluster key, and status adds
``nodes``. The components listing is every node's, merged (``records.py``).
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any

from prometheus_client import CollectorRegistry, generate_latest
from prometheus_client.core import GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

from modelkeeper.cluster.catalog import ClusterCatalog
from modelkeeper.cluster.membership import Membership
from modelkeeper.cluster.records import ClusterRecords
from modelkeeper.cluster.view import ClusterState
from modelkeeper.orchestrator.errors import DeviceNotFound
from modelkeeper.orchestrator.jobs import JobManager
from modelkeeper.orchestrator.leases import LeaseTable
from modelkeeper.orchestrator.workers import SlotState


class ClusterViews:
    def __init__(
        self,
        catalog: ClusterCatalog,
        view: ClusterState,
        members: Membership,
        leases: LeaseTable,
        jobs: JobManager,
        *,
        records: ClusterRecords,
        ready: Callable[[], bool],
        address: Callable[[], str],
    ) -> None:
        self.records = records
        self.catalog = catalog
        self.view = view
        self.members = members
        self.leases = leases
        self.jobs = jobs
        self.ready = ready
        self.address = address
        self.started_at = time.time()

    def status(self) -> dict[str, Any]:
        return {
            "ready": self.ready(),
            "uptime_seconds": round(time.time() - self.started_at, 3),
            "cluster": {"address": self.address(), "lost_nodes": dict(self.members.lost)},
            **self.view.status(),
            "jobs": self.jobs.counts(),
            "leases": len(self.leases.list()),
        }

    def status_json(self) -> bytes:
        return json.dumps(self.status(), separators=(",", ":")).encode()

    def device(self, device: str) -> dict[str, Any]:
        for node, d in self.view.devices():
            status = self.view.device_status(node, d)
            if status["id"] == device:
                return status
        raise DeviceNotFound(
            f"no device {device!r} in the cluster (devices are named node/device)", device=device
        )

    def loaded_on(self, key: str) -> list[str]:
        return [p["device"] for p in self.view.placements(key) if p["state"] == "loaded"]

    async def list_models(
        self,
        *,
        type: str | None = None,
        query: str | None = None,
        sort: str = "name",
        descending: bool = False,
        limit: int = 50,
        offset: int = 0,
        **_ignored: Any,
    ) -> dict[str, Any]:
        """Every model of the cluster (filtered by type and a text query over names), each with the
        nodes that have it and the devices it is loaded on."""
        items = [m.summary() for m in self.catalog.models().values()]
        if type:
            items = [m for m in items if m["type"] == type]
        if query:
            items = [m for m in items if query.lower() in m["name"].lower()]
        field = {"created": "name", "updated": "name"}.get(sort, sort)
        items.sort(key=lambda m: (m.get(field) is None, m.get(field) or 0), reverse=descending)
        page = items[offset : offset + limit]
        for m in page:
            m["loaded_on"] = self.loaded_on(m["id"])
        return {"total": len(items), "offset": offset, "limit": limit, "items": page}

    async def available(self, type: str | None = None) -> list[dict[str, Any]]:
        page = await self.list_models(type=type, limit=1_000_000)
        return [m for m in page["items"] if m["type"] != "unknown"]

    async def components(self, type: str | None = None) -> list[dict[str, Any]]:
        """Components across every model of every node (see ``records.py``)."""
        return await self.records.components(type)

    async def model_detail(self, ref: str, *, history: int = 20) -> dict[str, Any]:
        """A model across the cluster: where it lies on disk, in RAM caches and in VRAM."""
        model = await self.catalog.resolve(ref)
        return {
            **model.summary(),
            "state": {
                "disk": [{"node": n, "path": loc["path"]} for n, loc in model.locations.items()],
                "ram": [
                    {"node": n, "bytes": loc["ram_bytes"]}
                    for n, loc in model.locations.items()
                    if loc["ram_bytes"]
                ],
                "vram": self.view.placements(model.key),
            },
        }


@dataclass
class DeviceSlot:
    """A device as the health route reads it (``id``, ``state``)."""

    id: str
    state: SlotState


class ClusterPool:
    """The devices of every node, as ``pool.slots`` of one host."""

    def __init__(self, view: ClusterState) -> None:
        self.view = view

    @property
    def slots(self) -> dict[str, DeviceSlot]:
        out = {}
        for node, d in self.view.devices():
            status = self.view.device_status(node, d)
            out[status["id"]] = DeviceSlot(status["id"], SlotState(d["state"]))
        return out


class _Live(Collector):
    def __init__(self, view: ClusterState, members: Membership) -> None:
        self.view = view
        self.members = members

    def collect(self) -> Iterator[Metric]:
        nodes = GaugeMetricFamily("modelkeeper_cluster_nodes", "Nodes whose agent answers.")
        nodes.add_metric([], len(self.members.links))
        yield nodes
        budget = GaugeMetricFamily(
            "modelkeeper_device_budget_bytes", "Bytes models may use.", labels=["device"]
        )
        used = GaugeMetricFamily("modelkeeper_device_used_bytes", "Bytes models use.", labels=["device"])
        for node, d in self.view.devices():
            dev = f"{node.name}/{d['id']}"
            budget.add_metric([dev], float(d["budget"]))
            used.add_metric([dev], float(d["used"]))
        yield budget
        yield used


class ClusterMetrics:
    def __init__(self, view: ClusterState, members: Membership) -> None:
        self.registry = CollectorRegistry()
        self.registry.register(_Live(view, members))

    def render(self) -> bytes:
        return generate_latest(self.registry)
