"""The import contracts of ``pyproject.toml`` (``[tool.importlinter]``): the tree keeps them, and
a forbidden import breaks them. ``lint-imports`` runs as ``make lint`` does, on this tree or on a
copy of the package in a temporary folder (the real tree is never edited)."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import modelkeeper

ROOT = Path(__file__).resolve().parents[1]
PACKAGE = Path(modelkeeper.__file__).resolve().parent
LINT_IMPORTS = Path(sys.executable).parent / "lint-imports"


def lint_imports(config: Path, src: Path) -> subprocess.CompletedProcess[str]:
    """``lint-imports CONFIG`` with the package found under ``src`` first on the path."""
    env = {**os.environ, "PYTHONPATH": str(src)}
    return subprocess.run(
        [str(LINT_IMPORTS), "--no-cache", "--no-logo", str(config)],
        cwd=config.parent,
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )


def test_the_tree_keeps_every_contract() -> None:
    result = lint_imports(ROOT / "pyproject.toml", PACKAGE.parent)
    assert result.returncode == 0, result.stdout + result.stderr
    assert "0 broken" in result.stdout


def test_a_worker_importing_the_orchestrator_breaks_the_contracts(tmp_path: Path) -> None:
    copy = tmp_path / "src" / "modelkeeper"
    shutil.copytree(PACKAGE, copy, ignore=shutil.ignore_patterns("__pycache__"))
    errors = copy / "worker" / "errors.py"
    errors.write_text(
        errors.read_text(encoding="utf-8") + "\nimport modelkeeper.orchestrator\n", encoding="utf-8"
    )
    config = tmp_path / "pyproject.toml"
    shutil.copyfile(ROOT / "pyproject.toml", config)

    result = lint_imports(config, tmp_path / "src")

    assert result.returncode == 1, result.stdout + result.stderr
    out = " ".join(result.stdout.split())  # lint-imports wraps long lines
    assert "The worker imports only protocol, formats and cache" in out
    assert "BROKEN" in out
    assert "- modelkeeper.worker.errors -> modelkeeper.orchestrator (l." in out
