"""``POST /api/model/memory/optimize``: hand a device's cached memory back and, with a target,
unload its least-recently-used models until that much of its budget is free (the worker's
``model.optimize_memory``, through ``recovery.optimize_memory``). Models that are leased, kept
loaded, busy or still loading are never unloaded by it; the service's view then follows the worker
(a reconcile), so status stays true. In cluster mode the device is ``node/device`` and the work
runs on that node."""

from __future__ import annotations

from typing import Any

from fastapi import APIRouter

from modelkeeper.api.deps import Service
from modelkeeper.api.responses import ERRORS
from modelkeeper.api.responses_placements import MemoryOptimized
from modelkeeper.api.schemas import MemoryOptimizeBody

router = APIRouter(prefix="/api/model", tags=["models"], responses=ERRORS)


@router.post("/memory/optimize", response_model=MemoryOptimized)
async def optimize_memory(service: Service, body: MemoryOptimizeBody) -> dict[str, Any]:
    """Free memory on one device: allocator caches, then (``target_free_mb``) idle models."""
    return await service.recovery.optimize_memory(
        body.device_id, body.target_free_mb, timeout=body.timeout_seconds
    )
