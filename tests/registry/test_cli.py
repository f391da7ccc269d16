"""``modelkeeper ls``, ``show`` and ``meta``."""

from __future__ import annotations

import json

import typer
from typer.testing import CliRunner

from modelkeeper.cli.registry import ls, meta, show
from modelkeeper.registry.store import Registry


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
    assert malformed.exit_code == 2
