"""The client commands against a live service (in-process uvicorn, a real CPU worker subprocess, a
registry of a few demo models), as a new user meets them: in an 80-column terminal, with ``--json``,
and with listings that come back empty."""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import torch
from safetensors.torch import load_file, save_file
from typer.testing import CliRunner, Result

from modelkeeper.cli.app import app
from modelkeeper.client import Client
from modelkeeper.testing import write_demo_models
from modelkeeper.testing.service import RunningService
from tests.conftest import scanned_service

runner = CliRunner()
#: Two models of one name (``tiny-sdxl@diffusers``, ``tiny-sdxl@checkpoints``), one of another,
#: and a CLIP-L (one component: it loads and validates in milliseconds).
DEMO = ["sdxl-pipeline", "sdxl-checkpoint", "sd15-checkpoint", "clip-l"]
CLIP_L = "clip/tiny-clip-l.safetensors"


@pytest.fixture(scope="module")
def svc(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RunningService]:
    """The demo models, and a copy of the tiny CLIP-L with NaN in one tensor (it fails validation)."""
    root = tmp_path_factory.mktemp("cli-models")
    write_demo_models(root, only=DEMO)
    tensors = load_file(root / CLIP_L)
    name = next(k for k, t in tensors.items() if t.is_floating_point())
    tensors[name] = torch.full_like(tensors[name], float("nan"))
    save_file(tensors, root / "clip" / "broken-clip-l.safetensors")
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
    lost = _json_error(cli(svc, "jobs", "--state", "lost", "--json"), exit_code=2)  # checked here
    assert (lost["error_code"], lost["details"]) == ("INVALID_REQUEST", {"param": "state"}), lost
    bad_opt = _json_error(cli(svc, "optimize", "tiny-sd15", "-o", "fast", "--json"), exit_code=2)
    assert bad_opt["error"] == "--opt 'fast': expected key=value"
    db = str(svc.service.settings.db)
    assert _json_error(cli(svc, "show", "nothing", "--db", db, "--json"))["error_code"] == "MODEL_NOT_FOUND"
    nowhere = str(tmp_path / "registry.sqlite3")  # no registry there: named, not created
    assert (
        _json_error(cli(svc, "show", "nothing", "--db", nowhere, "--json"))["error_code"] == "FILE_NOT_FOUND"
    )
    down = _json_error(runner.invoke(app, ["status", "--json", "--url", "http://127.0.0.1:9"]))
    assert (down["error_code"], down["details"]) == ("UNREACHABLE", {"url": "http://127.0.0.1:9"})
    assert down["error"].startswith("cannot reach the service at http://127.0.0.1:9"), down
    # a bad value of another option, before or after --json: no usage text, the same JSON (exit 2)
    for args in (["--offload", "lots", "--json"], ["--json", "--offload", "lots"]):
        offload = _json_error(cli(svc, "load", "tiny-sd15", *args), exit_code=2)
        assert "expected none, auto or a size like 4GB" in offload["error"], offload
        assert offload["details"] == {"param": "offload"}, offload
    assert _json_error(cli(svc, "ls", "--limit", "0", "--db", db, "--json"), exit_code=2)["details"]
    # without --json (the run before had it): the words on stderr, nothing on stdout
    said = cli(svc, "load", "no-such-model")
    assert said.exit_code == 1 and not said.stdout and "MODEL_NOT_FOUND" in said.stderr, said.output


def _whole(result: Result, *values: str) -> None:
    """Each of ``values`` on one line of ``result``'s output, whose tables are at most 80 wide
    and cut nowhere (a line of text beside them may be longer: the terminal wraps it, cutting nothing)."""
    assert result.exit_code == 0, result.output
    lines = result.stdout.splitlines()
    assert "…" not in result.stdout, result.stdout
    assert max(len(line) for line in lines if line[:1] in "┏┃┡│└─ ") <= 80, result.stdout
    for value in values:
        assert any(value in line for line in lines), f"{value!r} split or cut:\n{result.stdout}"


def test_at_80_columns_nothing_a_user_types_is_cut(svc: RunningService) -> None:
    """The handles of the loaded models (status), of the cached ones and the ids ``cache drop``
    takes (cache), the ids of jobs, a model's component names and content ids (show)."""
    for model in ("tiny-sdxl@diffusers", "tiny-sdxl@checkpoints"):
        assert cli(svc, "load", model).exit_code == 0
    try:
        _whole(cli(svc, "status"), "tiny-sdxl@diffusers", "tiny-sdxl@checkpoints")
        assert cli(svc, "cache", "add", "tiny-sd15").exit_code == 0
        with Client(svc.url) as c:
            segments = c.cache()["segments"]
            jobs = [j["id"] for j in c.jobs()]
        ids = [s["component_id"].rpartition(":")[2][:12] for s in segments]
        _whole(cli(svc, "cache"), *ids, "tiny-sdxl@diffusers", "tiny-sdxl@checkpoints", "tiny-sd15")
        _whole(cli(svc, "jobs"), *jobs)
    finally:
        for model in ("tiny-sdxl@diffusers", "tiny-sdxl@checkpoints"):
            assert cli(svc, "unload", model).exit_code == 0
    db = str(svc.service.settings.db)
    shown = cli(svc, "show", "tiny-sdxl@diffusers", "--db", db)
    names = ["text_encoder", "text_encoder_2", "unet", "vae", "clip_l", "clip_g"]
    content = [
        c["content_id"][:16]
        for c in json.loads(cli(svc, "show", "tiny-sdxl@diffusers", "--db", db, "--json").stdout)[
            "components"
        ]
    ]
    _whole(shown, "tiny-sdxl@diffusers", *names, *content)
    _whole(cli(svc, "ls", "--status", "all", "--db", db), "tiny-sdxl@diffusers", "tiny-sdxl@checkpoints")


