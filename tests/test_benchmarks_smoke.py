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


def test_install_small(tmp_path: Path) -> None:
    out = tmp_path / "install.txt"
    options = ["--size-mb", "8", "--runs", "1", "--work", str(tmp_path), "--out", str(out)]
    done = subprocess.run(
        [sys.executable, str(ROOT / "benchmarks" / "install.py"), *options],
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert done.returncode == 0, done.stderr
    text = out.read_text()
    assert "throughput ratio" in text and "install+registration" in text
    assert list(tmp_path.iterdir()) == [out]  # the work folder is removed


def test_formats_tiny(tmp_path: Path) -> None:
    """benchmarks/formats.py on the CPU with the tiny Flux: GGUF and fp8 against diffusers' own paths,
    whose outputs must agree with modelkeeper's (same weights, same inputs)."""
    out = tmp_path / "formats.txt"
    done = subprocess.run(
        [sys.executable, str(ROOT / "benchmarks" / "formats.py"), "--tiny", "--forms", "q4_k,fp8-cast",
         "--repeats", "1", "--steps", "1", "--dir", str(tmp_path / "work"), "--out", str(out)],
        capture_output=True, text=True, timeout=240, check=False,
    )  # fmt: skip
    assert done.returncode == 0, done.stderr
    rows = [line.split() for line in out.read_text().splitlines() if " modelkeeper " in line]
    assert [r[0] for r in rows] == ["q4_k", "fp8-cast"]
    assert all(float(r[-1]) >= 0.999 for r in rows)  # cosine against diffusers' output
    assert "storage gguf:Q4_K" in out.read_text() and "storage float8_e4m3fn" in out.read_text()
