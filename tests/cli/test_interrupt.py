"""Ctrl-C on a command that waits for the job it started cancels that job: the worker stops at its
next step and the device is free; the command says so and exits 130 (a live service, a real CLI
process, a real CPU worker)."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from typing import Any

import pytest

from modelkeeper.client import Client
from modelkeeper.testing import write_demo_models
from modelkeeper.testing.service import RunningService
from tests.conftest import scanned_service

MODEL = "checkpoints/tiny-sd15.safetensors"


@pytest.fixture(scope="module")
def svc(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RunningService]:
    root = tmp_path_factory.mktemp("interrupt-models")
    write_demo_models(root, only=["sd15-checkpoint"])
    with scanned_service(tmp_path_factory.mktemp("interrupt-service"), model_roots=[root]) as running:
        yield running


def _running_job(c: Client, kind: str, deadline: float) -> dict[str, Any]:
    """The job of ``kind`` once the worker reports its steps (the operation runs on the device)."""
    while True:
        jobs = c.jobs(kind=kind, state="running")
        if jobs and "steps_done" in jobs[0]["progress"]:
            return dict(jobs[0])
        assert time.monotonic() < deadline, f"no running {kind} job with worker progress"
        time.sleep(0.05)


def test_ctrl_c_cancels_the_benchmark_the_command_waits_for(svc: RunningService) -> None:
    with Client(svc.url) as c:
        c.load(MODEL)
        command = [
            sys.executable,
            "-m",
            "modelkeeper",
            "benchmark",
            MODEL,
            "--steps",
            "10000",
            "--warmup",
            "0",
        ]
        cli = subprocess.Popen(
            command,
            env={**os.environ, "MODELKEEPER_URL": svc.url},
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        try:
            job = _running_job(c, "benchmark", time.monotonic() + 120)
            cli.send_signal(signal.SIGINT)
            out, err = cli.communicate(timeout=60)
        finally:
            if cli.poll() is None:
                cli.kill()
                cli.wait()
        assert cli.returncode == 130, (out, err)
        assert f"cancelled job {job['id']} (benchmark)" in err, err
        done = c.job(job["id"])
        assert done["state"] == "cancelled", done
        # the job ended once the worker stopped: the device runs nothing and answers the next command
        assert c.status("cpu")["running"] is None
        started = time.monotonic()
        c.unload(MODEL)
        assert time.monotonic() - started < 30
