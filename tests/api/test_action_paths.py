"""A wrong method on an action path (``/api/model/{id}/load``, ``.../validate``, ``.../lora/{lora}``,
``/api/model/load``...) answers 405 with ``Allow``, a GET as any other: the ``{model_id:path}``
lookup once took ``GET .../load`` for a model named ``x/load`` (404 MODEL_NOT_FOUND), while a DELETE
on it answered 405."""

from __future__ import annotations

import re
from collections.abc import Iterator

import httpx
import pytest
from fastapi.routing import APIRoute

from modelkeeper.api.routes_cluster import router as routing_router
from modelkeeper.api.routes_install import router as install_router
from modelkeeper.api.routes_memory import router as memory_router
from modelkeeper.api.routes_models import router as models_router
from modelkeeper.api.routes_service import cache, jobs
from modelkeeper.testing import write_demo_models
from modelkeeper.testing.service import RunningService
from tests.conftest import scanned_service

MODEL = "tiny-sd15@diffusers"
METHODS = ("GET", "POST", "PUT", "DELETE", "PATCH")
ROUTERS = (cache, jobs, routing_router, install_router, memory_router, models_router)


@pytest.fixture(scope="module")
def svc(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RunningService]:
    root = tmp_path_factory.mktemp("models")
    write_demo_models(root, only=["sd15-pipeline", "sd15-checkpoint"])  # two tiny-sd15: handles differ
    with scanned_service(tmp_path_factory.mktemp("service"), model_roots=[root]) as running:
        yield running


def _action_paths() -> dict[str, set[str]]:
    """Each path of a route that takes no GET, made concrete, and the methods its routes take
    (the routers as the app includes them)."""
    routes = [r for router in ROUTERS for r in router.routes if isinstance(r, APIRoute)]
    paths: dict[str, set[str]] = {}
    for route in routes:
        if "GET" in route.methods:
            continue
        concrete = route.path.replace("{model_id:path}", MODEL).replace("{lora_id:path}", "tiny-lora")
        paths[re.sub(r"\{[^}]+\}", "cpu", concrete)] = set()
    for path in paths:
        for route in routes:
            if route.path_regex.match(path):
                paths[path] |= route.methods
    return paths


def test_a_wrong_method_on_every_action_path_is_405(svc: RunningService) -> None:
    paths = _action_paths()
    assert {
        f"/api/model/{MODEL}/{a}" for a in ("load", "unload", "validate", "benchmark", "optimize")
    } <= set(paths)
    assert f"/api/model/{MODEL}/lora/tiny-lora" in paths and "/api/model/load" in paths
    with httpx.Client(base_url=svc.url) as http:
        for path, allowed in paths.items():
            for method in METHODS:
                if method in allowed:
                    continue
                answer = http.request(method, path)
                assert answer.status_code == 405, (method, path, answer.text)
                assert answer.json()["error_code"] == "METHOD_NOT_ALLOWED", (method, path)
                assert set(answer.headers["allow"].split(", ")) <= allowed, (method, path, answer.headers)
        # the lookup itself still answers: the model, and an unknown one 404
        assert http.get(f"/api/model/{MODEL}").json()["handle"] == MODEL
        assert http.get("/api/model/diffusers/tiny-sd15").status_code == 200
        missing = http.get("/api/model/no-such-model")
        assert missing.status_code == 404 and missing.json()["error_code"] == "MODEL_NOT_FOUND"
        assert http.get("/api/model/no-such-model/validate").status_code == 405  # an action path all the same
