"""The benchmark scripts still run: each in its quick mode, as a subprocess, as a user runs it."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_cluster_sim_quick(tmp_path: Path) -> None:
    out = tmp_path / "cluster_sim.txt"
    done = subprocess.run(
        [sys.executable, str(ROOT / "benchmarks" / "cluster_sim.py"), "--quick", "--out", str(out)],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert done.returncode == 0, done.stderr
    text = out.read_text()
    for name in ("modelkeeper ", "modelkeeper, RAM at 25 GB/s", "ray-serve K=2", "ray-serve K=16"):
        assert f"\n{name}" in text
    assert "seconds loading, Ray Serve / modelkeeper:" in text
    assert "placement decision (choose_placement) at 4 nodes: CPU time" in text
