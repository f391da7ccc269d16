"""Routing: which node and device serve a model now (``GET /api/model/{id}/route``), and the status
and reconcile of one device named ``node/device``. They work on one host too (the node is then
``null``).

Included before the models router: ``/{model_id:path}`` would otherwise take ``x/route`` for a model id.
"""

from __future__ import annotations

from typing import Any

from fastapi import APIRouter

from modelkeeper.api.deps import Service
from modelkeeper.api.responses import ERRORS
from modelkeeper.api.responses_placements import Reconciled, RouteInfo

router = APIRouter(prefix="/api/model", tags=["routing"], responses=ERRORS)


# The models router's ``/status/{device}`` cannot take a slash; this one shadows it at run time
# and stays out of the schema, where it would be the same operation twice.
@router.get("/status/{device:path}", include_in_schema=False)
async def device_status_any(service: Service, device: str) -> dict[str, Any]:
    """One device (``cuda:0``, or ``node-a/cuda:0`` in cluster mode)."""
    return service.views.device(device)


# The same for reconcile: ``node-a/cuda:0``, a node (``node-a``: each of its devices) or ``*``.
@router.post("/status/{device:path}/reconcile", response_model=Reconciled, include_in_schema=False)
async def reconcile_any(service: Service, device: str) -> dict[str, Any]:
    """Compare the view of ``device`` with its worker's full state and correct it."""
    return await service.recovery.reconcile(device)


@router.get("/{model_id:path}/route", response_model=RouteInfo)
async def route(service: Service, model_id: str, load: bool = False) -> Any:
    """The node and device serving ``model_id`` now (the most recently used placement);
    ``load=true`` loads it where placement says when it is loaded nowhere."""
    return await service.loads.route(model_id, load=load)
