"""The scanning process killed (SIGKILL) mid-scan: the registry passes SQLite's integrity check
afterwards, and a rescan converges to what an uninterrupted scan finds.

The moment of the kill is the test's: the scan runs with ``MODELKEEPER_SCAN_HOLD_AFTER`` and stops
for good once that many rows are committed, so the kill always lands between two batches with
rows still to write (no race against the scan's speed)."""

from __future__ import annotations

import os
import shutil
import signal
import sqlite3
import subprocess
import sys
import time
from pathlib import Path

from modelkeeper.discovery.scanner import HOLD_ENV
from modelkeeper.registry.store import Registry
from modelkeeper.testing import DemoManifest

COPIES = 40  # x 14 small files: more than two batches of the scanner's writes
HOLD = 256  # one batch committed, then the scan stops until it is killed


def _library(demo: DemoManifest, root: Path) -> int:
    small = [e for e in demo if e.path.endswith(".safetensors") and e.size_bytes < 2_500_000]
    count = 0
    for i in range(COPIES):
        for e in small:
            dest = root / f"set{i:03d}" / e.path
            dest.parent.mkdir(parents=True, exist_ok=True)
            shutil.copyfile(demo.root / e.path, dest)
            count += 1
    return count


def _cmd(root: Path, db: Path) -> list[str]:
    return [sys.executable, "-m", "modelkeeper", "scan", str(root), "--db", str(db), "--json"]


def _files(db: Path) -> set[tuple[str, str, str, str]]:
    """(path, status, model type, model status) of every file: the copies of one demo file are
    one model with many locations, whichever of them was found first."""
    with Registry.open(db) as r:
        rows = r._rows(
            "SELECT f.path, f.status, m.type, m.status FROM files AS f LEFT JOIN models AS m ON m.id = f.model_id"
        )
        return {(str(p), str(s), str(t), str(ms)) for p, s, t, ms in rows}


def _rows(db: Path) -> int:
    try:
        with sqlite3.connect(db, timeout=5) as conn:
            return int(conn.execute("SELECT count(*) FROM files").fetchone()[0])
    except sqlite3.OperationalError:  # not created yet
        return 0


def test_scan_killed_midway_leaves_a_sound_registry(demo: DemoManifest, tmp_path: Path) -> None:
    root = tmp_path / "models"
    files = _library(demo, root)
    assert files > 2 * HOLD
    db = tmp_path / "killed.sqlite3"
    env = {**os.environ, HOLD_ENV: str(HOLD)}
    proc = subprocess.Popen(_cmd(root, db), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, env=env)
    try:
        end = time.monotonic() + 120
        while _rows(db) < HOLD:  # the scan holds once HOLD rows are committed
            assert proc.poll() is None, "the scan ended before it held"
            assert time.monotonic() < end, "the scan never committed its first batch"
            time.sleep(0.1)
    finally:
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait()
    with sqlite3.connect(db) as conn:
        assert conn.execute("PRAGMA integrity_check").fetchone()[0] == "ok"
        partial = conn.execute("SELECT count(*) FROM files").fetchone()[0]
    assert HOLD <= partial < files

    again = subprocess.run(_cmd(root, db), capture_output=True, timeout=300, check=False)
    assert again.returncode == 0, again.stderr.decode()[-2000:]
    clean_db = tmp_path / "clean.sqlite3"
    clean = subprocess.run(_cmd(root, clean_db), capture_output=True, timeout=300, check=False)
    assert clean.returncode == 0, clean.stderr.decode()[-2000:]
    assert _files(db) == _files(clean_db)
    assert len(_files(db)) == files
