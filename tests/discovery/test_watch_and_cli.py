"""Watch mode (watchfiles) and the ``scan`` command."""

from __future__ import annotations

import json
import threading
from pathlib import Path

import pytest
import typer
from stripped import write_stripped
from typer.testing import CliRunner

from modelkeeper.cli.discovery import scan as scan_command
from modelkeeper.discovery.scanner import Scanner, ScanReport
from modelkeeper.registry.store import Registry

EMBEDDING = {"emb_params": ("F32", (2, 768))}


def test_watch_rescans_on_change(tmp_path: Path, registry: Registry) -> None:
    root = tmp_path / "models"
    write_stripped(root / "a.safetensors", EMBEDDING)
    stop = threading.Event()
    reports: list[ScanReport] = []

    def run() -> None:
        for report in Scanner(registry, [root]).watch(stop_event=stop, debounce_ms=50):
            reports.append(report)
            if len(reports) == 1:
                # the file comes the moment the first scan is reported, before the generator goes
                # on: the earliest a caller can change something, and it must not be missed
                write_stripped(root / "b.safetensors", EMBEDDING)
            if len(reports) == 2:
                stop.set()

    thread = threading.Thread(target=run)
    thread.start()
    thread.join(timeout=30)
    stop.set()
    assert not thread.is_alive()
    assert [r.summary()["added"] for r in reports] == [1, 1]
    assert reports[1].summary()["unchanged"] == 1


def _app() -> typer.Typer:
    app = typer.Typer()
    app.command("scan")(scan_command)
    app.command("noop")(lambda: None)  # keeps "scan" a sub-command, as in modelkeeper.cli.app
    return app


def test_scan_command_json(tmp_path: Path) -> None:
    root = tmp_path / "models"
    write_stripped(root / "loras" / "x.safetensors", EMBEDDING)
    (root / "empty.ckpt").write_bytes(b"")
    db = tmp_path / "r.sqlite3"
    result = CliRunner().invoke(_app(), ["scan", str(root), "--json", "--hash", "--db", str(db)])
    assert result.exit_code == 0, result.output
    rows = {r["path"]: r for r in json.loads(result.stdout)}
    assert rows["loras/x.safetensors"]["type"] == "textual_inversion"
    assert rows["loras/x.safetensors"]["status"] == "ok"
    assert (
        rows["empty.ckpt"]["status"] == "rejected"
        and rows["empty.ckpt"]["error_code"] == "INVALID_MODEL_FILE"
    )
    with Registry.open(db) as registry:
        record = registry.resolve(str(root / "loras" / "x.safetensors"))
        assert record.file is not None and record.file.hashes.blake3


def test_scan_command_table_and_env_db(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    db = tmp_path / "env.sqlite3"
    monkeypatch.setenv("MODELKEEPER_DB", str(db))
    write_stripped(tmp_path / "m" / "x.safetensors", EMBEDDING)
    result = CliRunner().invoke(_app(), ["scan", str(tmp_path / "m"), "--threads", "4"])
    assert result.exit_code == 0, result.output
    assert "textual" in result.stdout and "1 added" in result.stdout
    assert db.exists()
    bad = CliRunner().invoke(_app(), ["scan", str(tmp_path / "m"), "--threads", "0"])
    assert bad.exit_code == 2 and "--threads" in bad.output


def test_scan_command_missing_root(tmp_path: Path) -> None:
    result = CliRunner().invoke(_app(), ["scan", str(tmp_path / "nope"), "--db", str(tmp_path / "r.sqlite3")])
    assert result.exit_code == 1
    assert "INVALID_REQUEST" in result.output
