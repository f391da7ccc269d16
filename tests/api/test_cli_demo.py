"""``modelkeeper demo-models``: the default set, and the optional entries with ``--extras``."""

from __future__ import annotations

import json
from pathlib import Path

from typer.testing import CliRunner

from modelkeeper.cli.app import app
from modelkeeper.testing import demo_entry_names
from modelkeeper.testing.demo import PACKED_ENTRY_NAMES


def test_demo_models_extras_writes_the_optional_entries(tmp_path: Path) -> None:
    result = CliRunner().invoke(app, ["demo-models", str(tmp_path), "--extras"])
    assert result.exit_code == 0, result.output
    manifest = json.loads((tmp_path / "manifest.json").read_text())
    names = {entry["name"] for entry in manifest["entries"]}
    assert names == set(demo_entry_names(extras=True))
    assert set(PACKED_ENTRY_NAMES) <= names and not set(PACKED_ENTRY_NAMES) & set(demo_entry_names())
    assert (tmp_path / "transformer" / "tiny-flux-Q8_0.gguf").is_file()
    assert f"wrote {len(names)} demo models" in result.output
