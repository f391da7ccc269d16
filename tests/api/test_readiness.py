"""Readiness waits for the first scan of the model roots (issue: ``/health/ready`` answered 200
before it, and a load right after answered 404). The scan and the hashing after it are real,
held at a gate the test opens: the moment the scan ends is the test's, never a timer's."""

from __future__ import annotations

import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import httpx
import pytest

from modelkeeper.discovery import Hasher, Scanner
from modelkeeper.testing import DemoManifest
from modelkeeper.testing.service import RunningService
from tests.api.conftest import SDXL, inprocess_service


class Gate:
    """Holds a method of every instance of a class until opened; ``fail``: raise instead of
    running it once opened."""

    def __init__(self, monkeypatch: pytest.MonkeyPatch, cls: type[Any], method: str) -> None:
        self.opened = threading.Event()
        self.entered = threading.Event()
        self.fail: Exception | None = None
        real: Callable[..., Any] = getattr(cls, method)

        def held(obj: Any, *args: Any, **kwargs: Any) -> Any:
            self.entered.set()
            assert self.opened.wait(60), "the test never opened the gate"
            if self.fail is not None:
                raise self.fail
            return real(obj, *args, **kwargs)

        monkeypatch.setattr(cls, method, held)

    def open(self) -> None:
        self.opened.set()


def ready(svc: RunningService) -> httpx.Response:
    return httpx.get(f"{svc.url}/health/ready", timeout=10)


def until_scan_settles(svc: RunningService) -> httpx.Response:
    """``/health/ready`` once the first scan is no longer running (bounded: 60 s)."""
    end = time.monotonic() + 60
    while (answer := ready(svc)).json()["scan"]["state"] == "running":
        assert time.monotonic() < end, answer.json()
        time.sleep(0.02)
    return answer


def test_ready_waits_for_the_first_scan_not_for_hashing(
    demo: DemoManifest, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    scan, hashing = Gate(monkeypatch, Scanner, "scan"), Gate(monkeypatch, Hasher, "run")
    with inprocess_service(demo, tmp_path, scan, hashing, hash_on_start=True) as svc:
        assert scan.entered.wait(60)
        answer = ready(svc)
        body = answer.json()
        assert answer.status_code == 503 and body["ready"] is False
        assert body["workers"] == {"cpu": "ready"} and body["preload"]["pending"] == 0  # only the scan
        assert body["scan"]["state"] == "running" and body["scan"]["error"] is None
        job = body["scan"]["job_id"]
        assert httpx.get(f"{svc.url}/api/jobs/{job}").json()["kind"] == "scan"
        assert httpx.get(f"{svc.url}/api/model/{SDXL}").status_code == 404  # what ready now waits for

        scan.open()
        answer = until_scan_settles(svc)
        assert answer.status_code == 200 and answer.json()["ready"] is True
        assert answer.json()["scan"] == {"state": "done", "job_id": job, "error": None}
        assert hashing.entered.wait(60)  # the same job hashes now: ready does not wait for it
        assert httpx.get(f"{svc.url}/api/jobs/{job}").json()["state"] == "running"
        assert httpx.get(f"{svc.url}/api/model/{SDXL}").status_code == 200
        hashing.open()


def test_a_failed_first_scan_leaves_the_service_ready_and_says_why(
    demo: DemoManifest, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    scan = Gate(monkeypatch, Scanner, "scan")
    scan.fail = OSError("the model root is unreadable")
    with inprocess_service(demo, tmp_path, scan) as svc:
        assert ready(svc).status_code == 503
        scan.open()
        answer = until_scan_settles(svc)
        body = answer.json()
        assert answer.status_code == 200 and body["ready"] is True
        assert body["scan"]["state"] == "failed"
        assert "the model root is unreadable" in body["scan"]["error"]
        # a later scan that registers the roots makes it done
        scan.fail = None
        refresh = httpx.post(f"{svc.url}/api/model/cache/refresh", params={"wait_for_completion": True})
        assert refresh.status_code == 200, refresh.text
        assert ready(svc).json()["scan"] == {"state": "done", "job_id": body["scan"]["job_id"], "error": None}


def test_ready_at_once_without_a_scan_on_start(demo: DemoManifest, tmp_path: Path) -> None:
    with inprocess_service(demo, tmp_path, scan_on_start=False) as svc:
        answer = ready(svc)
        assert answer.status_code == 200
        assert answer.json()["scan"] == {"state": "off", "job_id": None, "error": None}
