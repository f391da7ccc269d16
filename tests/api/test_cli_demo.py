"""``modelkeeper demo-models``: the default set, and the optional entries with ``--extras``."""

from __future__ import annotations

import json
import subprocess
import sys
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
    tokenizers = [entry for entry in manifest["entries"] if entry["type"] == "tokenizer"]
    assert f"wrote {len(names) - len(tokenizers)} models and {len(tokenizers)} tokenizers" in result.output


def test_demo_models_as_a_process_prints_no_library_warnings(tmp_path: Path) -> None:
    """The user sees one line: the count of models (what ``ls`` lists) and tokenizers, no transformers noise."""
    done = subprocess.run(
        [sys.executable, "-m", "modelkeeper", "demo-models", str(tmp_path)],
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert done.returncode == 0, done.stderr
    manifest = json.loads((tmp_path / "manifest.json").read_text())
    types = [entry["type"] for entry in manifest["entries"]]
    models, tokenizers = len(types) - types.count("tokenizer"), types.count("tokenizer")
    assert tokenizers == 2
    assert done.stderr.strip() == (
        f"wrote {models} models and {tokenizers} tokenizers to {tmp_path} (see {tmp_path / 'manifest.json'})"
    )
