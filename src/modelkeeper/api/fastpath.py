"""``GET /api/model/status`` answered before FastAPI's router.

Pollers ask for the status hundreds of times a second and every dashboard tab after each event;
its body is the status snapshot's bytes (``Views.status_json``: rebuilt only after an event or a
quarter second), so what a request cost was FastAPI's own work: matching the path against every
route of the included routers, solving the ``Service`` dependency, the exception and telemetry
layers (the app alone took ~105 µs of CPU a request here, ``/health/live`` ~50). This door answers
the same bytes with the same headers without them. It sits inside the API's doors (Host
allowlist, body limit, bearer token, CORS: ``security.install``), so every check still applies;
the route in ``routes_models`` stays as the OpenAPI document's description of the answer.
"""

from __future__ import annotations

from typing import Protocol

from starlette.types import ASGIApp, Receive, Scope, Send

STATUS_PATH = "/api/model/status"


class _Views(Protocol):
    def status_json(self) -> bytes: ...


class _Service(Protocol):
    @property
    def views(self) -> _Views: ...


class StatusDoor:
    """An ASGI middleware: ``GET STATUS_PATH`` from the service's snapshot, anything else on."""

    def __init__(self, app: ASGIApp, service: _Service) -> None:
        self.app = app
        self.service = service

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or scope["method"] != "GET" or _route_path(scope) != STATUS_PATH:
            await self.app(scope, receive, send)
            return
        body = self.service.views.status_json()
        headers = [(b"content-length", str(len(body)).encode()), (b"content-type", b"application/json")]
        await send({"type": "http.response.start", "status": 200, "headers": headers})
        await send({"type": "http.response.body", "body": body})


def _route_path(scope: Scope) -> str:
    """The path the router would match: without the ``root_path`` a proxy mounts the app under."""
    path: str = scope["path"]
    root: str = scope.get("root_path", "")
    return path[len(root) :] if root and path.startswith(root) else path
