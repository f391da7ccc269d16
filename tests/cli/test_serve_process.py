"""``modelkeeper serve`` as a process: it refuses to run when no device can start a worker, and its
log (stderr, INFO by default) tells the start, each load and the stop."""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

from modelkeeper.client import Client
from modelkeeper.testing import DemoManifest

CLIP_L = "clip/tiny-clip-l.safetensors"


def serve(tmp_path: Path, root: Path, *args: str) -> subprocess.Popen[bytes]:
    """``modelkeeper serve`` on a free port, its stderr in ``tmp_path/serve.log``."""
    cmd = [sys.executable, "-m", "modelkeeper", "serve", "--models", str(root), "--port", "0",
           "--db", str(tmp_path / "registry.sqlite3"), *args]  # fmt: skip
    env = {**os.environ, "MODELKEEPER_HASH_ON_START": "false", "MODELKEEPER_WATCH": "false"}
    with (tmp_path / "serve.log").open("wb") as log:  # the child keeps its own descriptor
        return subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=log, env=env)


def wait_for(path: Path, pattern: str, proc: subprocess.Popen[bytes], timeout: float = 120) -> re.Match[str]:
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        found = re.search(pattern, path.read_text())
        if found:
            return found
        assert proc.poll() is None, path.read_text()
        time.sleep(0.05)
    raise AssertionError(f"no {pattern!r} in:\n{path.read_text()}")


def test_serve_refuses_when_no_device_can_start_a_worker(tmp_path: Path) -> None:
    proc = serve(tmp_path, tmp_path, "--device", "cuda:99")  # cuda:99: on no machine
    assert proc.wait(120) == 1
    log = (tmp_path / "serve.log").read_text()
    assert (
        "not serving: no device can start a worker: cuda:99: worker did not start: device 'cuda:99': " in log
    )
    assert "serving on" not in log and "Traceback" not in log, log


def test_serve_logs_its_start_loads_and_stop(tmp_path: Path, demo: DemoManifest) -> None:
    proc = serve(
        tmp_path,
        demo.root,
        "--device",
        "cpu",
        "--device",
        "cuda:99",
        "--access-log",
        "--token",
        "s3cret-token",
    )
    path = tmp_path / "serve.log"
    try:
        url = wait_for(path, r"serving on (http://\S+)", proc).group(1)
        wait_for(path, r"scan: \d+ models", proc)
        with Client(url, token="s3cret-token") as client:
            client.load(CLIP_L, "cpu")
        wait_for(path, r"loaded tiny-clip-l\S* on cpu: ", proc)
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(60) == 0
    finally:
        if proc.poll() is None:
            proc.kill()
    log = path.read_text()
    for line in (
        f"INFO modelkeeper.orchestrator.service: starting: model roots {demo.root}; devices cpu, cuda:99",
        r"INFO modelkeeper.orchestrator.pool: worker cpu up: pid \d+",
        "ERROR modelkeeper.orchestrator.pool: worker cuda:99 did not start: device 'cuda:99': ",
        "WARNING modelkeeper.orchestrator.service: serving without cuda:99",
        r"INFO modelkeeper.events: loaded tiny-clip-l\S* on cpu: [\d.]+ MB in [\d.]+ s \(from disk\)",
        r'INFO uvicorn.access: 127.0.0.1:\d+ - "POST /api/model/\S+/load HTTP/1.1" 200',
        "INFO modelkeeper.serve: received SIGTERM: stopping",
        r"INFO modelkeeper.orchestrator.service: stopped: 1 model unloaded, worker stopped \(cpu\)",
    ):
        assert re.search(r"^\d{4}-\d\d-\d\d [\d:,]+ " + line, log, re.M), f"{line}\n---\n{log}"
    assert "s3cret-token" not in log
