"""The FastAPI app: ``create_app(settings)`` builds the service and serves it; the OpenAPI spec is
at ``/openapi.json``, interactive docs at ``/docs``."""

from __future__ import annotations

from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import TYPE_CHECKING

from fastapi import FastAPI

from modelkeeper import __version__, web
from modelkeeper.api import docs, errors, security
from modelkeeper.api.fastpath import StatusDoor
from modelkeeper.api.routes_cluster import router as routing_router
from modelkeeper.api.routes_install import router as install_router
from modelkeeper.api.routes_memory import router as memory_router
from modelkeeper.api.routes_models import router as models_router
from modelkeeper.api.routes_service import cache, health, jobs
from modelkeeper.orchestrator import Orchestrator, Settings

if TYPE_CHECKING:
    from modelkeeper.cluster import ClusterOrchestrator


def create_app(
    settings: Settings | None = None, *, service: Orchestrator | ClusterOrchestrator | None = None
) -> FastAPI:
    """The API over ``service`` (built from ``settings`` when not given), started and stopped with the
    app. A ``ClusterOrchestrator`` offers the same parts the routes call (cluster mode)."""
    svc = service or Orchestrator(settings)

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        await svc.start()
        try:
            yield
        finally:
            await svc.stop()

    app = FastAPI(
        title="modelkeeper",
        version=__version__,
        description="Model manager for diffusion inference: registry, RAM cache, per-device workers.",
        lifespan=lifespan,
        docs_url=None,  # served by api/docs.py from the package, not from a CDN
        redoc_url=None,
    )
    app.state.service = svc
    errors.install(app)
    app.add_middleware(StatusDoor, service=svc)  # first: innermost, inside every door below
    security.install(app, svc.settings)
    web.install(app, svc.settings)  # after security: the dashboard's door is outermost
    docs.install(app)
    app.include_router(health)
    app.include_router(cache)  # before the models router: /api/model/cache is not a model id
    app.include_router(jobs)
    app.include_router(routing_router)  # before the models router: /{model_id:path} would take x/route
    app.include_router(install_router)  # before the models router: /install is not a model id
    app.include_router(memory_router)  # before the models router: memory/optimize is not a model id
    app.include_router(models_router)
    return app