def test_validate_exits_1_naming_the_component_that_failed(svc: RunningService) -> None:
    for model in ("tiny-clip-l", "broken-clip-l"):
        assert cli(svc, "load", model).exit_code == 0
    try:
        good = cli(svc, "validate", "tiny-clip-l")
        assert good.exit_code == 0 and "passed" in good.stdout and "error" not in good.stderr, good.output
        bad = cli(svc, "validate", "broken-clip-l")
        assert bad.exit_code == 1 and "FAILED" in bad.stdout, bad.output
        said = " ".join(bad.stderr.split())  # after the job's progress lines
        assert "error validation failed: broken-clip-l text_encoder on cpu" in said, said
        as_json = cli(svc, "validate", "broken-clip-l", "--json")
        assert as_json.exit_code == 1 and not as_json.stderr, as_json.output
        [placement] = json.loads(as_json.stdout)
        assert [c["passed"] for c in placement["components"].values()] == [False], placement
    finally:
        for model in ("tiny-clip-l", "broken-clip-l"):
            assert cli(svc, "unload", model).exit_code == 0


def test_json_is_taken_after_the_group_or_after_the_command(svc: RunningService) -> None:
    """``cache --json add``, ``cache add --json``, ``cache drop ID --json``, ``jobs show ID --json``...:
    each prints the one JSON object (never the plain text), whichever place ``--json`` has."""
    for args in (["cache", "--json", "add", "tiny-sd15"], ["cache", "add", "tiny-sd15", "--json"]):
        added = cli(svc, *args)
        assert added.exit_code == 0 and json.loads(added.stdout)["segments"], added.output
    with Client(svc.url) as c:
        first, second = (s["component_id"] for s in c.cache()["segments"][:2])
        job = c.jobs()[0]["id"]
    for args in (["cache", "--json", "drop", first], ["cache", "drop", second, "--json"]):
        dropped = cli(svc, *args)
        assert dropped.exit_code == 0 and "freed_bytes" in json.loads(dropped.stdout), dropped.output
    for args in (["cache", "--json", "clear"], ["cache", "clear", "--json"]):
        cleared = cli(svc, *args)
        assert cleared.exit_code == 0 and "dropped" in json.loads(cleared.stdout), cleared.output
    for sub in ("show", "watch"):
        for args in (["jobs", "--json", sub, job], ["jobs", sub, job, "--json"]):
            shown = cli(svc, *args)
            assert shown.exit_code == 0 and json.loads(shown.stdout)["id"] == job, shown.output
    refused = _json_error(cli(svc, "jobs", "cancel", job, "--json"))  # finished: nothing to cancel
    assert refused["details"] == {"job": job, "state": "succeeded"}, refused
    for args in (["jobs", "--json", "show", "j-0-none"], ["cache", "drop", "00000000", "--json"]):
        assert _json_error(cli(svc, *args))["error_code"] == "NOT_FOUND"


def test_benchmark_prints_the_peak_memory_its_help_promises(svc: RunningService) -> None:
    assert "peak memory" in cli(svc, "benchmark", "--help").stdout
    assert cli(svc, "load", "tiny-clip-l").exit_code == 0
    try:
        result = cli(svc, "benchmark", "tiny-clip-l", "--steps", "2", "--warmup", "0", columns=200)
        lines = [line for line in result.stdout.splitlines() if line.startswith("tiny-clip-l ")]
        assert result.exit_code == 0 and lines, result.output
        assert all("median " in line and ", peak memory " in line for line in lines), result.stdout
    finally:
        assert cli(svc, "unload", "tiny-clip-l").exit_code == 0


def test_a_bad_pin_has_one_code_from_meta_and_from_the_api(svc: RunningService) -> None:
    """``meta --set default_settings=...`` and ``PUT /api/model/{id}/metadata`` run one check and
    answer its error with one code (INCOMPATIBLE_PART), with one message."""
    settings = {"parts": {"vae": "tiny-sdxl-vae"}}  # an SD1 checkpoint takes no parts
    db = str(svc.service.settings.db)
    args = ["meta", "tiny-sd15", "--db", db, "--set", f"default_settings={json.dumps(settings)}", "--json"]
    said = _json_error(cli(svc, *args))
    with Client(svc.url) as c:
        answer = c.http.put(
            f"/api/model/{c.model('tiny-sd15')['id']}/metadata", json={"default_settings": settings}
        )
    assert (
        answer.status_code == 422 and said["error_code"] == answer.json()["error_code"] == "INCOMPATIBLE_PART"
    )
    assert said["error"] == answer.json()["error"] and "takes no parts" in said["error"], said
