"""Recovery: what the service does when a worker reports a change, dies, or disagrees with the view.

A worker that reports a model unloaded by itself (out of memory, say) loses that placement. A
worker that exits is restarted (up to ``worker_max_restarts`` in ``restart_window_s``), its view
reconciled with its full state, and the models kept loaded there are loaded again. ``reconcile``
may also be asked for at any time, and ``optimize_memory`` (the memory route) frees a device's
memory, then reconciles it.
"""

from __future__ import annotations

import contextlib
import os
import time
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from modelkeeper.orchestrator.background import Background
from modelkeeper.orchestrator.catalog import Catalog
from modelkeeper.orchestrator.events import EventBus
from modelkeeper.orchestrator.loads import Loads
from modelkeeper.orchestrator.options import LoadOptions
from modelkeeper.orchestrator.pool import WorkerPool
from modelkeeper.orchestrator.settings import Settings
from modelkeeper.orchestrator.state import Placement, PlacementState, StateView
from modelkeeper.orchestrator.workers import SlotState, WorkerSlot
from modelkeeper.protocol.commands import CommandType
from modelkeeper.protocol.errors import ProtocolError
from modelkeeper.protocol.messages import (
    Event,
    EventType,
    MemoryInfo,
    ModelInfoRequest,
    ModelInfoResult,
    OptimizeMemoryRequest,
    OptimizeMemoryResult,
    StateData,
)
from modelkeeper.registry import ModelRecord


