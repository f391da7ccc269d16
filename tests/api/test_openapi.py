"""The OpenAPI spec documents every answer: each route's success has a schema that says something
(a route added without a response model fails here), and every error is the one error body."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import pytest
from fastapi import FastAPI
from pydantic import BaseModel, Field

from modelkeeper.api.app import create_app
from modelkeeper.api.responses import ErrorBody, JobAccepted
from modelkeeper.api.responses_placements import DeviceStatus, LoadedPlacement, NoMemory
from modelkeeper.orchestrator import Settings
from modelkeeper.orchestrator.workers import WorkerSlot

ERROR_REF = "#/components/schemas/ErrorBody"
#: Keys that only name or explain a schema: a schema made of these alone says nothing.
WORDS = {"title", "description", "default", "examples"}


def says_something(schema: dict[str, Any], components: dict[str, Any]) -> bool:
    """False for ``{}``, a bare open object (``dict[str, Any]``) or a list of such: what a route
    that returns ``Any`` or an untyped dict gets."""
    if "$ref" in schema:
        return says_something(components[schema["$ref"].rsplit("/", 1)[-1]], components)
    for key in ("anyOf", "oneOf", "allOf"):
        if key in schema:
            return all(says_something(part, components) for part in schema[key])
    rest = {k: v for k, v in schema.items() if k not in WORDS}
    if rest.get("type") == "array":
        return says_something(rest.get("items", {}), components)
    if rest.get("type") == "object":
        return bool(rest.get("properties")) or rest.get("additionalProperties") not in (None, True, {})
    return bool(rest)


@pytest.fixture(scope="module")
def spec(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    folder = tmp_path_factory.mktemp("spec")
    app = create_app(Settings(devices=["cpu"], model_roots=[folder], db=folder / "registry.sqlite3"))
    return app.openapi()  # the service is not started: the spec needs none of it


def operations(spec: dict[str, Any]) -> list[tuple[str, str, dict[str, Any]]]:
    return [(method, path, op) for path, ops in spec["paths"].items() for method, op in ops.items()]


def test_every_success_has_a_schema(spec: dict[str, Any]) -> None:
    components = spec["components"]["schemas"]
    missing = []
    for method, path, op in operations(spec):
        successes = {code: r for code, r in op["responses"].items() if code.startswith("2")}
        contents = [c for r in successes.values() for c in r.get("content", {}).values()]
        if not contents or not all(
            says_something(c.get("schema") or c.get("itemSchema") or {}, components) for c in contents
        ):
            missing.append(f"{method.upper()} {path}")
    assert len(operations(spec)) >= 45
    assert not missing, f"routes without a response model: {missing}"


def test_every_error_is_the_error_body(spec: dict[str, Any]) -> None:
    """Any status a route does not list is an ErrorBody, as JSON (event streams and metrics too);
    FastAPI's own validation-error schema is never documented (the API answers ErrorBody)."""
    for method, path, op in operations(spec):
        default = op["responses"].get("default", {}).get("content", {})
        assert default == {"application/json": {"schema": {"$ref": ERROR_REF}}}, f"{method} {path}"
    assert "HTTPValidationError" not in spec["components"]["schemas"]
    assert set(spec["components"]["schemas"]["ErrorBody"]["required"]) == set(ErrorBody.model_fields)


def body_objects(
    schema: dict[str, Any], components: dict[str, Any], name: str = "body"
) -> Iterator[tuple[str, dict[str, Any]]]:
    """The object schemas a request body may be (through ``$ref`` and ``anyOf``/``oneOf``; ``null``
    left out), each with its schema's name."""
    if "$ref" in schema:
        ref = schema["$ref"].rsplit("/", 1)[-1]
        yield from body_objects(components[ref], components, ref)
        return
    parts = schema.get("anyOf") or schema.get("oneOf")
    if parts:
        for part in parts:
            yield from body_objects(part, components, name)
    elif schema.get("type") != "null":
        yield name, schema


