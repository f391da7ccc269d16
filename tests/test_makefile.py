"""``make run`` passes PORT, HOST, MODELS and ARGS to ``modelkeeper serve`` (read from ``make -n``,
which prints the commands without running them)."""

from __future__ import annotations

import os
import shlex
import shutil
import subprocess
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def serve_command(*assignments: str) -> list[str]:
    env = {k: v for k, v in os.environ.items() if k not in ("PORT", "HOST", "ARGS", "MODELS", "MAKEFLAGS")}
    out = subprocess.run(
        ["make", "-n", "-C", str(ROOT), "run", *assignments],
        env=env, capture_output=True, text=True, check=True, timeout=30,
    ).stdout  # fmt: skip
    (line,) = [line for line in out.splitlines() if "modelkeeper serve" in line]
    words = shlex.split(line)
    return words[words.index("serve") :]


@pytest.mark.skipif(shutil.which("make") is None, reason="no make on this machine")
def test_make_run_passes_port_host_models_and_args(tmp_path: Path) -> None:
    models = tmp_path / "my-models"
    models.mkdir()  # exists: make -n prints no demo-models line for it
    given = serve_command("PORT=9000", "HOST=127.0.0.2", "ARGS=--x --token t", f"MODELS={models}")
    assert given == [
        "serve",
        "--models",
        str(models),
        "--host",
        "127.0.0.2",
        "--port",
        "9000",
        "--x",
        "--token",
        "t",
    ]
    assert serve_command() == ["serve", "--models", "models"]  # the settings' defaults
