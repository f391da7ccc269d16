"""``POST /api/model/memory/optimize``: hand a device's cached memory back and, with a target,
unload its least-recently-used models until that much of its budget is free (the worker's
``model.optimize_memory``). Models that are leased, kept loaded, busy or still loading are never
unloaded by it; the service's view then follows the worker (a reconcile), so status stays true."""

from __future__ import annotations

from typing import Any

from fastapi import APIRouter

from modelkeeper.api.deps import Service
from modelkeeper.api.responses import ERRORS, MemoryOptimized
from modelkeeper.api.schemas import MemoryOptimizeBody
from modelkeeper.orchestrator.state import PlacementState
from modelkeeper.protocol.commands import CommandType
from modelkeeper.protocol.messages import OptimizeMemoryRequest, OptimizeMemoryResult

router = APIRouter(prefix="/api/model", tags=["models"], responses=ERRORS)


@router.post("/memory/optimize", response_model=MemoryOptimized)
async def optimize_memory(service: Service, body: MemoryOptimizeBody) -> dict[str, Any]:
    """Free memory on one device: allocator caches, then (``target_free_mb``) idle models."""
    reconcile = service.recovery.reconcile  # cluster mode: refused here, before the worker call
    slot = service.pool.slot(body.device_id)
    keep = [
        name
        for p in service.view.on_device(body.device_id)
        if p.keep_loaded or p.busy or p.state is not PlacementState.LOADED
        or service.leases.holding(p.model_id, body.device_id)
        for name in p.components.values()
    ]  # fmt: skip
    request = OptimizeMemoryRequest(target_free_mb=body.target_free_mb, keep=keep)
    result = await slot.call(
        CommandType.OPTIMIZE_MEMORY, request, OptimizeMemoryResult, timeout=body.timeout_seconds or 120
    )
    reconciled = await reconcile(body.device_id)
    return {"device": body.device_id, **result.model_dump(), "lost": reconciled["lost"], "kept": keep}
