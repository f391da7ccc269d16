"""``modelkeeper ls``, ``show`` and ``meta``; ``ls`` at 80 columns."""

from __future__ import annotations

import json
import os
from pathlib import Path

import typer
from typer.testing import CliRunner

from modelkeeper.cli.listing import Row, ls_lines
from modelkeeper.cli.registry import ls, meta, show
from modelkeeper.discovery.scanner import Scanner
from modelkeeper.registry.store import Registry
from modelkeeper.testing import write_demo_models


def _app() -> typer.Typer:
    app = typer.Typer()
    app.command("ls")(ls)
    app.command("show")(show)
    app.command("meta")(meta)
    return app


def test_ls_show_meta(registry: Registry) -> None:
    db = registry.path
    runner = CliRunner()
    listed = runner.invoke(_app(), ["ls", "--type", "lora", "--json", "--db", db])
    assert listed.exit_code == 0, listed.output
    page = json.loads(listed.stdout)
    assert page["total"] == 1 and page["items"][0]["name"] == "style"
    model_id = page["items"][0]["id"]
    table = runner.invoke(_app(), ["ls", "--db", db])
    assert table.exit_code == 0 and "7 models" in table.stdout
    assert "style" in table.stdout and "path" in table.stdout
    by_words = json.loads(
        runner.invoke(_app(), ["ls", "--type", "loras", "-q", "sty", "--json", "--db", db]).stdout
    )
    assert [m["handle"] for m in by_words["items"]] == ["style"]
    fits_sdxl = json.loads(
        runner.invoke(_app(), ["ls", "--type", "vae", "--base", "sdxl", "--json", "--db", db]).stdout
    )
    assert [m["handle"] for m in fits_sdxl["items"]] == ["vae-ft-mse"]  # stored sd1, fits SDXL too
    unknown = runner.invoke(_app(), ["ls", "--base", "sd9", "--db", db])
    assert unknown.exit_code == 1 and "base: unknown value 'sd9'; one of sd1, sd2, sdxl" in unknown.output
    set_meta = runner.invoke(
        _app(), ["meta", model_id, "--set", "tags=ink,style", "--set", "license=MIT", "--json", "--db", db]
    )
    assert set_meta.exit_code == 0, set_meta.output
    assert json.loads(set_meta.stdout)["tags"] == ["ink", "style"]
    assert (
        json.loads(runner.invoke(_app(), ["ls", "--tag", "ink", "--json", "--db", db]).stdout)["total"] == 1
    )
    shown = runner.invoke(_app(), ["show", "style", "--json", "--db", db])
    assert shown.exit_code == 0, shown.output
    data = json.loads(shown.stdout)
    assert data["id"] == model_id and data["lora_format"] == "kohya" and data["meta"]["license"] == "MIT"
    assert data["worker_spec"]["request"]["type"] == "lora"
    assert data["history"][0]["op"] == "meta.set"
    pretty = runner.invoke(_app(), ["show", "sd15", "--db", db])
    assert pretty.exit_code == 0 and "components" in pretty.stdout


def test_errors(registry: Registry) -> None:
    runner = CliRunner()
    missing = runner.invoke(_app(), ["show", "nothing-like-this", "--db", registry.path])
    assert missing.exit_code == 1 and "MODEL_NOT_FOUND" in missing.output
    bad = runner.invoke(_app(), ["meta", "style", "--set", "colour=red", "--db", registry.path])
    assert bad.exit_code == 1 and "INVALID_REQUEST" in bad.output
    malformed = runner.invoke(_app(), ["meta", "style", "--set", "novalue", "--db", registry.path])
    assert malformed.exit_code == 1 and "key=value" in malformed.output  # bad input exits 1, as above


def test_ls_at_80_columns_splits_no_name(registry: Registry, models_root: Path, tmp_path: Path) -> None:
    """At 80 columns a long path folds after ``/`` (a name too long for a line after ``.``, ``-`` or
    ``_``), never inside a name; a handle is never split; read down its column, a path is the path."""
    demo = write_demo_models(tmp_path / "demo", only=["sd15-lora-kohya"])
    deep = models_root / "loras/characters/anime-style/detailed-eyes-v2.1.safetensors"
    deep.parent.mkdir(parents=True)
    demo.path("sd15-lora-kohya").rename(deep)
    Scanner(registry, [models_root]).scan()
    runner = CliRunner()
    listed = json.loads(runner.invoke(_app(), ["ls", "--json", "--db", registry.path]).stdout)["items"]
    common = os.path.commonpath([m["path"] for m in listed])
    table = runner.invoke(_app(), ["ls", "--db", registry.path], env={"COLUMNS": "80", "TERM": "dumb"})
    assert table.exit_code == 0, table.output
    lines = table.stdout.splitlines()
    assert max(len(line) for line in lines) <= 80, table.stdout
    rows = table_rows(lines)
    assert [h for h, _ in rows] == [m["handle"] for m in listed], table.stdout
    assert ["".join(p) for _, p in rows] == [os.path.relpath(m["path"], common) for m in listed]
    folded = [p for _, p in rows if len(p) > 1]
    assert folded and all(line[-1] in "/.-_" for p in folded for line in p[:-1]), table.stdout


