"""A typo'd path is an error naming it, never a folder created in silence: ``serve --models`` of a
folder that is not there (but the default ``models`` that ``make run`` fills, and the root
``--demo`` writes into), ``ls``, ``show`` or ``meta --db`` of a registry that is not there (only
``serve`` and ``scan`` create one)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from typer.testing import CliRunner

from modelkeeper.cli.app import app
from modelkeeper.cli.serve import missing_roots

runner = CliRunner()


def test_serve_refuses_a_model_root_that_is_not_there(tmp_path: Path) -> None:
    typo = tmp_path / "x" / "typo_models"
    db = tmp_path / "registry.sqlite3"
    result = runner.invoke(app, ["serve", "--models", str(typo), "--port", "0", "--db", str(db)])
    said = " ".join(result.stderr.split())
    assert result.exit_code == 2, result.output
    assert f"error model root {typo}: no such folder; create it or fix the path" in said, said
    assert not (tmp_path / "x").exists() and not db.exists()


def test_the_default_root_and_the_demo_root_may_be_created(tmp_path: Path) -> None:
    (tmp_path / "a-file").write_text("")
    assert missing_roots([Path("models")], demo=False) == []  # the default: make run writes it
    assert missing_roots([tmp_path / "new", tmp_path], demo=True) == []  # --demo writes the first
    assert missing_roots([tmp_path, tmp_path / "new"], demo=True) == [
        f"model root {tmp_path / 'new'}: no such folder; create it or fix the path"
    ]
    assert missing_roots([tmp_path / "a-file"], demo=False) == [
        f"model root {tmp_path / 'a-file'}: not a folder"
    ]


@pytest.mark.parametrize("command", [["ls"], ["show", "tiny-sd15"], ["meta", "tiny-sd15"]])
def test_a_registry_that_is_not_there_is_an_error_naming_it(tmp_path: Path, command: list[str]) -> None:
    db = tmp_path / "zz" / "none.db"
    result = runner.invoke(app, [*command, "--db", str(db)])
    said = " ".join(result.stderr.split())
    assert result.exit_code == 1 and f"FILE_NOT_FOUND: no registry at {db}: check --db" in said, result.output
    as_json = runner.invoke(app, [*command, "--db", str(db), "--json"])
    body = json.loads(as_json.stdout)
    assert (
        as_json.exit_code == 1
        and body["error_code"] == "FILE_NOT_FOUND"
        and body["details"] == {"path": str(db)}
    )
    assert not (tmp_path / "zz").exists()


def test_scan_creates_the_registry_ls_then_reads(tmp_path: Path) -> None:
    db = tmp_path / "new" / "registry.sqlite3"
    (tmp_path / "models").mkdir()
    assert runner.invoke(app, ["scan", str(tmp_path / "models"), "--db", str(db)]).exit_code == 0
    listed = runner.invoke(app, ["ls", "--db", str(db), "--json"])
    assert listed.exit_code == 0 and json.loads(listed.stdout)["total"] == 0, listed.output
