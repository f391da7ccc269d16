"""``POST /api/model/install``: fetch a model from the Hub, CivitAI or a URL into the first model
root and register it, as a job (progress over its event stream, cancellable). Included before the
models router: ``/install`` is not a model id."""

from __future__ import annotations

from typing import Any

from fastapi import APIRouter
from fastapi.responses import JSONResponse

from modelkeeper.api.deps import Service
from modelkeeper.api.responses import ACCEPTED, ERRORS
from modelkeeper.api.responses_catalog import InstallDone
from modelkeeper.api.schemas import InstallBody

router = APIRouter(prefix="/api/model", tags=["install"], responses=ERRORS)


@router.post("/install", response_model=InstallDone, responses=ACCEPTED)
async def install(service: Service, body: InstallBody) -> Any:
    """Download, verify and register a model; where it goes: docs/INSTALL.md."""
    answer = await service.installs.install(
        body.source,
        model_type=body.model_type,
        name=body.name,
        sha256=body.sha256,
        wait=body.wait_for_completion,
    )
    return answer if "result" in answer else JSONResponse(answer, status_code=202)
