"""The one dependency every route takes: the orchestrator of the running app."""

from __future__ import annotations

from typing import Annotated

from fastapi import Depends, Request

from modelkeeper.orchestrator import Orchestrator


async def _service(request: Request) -> Orchestrator:  # async: no thread hop per request
    service: Orchestrator = request.app.state.service
    return service


Service = Annotated[Orchestrator, Depends(_service)]
