"""The benchmark scripts still run: each in its quick mode, as a subprocess, as a user runs it."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def run_script(name: str, *options: str, timeout: float) -> None:
    """``python benchmarks/<name> <options>``, as a user runs it; a failure shows its stderr."""
    done = subprocess.run(
        [sys.executable, str(ROOT / "benchmarks" / name), *options],
        capture_output=True,
        text=True,
        timeout=timeout,
        check=False,
    )
    assert done.returncode == 0, done.stderr


def test_cluster_sim_quick(tmp_path: Path) -> None:
    out = tmp_path / "cluster_sim.txt"
    run_script("cluster_sim.py", "--quick", "--out", str(out), timeout=60)
    text = out.read_text()
    for name in ("modelkeeper ", "modelkeeper, RAM at 25 GB/s", "ray-serve K=2", "ray-serve K=16"):
        assert f"\n{name}" in text
    assert "seconds loading, Ray Serve / modelkeeper:" in text
    assert "placement decision (choose_placement) at 4 nodes: CPU time" in text


def test_install_small(tmp_path: Path) -> None:
    out = tmp_path / "install.txt"
    options = ["--size-mb", "8", "--runs", "1", "--work", str(tmp_path), "--out", str(out)]
    run_script("install.py", *options, timeout=120)
    text = out.read_text()
    assert "throughput ratio" in text and "install+registration" in text
    assert list(tmp_path.iterdir()) == [out]  # the work folder is removed


def test_formats_tiny(tmp_path: Path) -> None:
    """benchmarks/formats.py on the CPU with the tiny Flux: GGUF and fp8 against diffusers' own paths,
    whose outputs must agree with modelkeeper's (same weights, same inputs)."""
    out = tmp_path / "formats.txt"
    options = ["--tiny", "--forms", "q4_k,fp8-cast", "--repeats", "1", "--steps", "1",
               "--dir", str(tmp_path / "work"), "--out", str(out)]  # fmt: skip
    run_script("formats.py", *options, timeout=240)
    rows = [line.split() for line in out.read_text().splitlines() if " modelkeeper " in line]
    assert [r[0] for r in rows] == ["q4_k", "fp8-cast"]
    assert all(float(r[-1]) >= 0.999 for r in rows)  # cosine against diffusers' output
    assert "storage gguf:Q4_K" in out.read_text() and "storage float8_e4m3fn" in out.read_text()


def test_dequant_small(tmp_path: Path) -> None:
    """benchmarks/dequant.py on the CPU with a small weight: both decoders timed, and their values
    within one bf16 rounding of each other."""
    out = tmp_path / "dequant.txt"
    run_script("dequant.py", "--device", "cpu", "--shape", "64,512", "--repeats", "1", "--types", "Q8_0,Q4_K",
               "--out", str(out), timeout=120)  # fmt: skip
    rows = [line.split() for line in out.read_text().splitlines()[2:] if not line.startswith("#")]
    assert [r[0] for r in rows] == ["Q8_0", "Q4_K"]
    assert all(float(r[-1]) < 2**-7 for r in rows)


def test_lora_switch_small(tmp_path: Path) -> None:
    """benchmarks/lora_switch.py on the CPU with the tiny SDXL UNet: every operation timed on both
    sides, and modelkeeper's removal bitwise."""
    out = tmp_path / "lora_switch.txt"
    options = ["--small", "--device", "cpu", "--repeats", "1", "--rank", "4", "--out", str(out)]
    run_script("lora_switch.py", *options, timeout=120)
    text = out.read_text()
    for operation in ("apply", "strength", "remove", "unet step"):
        assert f"\n{operation} " in text
    assert "removal restores the weights bitwise: modelkeeper yes" in text