def undescribed(spec: dict[str, Any]) -> list[str]:
    """Every operation without a description and every request-body field without one (a body
    with no fields, an open object, must describe itself), by method, path and field."""
    components = spec.get("components", {}).get("schemas", {})
    missing = []
    for method, path, op in operations(spec):
        where = f"{method.upper()} {path}"
        if not op.get("description", "").strip():
            missing.append(f"{where}: the operation")
        for content in op.get("requestBody", {}).get("content", {}).values():
            for name, body in body_objects(content["schema"], components):
                fields = body.get("properties", {})
                if not fields and not body.get("description", "").strip():
                    missing.append(f"{where}: the body {name}")
                missing += [
                    f"{where}: {name}.{field}"
                    for field, sub in fields.items()
                    if not sub.get("description", "").strip()
                ]
    return missing


def test_every_operation_and_request_field_is_described(spec: dict[str, Any]) -> None:
    """/docs explains each operation and each field a client sends, not only their shapes."""
    missing = undescribed(spec)
    assert not missing, "no description:\n" + "\n".join(missing)


class Body(BaseModel):
    """A request body with one field described and one not (module level: the routes' annotations
    are strings, resolved in the module's namespace)."""

    said: int = Field(description="Described.")
    unsaid: int


def test_undescribed_names_what_lacks_a_description() -> None:
    """The check above names the operation and the field, through a ``$ref`` and an optional body."""

    app = FastAPI()

    @app.post("/quiet")
    async def quiet(body: Body | None = None) -> int:
        return 0

    @app.post("/told")
    async def told(body: Body) -> int:
        """Described."""
        return 0

    assert undescribed(app.openapi()) == [
        "POST /quiet: the operation", "POST /quiet: Body.unsaid", "POST /told: Body.unsaid"
    ]  # fmt: skip


def test_job_routes_document_both_answers(spec: dict[str, Any]) -> None:
    """A job started without waiting is 202 with the job; waited for, 200 with job and result."""
    load = spec["paths"]["/api/model/{model_id}/load"]["post"]["responses"]
    assert load["202"]["content"]["application/json"]["schema"] == {
        "$ref": f"#/components/schemas/{JobAccepted.__name__}"
    }
    done = spec["components"]["schemas"][
        load["200"]["content"]["application/json"]["schema"]["$ref"].rsplit("/")[-1]
    ]
    assert done["required"] == ["job", "result"]
    assert done["properties"]["result"] == {"$ref": f"#/components/schemas/{LoadedPlacement.__name__}"}


def test_fields_sometimes_absent_are_optional_not_null(spec: dict[str, Any]) -> None:
    """``evicted`` (a fresh load) or ``already_loaded`` are left out when they do not apply: the
    schema neither requires them nor allows null, and the answer never carries a null for them."""
    placement = spec["components"]["schemas"]["LoadedPlacement"]
    for name in ("evicted", "already_loaded", "coalesced"):
        assert name not in placement["required"]
        assert "anyOf" not in placement["properties"][name]
    answer = LoadedPlacement.model_validate(
        {"model_id": "m", "handle": "n", "name": "n", "type": "sd15", "device": "cpu", "state": "loaded", "components": {},
         "sources": {}, "bytes": 1, "keep_loaded": False, "loaded_at": 1.0, "last_used": 1.0,
         "load_seconds": 0.5, "keep_alive": -1.0, "expires_at": None, "timings": {}, "loras": {}, "leases": 0, "already_loaded": True}
    )  # fmt: skip
    assert "evicted" not in answer.model_dump(mode="json")


def test_a_worker_that_never_reported_has_no_memory() -> None:
    """A device whose worker did not start has an empty ``memory``: documented, not a 500."""
    slot = WorkerSlot(
        "cpu", "cpu", args=[], start_timeout=1, on_event=lambda *_: None, on_exit=lambda *_: None
    )
    answer = {**slot.info(), "models": []}
    device = DeviceStatus.model_validate(answer)
    assert isinstance(device.memory, NoMemory)
    assert device.model_dump(mode="json") == answer
