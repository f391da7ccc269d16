"""Views: what the service answers about the state of things, built from its parts, never from a
worker call. The status snapshot is rebuilt only after an event or when ``STATUS_MAX_AGE`` has
passed (memory figures are polled), so hundreds of pollers a second cost one build, not one each."""

from __future__ import annotations

import json
import time
from collections.abc import Callable
from typing import Any

from modelkeeper.orchestrator.cachefeed import CacheFeed
from modelkeeper.orchestrator.catalog import Catalog
from modelkeeper.orchestrator.events import EventBus
from modelkeeper.orchestrator.jobs import JobManager
from modelkeeper.orchestrator.leases import LeaseTable
from modelkeeper.orchestrator.pool import WorkerPool
from modelkeeper.orchestrator.state import Placement, StateView
from modelkeeper.registry import ModelRecord

STATUS_MAX_AGE = 0.25  # seconds a status snapshot may serve when no event came
DETAIL_FIELDS = ("rule", "rules", "confidence", "evidence", "hints", "hint_conflicts", "loadable")


class Views:
    def __init__(
        self,
        catalog: Catalog,
        feed: CacheFeed,
        pool: WorkerPool,
        view: StateView,
        leases: LeaseTable,
        jobs: JobManager,
        bus: EventBus,
        *,
        ready: Callable[[], bool],
    ) -> None:
        self.catalog = catalog
        self.feed = feed
        self.pool = pool
        self.view = view
        self.leases = leases
        self.jobs = jobs
        self.bus = bus
        self.ready = ready
        self.started_at = time.time()
        self._snapshot: tuple[int, float, bytes] | None = None

    def placement(self, p: Placement) -> dict[str, Any]:
        return self.view.info(p, len(self.leases.holding(p.model_id, p.device)))

    def tiers(self, record: ModelRecord) -> dict[str, Any]:
        """Where the model is: disk (its file), ram (cached components), vram (per device), failures."""
        ram = [
            {"component_id": s["component_id"], "bytes": s["bytes"]}
            for s in self.feed.segments()
            if record.id in s["models"]
        ]
        return {
            "disk": {"status": record.status, "path": record.path, "bytes": record.size},
            "ram": ram,
            "vram": [self.placement(p) for p in self.view.of_model(record.id)],
            "failed": [f.info() for f in self.view.failures_of(record.id)],
        }

    def device(self, device: str) -> dict[str, Any]:
        slot = self.pool.slot(device)
        return {**slot.info(), "models": [self.placement(p) for p in self.view.on_device(device)]}

    def status(self) -> dict[str, Any]:
        return {
            "ready": self.ready(),
            "uptime_seconds": round(time.time() - self.started_at, 3),
            "devices": [self.device(d) for d in self.pool.slots],
            "cache": self.feed.cache.stats() if self.feed.is_open else None,
            "jobs": self.jobs.counts(),
            "leases": len(self.leases.list()),
        }

    def status_json(self) -> bytes:
        """``status()`` as JSON, from the snapshot (see the module docstring)."""
        now = time.monotonic()
        cached = self._snapshot
        if cached is None or cached[0] != self.bus.last_id or now - cached[1] > STATUS_MAX_AGE:
            body = json.dumps(self.status(), separators=(",", ":")).encode()
            self._snapshot = cached = (self.bus.last_id, now, body)
        return cached[2]

    def loaded_on(self, model_id: str) -> list[str]:
        return [p.device for p in self.view.of_model(model_id) if p.state == "loaded"]

    async def list_models(self, **filters: Any) -> dict[str, Any]:
        """A page of the registry's search, each model with the devices it is loaded on."""
        page = await self.catalog.search(**filters)
        out = page.model_dump(mode="json")
        for item in out["items"]:
            item["loaded_on"] = self.loaded_on(item["id"])
        return out

    async def available(self, type: str | None = None) -> list[dict[str, Any]]:
        page = await self.catalog.search(type=type, limit=10_000)
        return [
            {**item.model_dump(mode="json"), "loaded_on": [p.device for p in self.view.of_model(item.id)]}
            for item in page.items
            if item.type not in ("unknown",)
        ]

    async def components(self, type: str | None = None) -> list[dict[str, Any]]:
        """Components across every model (one entry per content id once hashed), cached or not."""
        registry = self.catalog.registry
        roots = self.catalog.served_roots

        def collect() -> list[dict[str, Any]]:
            seen: dict[str, dict[str, Any]] = {}
            for item in registry.search(type=None, limit=10_000, roots=roots).items:
                record = registry.get(item.id, roots)
                for c in record.components:
                    if type is not None and c.kind.value != type:
                        continue
                    entry = seen.setdefault(
                        c.content_id or f"{record.id}/{c.name}",
                        {
                            "component_id": c.content_id,
                            "kind": c.kind.value,
                            "base": c.base.value,
                            "bytes": c.bytes,
                            "tensor_count": c.tensor_count,
                            "parameters": c.parameters,
                            "dtypes": c.dtypes,
                            "models": [],
                        },
                    )
                    entry["models"].append({"model_id": record.id, "name": record.name, "component": c.name})
            return list(seen.values())

        comps = await self.catalog.db(collect)
        cached = {s["component_id"] for s in self.feed.segments()}
        for c in comps:
            c["cached"] = c["component_id"] in cached
        return comps

    async def model_detail(self, ref: str, *, history: int = 20) -> dict[str, Any]:
        """Everything known of a model: identification, components, metadata, where it is, performance,
        and the parts that complete a transformer-only model."""
        record = await self.catalog.resolve(ref)
        hist = [
            h.model_dump(mode="json")
            for h in await self.catalog.db(self.catalog.registry.history, record.id, history)
        ]
        out = record.model_dump(mode="json", exclude={"identification"})
        ident = record.identification.model_dump(mode="json")
        out["identification"] = {k: v for k, v in ident.items() if k in DETAIL_FIELDS}
        out["state"] = self.tiers(record)
        out["performance"] = performance(hist)
        out["history"] = hist
        plan = await self.catalog.parts(record)
        out["parts"] = plan.info() if plan is not None else []
        return out


def performance(history: list[dict[str, Any]]) -> dict[str, Any]:
    """Load times, last validation and benchmark figures, from the history (newest first)."""
    loads = [h["data"].get("seconds") for h in history if h["op"] == "load" and h["data"].get("seconds")]
    last = {
        op: next((h for h in history if h["op"] == op), None) for op in ("validate", "benchmark", "optimize")
    }
    return {
        "loads": len(loads),
        "last_load_seconds": loads[0] if loads else None,
        "best_load_seconds": min(loads) if loads else None,
        **{f"last_{op}": (h["data"] | {"at": h["at"]}) if h else None for op, h in last.items()},
    }
