"""Routing: which node and device serve a model now (``GET /api/model/{id}/route``), and the status
of one device named ``node/device``. Both work on one host too (the node is then ``null``).

Included before the models router: ``/{model_id:path}`` would otherwise take ``x/route`` for a model id.
"""

from __future__ import annotations

from typing import Any

from fastapi import APIRouter

from modelkeeper.api.deps import Service
from modelkeeper.orchestrator import LoadOptions

router = APIRouter(prefix="/api/model", tags=["routing"])


# The models router's ``/status/{device}`` cannot take a slash; this one shadows it at run time
# and stays out of the schema, where it would be the same operation twice.
@router.get("/status/{device:path}", include_in_schema=False)
async def device_status_any(service: Service, device: str) -> dict[str, Any]:
    """One device (``cuda:0``, or ``node-a/cuda:0`` in cluster mode)."""
    return service.views.device(device)


@router.get("/{model_id:path}/route")
async def route(service: Service, model_id: str, load: bool = False) -> dict[str, Any]:
    """The node and device serving ``model_id`` now (the most recently used placement);
    ``load=true`` loads it where placement says when it is loaded nowhere."""
    cluster_route = getattr(service, "route", None)
    if cluster_route is not None:
        answer: dict[str, Any] = await cluster_route(model_id, load=load)
        return answer
    record = await service.catalog.resolve(model_id)
    loaded = [p for p in service.view.of_model(record.id) if p.state == "loaded"]
    if not loaded and load:
        await service.loads.load(record.id, options=LoadOptions(), wait=True)
        loaded = [p for p in service.view.of_model(record.id) if p.state == "loaded"]
    best = max(loaded, key=lambda p: p.last_used) if loaded else None
    return {
        "model_id": record.id,
        "name": record.name,
        "loaded": best is not None,
        "node": None,
        "device": best.device if best else None,
        "placements": [
            {"node": None, "device": p.device, "state": p.state.value}
            for p in service.view.of_model(record.id)
        ],
    }
