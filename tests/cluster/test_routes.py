"""Every route of the API is served in cluster mode: each part and method a route (or a helper or
dependency it hands the service to) reaches on the service exists on the cluster service, and
nothing in the package still refuses with "not available in cluster mode". No Ray: the cluster
service is built, not started (the REST behaviour is tested in test_cluster.py)."""

from __future__ import annotations

import ast
import inspect
import textwrap
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

from fastapi.routing import APIRoute

import modelkeeper
from modelkeeper.api.app import create_app
from modelkeeper.cluster import ClusterOrchestrator

#: Routes deliberately not offered in cluster mode ("METHOD path": why); also in docs/CLUSTER.md.
EXCEPTIONS: dict[str, str] = {}
REFUSALS = ("not available in cluster mode", "not in cluster mode")


def api_routes(routes: list[Any]) -> Iterator[APIRoute]:
    """The app's routes, through the routers it includes."""
    for route in routes:
        if isinstance(route, APIRoute):
            yield route
        elif hasattr(route, "original_router"):
            yield from api_routes(route.original_router.routes)


def functions(route: APIRoute) -> Iterator[Callable[..., Any]]:
    """The endpoint and the dependencies FastAPI calls for it."""
    yield route.endpoint
    stack = list(route.dependant.dependencies)
    while stack:
        dep = stack.pop()
        if dep.call is not None:
            yield dep.call
        stack.extend(dep.dependencies)


def service_uses(fn: Callable[..., Any] | None, seen: set[Any] | None = None) -> set[tuple[str, ...]]:
    """The attribute chains read on ``service`` in ``fn`` (``("feed", "view")``), and in the
    functions of its module that it hands ``service`` to."""
    seen = set() if seen is None else seen
    if fn in seen or not inspect.isfunction(fn):
        return set()
    seen.add(fn)
    tree = ast.parse(textwrap.dedent(inspect.getsource(fn)))
    chains: set[tuple[str, ...]] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Attribute):
            chain, inner = [node.attr], node.value
            while isinstance(inner, ast.Attribute):
                chain.insert(0, inner.attr)
                inner = inner.value
            if isinstance(inner, ast.Name) and inner.id == "service":
                chains.add(tuple(chain[:2]))
        elif (
            isinstance(node, ast.Call)
            and isinstance(node.func, ast.Name)
            and any(isinstance(a, ast.Name) and a.id == "service" for a in node.args)
        ):
            chains |= service_uses(fn.__globals__.get(node.func.id), seen)
    return chains


def test_every_route_reaches_parts_the_cluster_service_has() -> None:
    service = ClusterOrchestrator()
    routes = list(api_routes(create_app(service=service).router.routes))
    assert len(routes) > 40
    missing = {}
    for route in routes:
        name = f"{','.join(sorted(route.methods))} {route.path}"
        if name in EXCEPTIONS:
            continue
        for chain in sorted(set().union(*(service_uses(f) for f in functions(route)))):
            part: Any = service
            for attr in chain:
                if not hasattr(part, attr):
                    missing[name] = ".".join(("service", *chain))
                    break
                part = getattr(part, attr)
    assert missing == {}


def test_nothing_refuses_in_cluster_mode() -> None:
    package = Path(modelkeeper.__file__).parent
    found = [
        f"{path.relative_to(package)}: {phrase!r}"
        for path in sorted(package.rglob("*.py"))
        for phrase in REFUSALS
        if phrase in path.read_text(encoding="utf-8")
    ]
    assert found == []