class Recovery:
    def __init__(
        self,
        settings: Settings,
        catalog: Catalog,
        loads: Loads,
        pool: WorkerPool,
        view: StateView,
        bus: EventBus,
        background: Background,
    ) -> None:
        self.settings = settings
        self.catalog = catalog
        self.loads = loads
        self.pool = pool
        self.view = view
        self.bus = bus
        self.background = background
        pool.on_event = self.worker_event
        pool.on_exit = self.worker_exit

    def worker_event(self, slot: WorkerSlot, event: Event) -> None:
        if event.event is EventType.MEMORY_PRESSURE:
            slot.memory = MemoryInfo.model_validate(event.data)
            self.bus.publish("worker.memory_pressure", device=slot.id, memory=dict(event.data))
            return
        if event.event is EventType.STATE:
            self.bus.publish("worker.state", device=slot.id, **event.data)
            state = StateData.model_validate(event.data)
            if state.state == "unloaded" and state.reason not in (None, "cleanup"):
                for p in self.view.on_device(slot.id):
                    if p.state is PlacementState.LOADED and state.name in p.components.values():
                        self.view.remove(p.model_id, p.device)
                        self.bus.publish(
                            "model.lost", model_id=p.model_id, device=slot.id, reason=state.reason
                        )

    def worker_exit(self, slot: WorkerSlot, code: int | None) -> None:
        self.background.spawn(self.recover(slot, code))

    async def recover(self, slot: WorkerSlot, code: int | None) -> None:
        """Drop the placements of an exited worker, restart it, reconcile, reload what is kept."""
        lost = self.view.on_device(slot.id)
        keep = [p for p in lost if p.keep_loaded]
        for p in lost:
            self.view.remove(p.model_id, p.device)
            self.bus.publish(
                "model.lost", model_id=p.model_id, device=slot.id, reason=f"worker exited ({code})"
            )
        self.bus.publish(
            "worker.exited", device=slot.id, code=code, lost=[p.model_id for p in lost], error=slot.last_error
        )
        window = time.time() - self.settings.restart_window_s
        if len([t for t in slot.restarts if t > window]) >= self.settings.worker_max_restarts:
            slot.state = SlotState.FAILED
            slot.last_error = f"gave up after {self.settings.worker_max_restarts} restarts: {slot.last_error}"
            self.bus.publish("worker.failed", device=slot.id, error=slot.last_error)
            return
        try:
            await slot.restart()
        except Exception as exc:
            slot.state = SlotState.FAILED
            slot.last_error = f"restart failed: {exc}"
            self.bus.publish("worker.failed", device=slot.id, error=slot.last_error)
            return
        report = await self.reconcile(slot.id)
        self.bus.publish(
            "worker.restarted", device=slot.id, pid=slot.proc.pid if slot.proc else None, **report
        )
        for p in keep:
            with contextlib.suppress(ProtocolError):
                again = LoadOptions.like(
                    p.form, keep_loaded=True, keep_alive=p.keep_alive
                )  # in the form it had
                await self.loads.load(p.model_id, slot.id, options=again, wait=False)

    async def reconcile(self, device: str) -> dict[str, Any]:
        """Make the view of ``device`` match the worker's full state: placements whose components
        the worker no longer holds are dropped; models the worker holds that the view lacks are
        adopted (when the registry knows them) or reported as unmanaged. An adopted transformer-only
        model gets back the ``parts`` its load recorded (:meth:`restore_parts`)."""
        slot = self.pool.slot(device)
        info = await slot.call(CommandType.GET_MODEL_INFO, ModelInfoRequest(), ModelInfoResult, timeout=30)
        held = {m.name: m for m in info.models}
        slot.memory = info.memory
        lost, adopted, unmanaged = [], [], []
        records: dict[str, ModelRecord] = {}
        for p in self.view.on_device(device):
            if p.state is PlacementState.LOADED and any(n not in held for n in p.components.values()):
                self.view.remove(p.model_id, device)
                lost.append(p.model_id)
                self.bus.publish("model.lost", model_id=p.model_id, device=device, reason="reconciled")
        claimed = {n for p in self.view.on_device(device) for n in p.components.values()}
        for name, m in held.items():
            if name in claimed:
                continue
            model_id, _, component = name.partition("/")
            try:
                record = await self.catalog.get(model_id)
            except ProtocolError:
                unmanaged.append(name)
                continue
            p = self.view.get(model_id, device) or Placement(
                record.id, record.name, record.type, device, state=PlacementState.LOADED, handle=record.handle
            )
            label = component or record.type
            p.components[label] = name
            p.sources.setdefault(label, "unknown")
            p.bytes += m.bytes
            p.component_bytes[label] = m.bytes
            if m.share is not None:
                p.shares[label] = m.share
            if m.source.get("storage"):
                p.packed[label] = str(m.source["storage"])
            p.loaded_at = p.loaded_at or m.loaded_at
            self.view.put(p)
            adopted.append(name)
            records[record.id] = record
        for model_id, record in records.items():
            placed = self.view.get(model_id, device)
            if placed is not None:
                await self.restore_parts(placed, record, {n: m.source for n, m in held.items()})
        return {"lost": lost, "adopted": adopted, "unmanaged": unmanaged}

    async def restore_parts(
        self, p: Placement, record: ModelRecord, sources: Mapping[str, Mapping[str, Any]]
    ) -> None:
        """Give an adopted placement of a transformer-only model its ``parts`` (role -> part's model
        id, as its load recorded them): each component named after a role of the registry's
        completion (``completion.py``) is that role's part, unless the file the worker says it read
        is not one of that part's (the choice changed since the load: the role is left out)."""
        plan = await self.catalog.parts(record)
        if plan is None:
            return
        for role, part in plan.records.items():
            name = p.components.get(role)
            if name is not None and role not in p.parts and read_from(part, sources.get(name, {})):
                p.parts[role] = part.id

    async def optimize_memory(
        self, device: str, target_free_mb: float | None = None, *, timeout: float | None = None
    ) -> dict[str, Any]:
        """Hand ``device``'s cached memory back and, with a target, unload its least-recently-used
        idle models until that much of its budget is free (the worker's ``model.optimize_memory``).
        Models leased, kept loaded, busy or still loading are kept; the view then follows the
        worker (``reconcile``)."""
        slot = self.pool.slot(device)
        keep = [
            name
            for p in self.view.on_device(device)
            if p.keep_loaded or p.busy or p.state is not PlacementState.LOADED
            or self.loads.leases.holding(p.model_id, device)
            for name in p.components.values()
        ]  # fmt: skip
        request = OptimizeMemoryRequest(target_free_mb=target_free_mb, keep=keep)
        result = await slot.call(
            CommandType.OPTIMIZE_MEMORY, request, OptimizeMemoryResult, timeout=timeout or 120
        )
        reconciled = await self.reconcile(device)
        return {"device": device, **result.model_dump(), "lost": reconciled["lost"], "kept": keep}


def read_from(part: ModelRecord, source: Mapping[str, Any]) -> bool:
    """Whether a worker's ``source`` report may be of ``part``: a path that is one of its locations
    (or, for a component of a pipeline folder, its folder inside one), or a RAM-cache segment (``modelkeeper-...``, named by component id) of one of its content ids
    (any segment while the part is not hashed yet: nothing to tell them apart by). No path: no
    evidence against it."""
    path = source.get("path")
    if not isinstance(path, str) or not path:
        return True
    places = {f.path for f in part.locations} | {part.path or ""}
    subs = [c.subfolder for c in part.components if c.subfolder]
    if path in places | {os.path.join(p, sub) for p in places if p for sub in subs}:
        return True
    if not Path(path).name.startswith("modelkeeper-"):
        return False
    ids = [c.content_id for c in part.components if c.content_id]
    return not ids or any(Path(path).stem.endswith(cid) for cid in ids)
