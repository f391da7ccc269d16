"""A real service for the API tests: uvicorn on a free port, real CPU worker subprocesses, a real
SQLite registry, the demo models as the model root."""

from __future__ import annotations

import re
from collections.abc import Callable, Iterator
from contextlib import AbstractContextManager, contextmanager
from pathlib import Path
from typing import Any

import httpx
import pytest
import schemathesis
from fastapi import FastAPI

from modelkeeper.client import Client
from modelkeeper.orchestrator import Orchestrator, Settings
from modelkeeper.testing import DemoManifest
from modelkeeper.testing.service import RunningService, running_service
from modelkeeper.worker import InProcessWorker
from tests.conftest import scanned_service

SD15 = "diffusers/tiny-sd15"  # main, 3 components, ~8.7 MB
SD15_CKPT = "checkpoints/tiny-sd15.safetensors"
SDXL = "diffusers/tiny-sdxl"  # main, 4 components, ~29 MB
CLIP_L = "clip/tiny-clip-l.safetensors"  # one text encoder, ~6 MB
LORA = "loras/tiny-sd15-kohya.safetensors"

ServiceFactory = Callable[..., AbstractContextManager[RunningService]]


@pytest.fixture(scope="module")
def make_service(tmp_path_factory: pytest.TempPathFactory, demo: DemoManifest) -> ServiceFactory:
    """``with make_service(devices=[...], ...) as svc``: a service over the demo models whose first
    scan (and hashing) has finished."""

    def make(root: Path | None = None, **overrides: Any) -> AbstractContextManager[RunningService]:
        settings = {"model_roots": [root or demo.root], **overrides}
        return scanned_service(tmp_path_factory.mktemp("service"), **settings)

    return make


def model_id(client: Client, path: str) -> str:
    return str(client.model(path)["id"])


def wait_for_segments(client: Client, mid: str, count: int, timeout: float = 60.0) -> list[dict[str, Any]]:
    """The cache segments of model ``mid`` once there are ``count`` (loads fill them alongside)."""
    import time

    deadline = time.monotonic() + timeout
    while True:
        mine = [s for s in client.cache()["segments"] if mid in s["models"]]
        if len(mine) >= count or time.monotonic() > deadline:
            return mine
        time.sleep(0.05)


def _templates(spec: dict[str, Any], spans: bool) -> list[tuple[re.Pattern[str], str, set[str]]]:
    """(regex, template, methods) per path of ``spec``, in the app's routing order; a parameter is
    one segment, or (``spans``) any text: a ``{model_id:path}`` may hold slashes."""
    part = ".+" if spans else "[^/]+"
    return [
        (re.compile(re.sub(r"\\\{[^}]+\\\}", part, re.escape(path)) + "$"), path, {m.upper() for m in ops})
        for path, ops in spec["paths"].items()
    ]


def conforming(svc: RunningService) -> Callable[[httpx.Response], None]:
    """An httpx response hook: every JSON answer (errors, 202s and ``/status`` included, which the
    app itself does not validate) must match what the service's OpenAPI spec documents for its
    route and status. ``Client(svc.url, event_hooks={"response": [conforming(svc)]})``."""
    app = svc.server.config.app
    assert isinstance(app, FastAPI)
    spec = app.openapi()
    schema = schemathesis.openapi.from_dict(spec)
    routes = _templates(spec, spans=False) + _templates(spec, spans=True)

    def check(response: httpx.Response) -> None:
        if not response.headers.get("content-type", "").startswith("application/json"):
            return  # event streams (never read here), metrics text
        method, path = response.request.method, response.request.url.path
        template = next((t for regex, t, methods in routes if method in methods and regex.match(path)), None)
        if template is not None:
            response.read()
            response.close()  # sets `elapsed`, which the check reads
            schema[template][method].validate_response(response)

    return check


def checked_client(svc: RunningService, **kwargs: Any) -> Client:
    """A client of ``svc`` whose every JSON answer is checked against the spec (:func:`conforming`)."""
    return Client(svc.url, event_hooks={"response": [conforming(svc)]}, **kwargs)


@contextmanager
def inprocess_service(
    demo: DemoManifest, tmp: Path, *gates: Any, **overrides: Any
) -> Iterator[RunningService]:
    """A service over the demo models with an in-process CPU worker (the real protocol), served
    over real HTTP; ``gates`` (objects with ``open()``, holding parts of it) are opened at the
    end, whatever happened: a part held would hold the stop."""
    values: dict[str, Any] = {
        "devices": ["cpu"],
        "model_roots": [demo.root],
        "db": tmp / "registry.sqlite3",
        "port": 0,
        "hash_on_start": False,
        "worker_warm": False,
        "status_poll_s": 60,
        **overrides,
    }
    settings = Settings(**values)
    with running_service(
        settings, service=Orchestrator(settings, worker_factory=InProcessWorker.start)
    ) as svc:
        try:
            yield svc
        finally:
            for gate in gates:
                gate.open()