def test_ls_paths_go_under_their_rows_when_handles_leave_no_room() -> None:
    """Long handles at 80 columns: each path on lines of its own, whole when it fits; the type and
    base folded after ``_``; a handle wider than the terminal makes its line wider, never split."""
    handle = "juggernautXL_v9Rundiffusionphoto2_by_someone"
    path = "checkpoints/sdxl/juggernautXL_v9Rundiffusionphoto2_fp16.safetensors (+2)"
    rows: list[Row] = [
        (handle, "textual_inversion", "sdxl_refiner", "6.5 GB", path),
        ("x", "vae", "sd1", "1 MB", "v"),
    ]
    lines = ls_lines("2 models", "/models", rows, 80)
    assert lines[0] == "2 models, paths under /models" and max(len(line) for line in lines) <= 80
    assert table_rows(lines) == [(handle, [path]), ("x", ["v"])]
    assert [line.split() for line in lines[4:6]] == [
        [handle, "textual_", "sdxl_", "6.5", "GB"],
        ["inversion", "refiner"],
    ]
    (got, folded), _ = table_rows(ls_lines("2 models", "", rows, 40))
    assert got == handle and all(len(line) <= 40 - 2 for line in folded)
    assert all(line[-1] in "/.-_" for line in folded[:-1]) and folded[-1].endswith("(+2)")
    assert "".join(folded).replace(" ", "") == path.replace(" ", "")


def table_rows(lines: list[str]) -> list[tuple[str, list[str]]]:
    """(handle, path lines) of each row of ``ls``'s table as printed, the path beside its row or
    (``  path`` under the header) on lines of its own under it."""
    header = next(i for i, line in enumerate(lines) if line.startswith("handle "))
    kind = lines[header].index("type")
    stacked = lines[header + 1] == "  path"
    at = None if stacked else lines[header].index("path")
    rows: list[tuple[str, list[str]]] = []
    for line in lines[header + (3 if stacked else 2) :]:
        if stacked and line.startswith("  ") and line[2] != " ":
            rows[-1][1].append(line[2:])
            continue
        if line[:kind].strip():
            rows.append((line[:kind].strip(), []))
        if at is not None and line[at:].strip():
            rows[-1][1].append(line[at:].strip())
    return rows


def test_ls_says_which_files_are_missing_when_the_listing_can_hold_them(
    registry: Registry, models_root: Path
) -> None:
    """``--status all`` and ``missing`` add a status column (ok / missing); ``ok``, the default,
    lists only present files and has none."""
    (models_root / "loras/style.safetensors").unlink()
    Scanner(registry, [models_root]).scan()
    runner = CliRunner()
    env = {"COLUMNS": "80", "TERM": "dumb"}
    listed = runner.invoke(_app(), ["ls", "--status", "all", "--db", registry.path], env=env)
    assert listed.exit_code == 0, listed.output
    lines = listed.stdout.splitlines()
    header = next(line for line in lines if line.startswith("handle "))
    assert header.split() == ["handle", "type", "base", "size", "status"], listed.stdout  # path: under
    at = header.index("status")
    rows = [line for line in lines[lines.index(header) + 3 :] if not line.startswith(" ")]
    states = {line.split()[0].split("~")[0]: line[at:] for line in rows}
    assert states.pop("style") == "missing" and set(states.values()) == {"ok"}, listed.stdout
    assert max(len(line) for line in lines) <= 80, listed.stdout
    gone = runner.invoke(_app(), ["ls", "--status", "missing", "--db", registry.path], env=env).stdout
    assert "missing" in gone and "style" in gone and "sd15" not in gone, gone
    present = runner.invoke(_app(), ["ls", "--db", registry.path], env=env).stdout
    assert "status" not in present and "style" not in present, present
