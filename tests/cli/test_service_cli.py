"""The client commands against a live service (in-process uvicorn, a real CPU worker subprocess, a
registry of a few demo models), as a new user meets them: in an 80-column terminal, with ``--json``,
and with listings that come back empty."""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from typer.testing import CliRunner, Result

from modelkeeper.cli.app import app
from modelkeeper.client import Client
from modelkeeper.testing import write_demo_models
from modelkeeper.testing.service import RunningService
from tests.conftest import scanned_service

runner = CliRunner()
#: Two models of one name (``tiny-sdxl@diffusers``, ``tiny-sdxl@checkpoints``), one of another.
DEMO = ["sdxl-pipeline", "sdxl-checkpoint", "sd15-checkpoint"]


@pytest.fixture(scope="module")
def svc(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RunningService]:
    root = tmp_path_factory.mktemp("cli-models")
    write_demo_models(root, only=DEMO)
    with scanned_service(tmp_path_factory.mktemp("cli-service"), model_roots=[root]) as running:
        yield running


def cli(svc: RunningService, *args: str, columns: int = 80) -> Result:
    return runner.invoke(app, list(args), env={"MODELKEEPER_URL": svc.url, "COLUMNS": str(columns)})


def test_an_empty_job_listing_is_one_line(svc: RunningService) -> None:
    result = cli(svc, "jobs", "--state", "failed")
    assert result.exit_code == 0 and result.output == "no failed jobs\n", result.output
    assert "scan" in cli(svc, "jobs", "--state", "succeeded").output  # the first scan's job: a table


def test_cache_drop_takes_a_prefix_the_service_resolves(svc: RunningService) -> None:
    assert cli(svc, "cache", "add", "tiny-sd15").exit_code == 0
    with Client(svc.url) as c:
        cid = next(s["component_id"] for s in c.cache()["segments"])
    dropped = cli(svc, "cache", "drop", cid[:9])
    assert dropped.exit_code == 0 and dropped.output.startswith(f"dropped {cid[:12]}: "), dropped.output
    unknown = cli(svc, "cache", "drop", cid[:9])
    assert (
        unknown.exit_code == 1 and f"NOT_FOUND (HTTP 404): no cached component '{cid[:9]}'" in unknown.output
    )
    short = cli(svc, "cache", "drop", "4f85")
    assert short.exit_code == 1 and "at least 8 digits" in short.output, short.output
    assert cli(svc, "cache", "clear").exit_code == 0


def _json_error(result: Result, exit_code: int = 1) -> dict[str, Any]:
    """The one JSON object a command printed on stdout for its error: the API's error body."""
    assert result.exit_code == exit_code, result.output
    body = json.loads(result.stdout)
    assert set(body) == {"error", "error_code", "details"} and not result.stderr, result.output
    return dict(body)


def test_with_json_every_error_is_one_json_object(svc: RunningService, tmp_path: Path) -> None:
    unknown = _json_error(cli(svc, "load", "no-such-model", "--json"))
    assert unknown["error_code"] == "MODEL_NOT_FOUND" and unknown["details"]["ref"] == "no-such-model"
    shared = _json_error(cli(svc, "load", "tiny-sdxl", "--json"))  # two models of that name
    assert shared["error_code"] == "INVALID_REQUEST" and len(shared["details"]["matches"]) == 2, shared
    # the other commands with --json, through the same helper: a group's, a local check, the registry
    assert _json_error(cli(svc, "cache", "add", "no-such-model", "--json"))["error_code"] == "MODEL_NOT_FOUND"
    assert _json_error(cli(svc, "jobs", "--state", "lost", "--json"))["error_code"] == "INVALID_REQUEST"
    bad_opt = _json_error(cli(svc, "optimize", "tiny-sd15", "-o", "fast", "--json"), exit_code=2)
    assert bad_opt["error"] == "--opt 'fast': expected key=value"
    db = str(tmp_path / "registry.sqlite3")
    assert _json_error(cli(svc, "show", "nothing", "--db", db, "--json"))["error_code"] == "MODEL_NOT_FOUND"
    down = _json_error(runner.invoke(app, ["status", "--json", "--url", "http://127.0.0.1:9"]))
    assert (down["error_code"], down["details"]) == ("UNREACHABLE", {"url": "http://127.0.0.1:9"})
    assert down["error"].startswith("cannot reach the service at http://127.0.0.1:9"), down
    # without --json: the words on stderr, nothing on stdout
    said = cli(svc, "load", "no-such-model")
    assert said.exit_code == 1 and not said.stdout and "MODEL_NOT_FOUND" in said.stderr, said.output
