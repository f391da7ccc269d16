"""The service's log lines, from bus events (``eventlog.py``): a table of events and their lines."""

from __future__ import annotations

import logging
from typing import Any

import pytest

from modelkeeper.orchestrator.eventlog import log_event

CASES: list[tuple[dict[str, Any], int, str | None]] = [
    (
        {"type": "model.loaded", "model_id": "m-1", "device": "cuda:0",
         "placement": {"handle": "tiny-sdxl", "bytes": 28_500_000, "load_seconds": 0.412, "sources": {"unet": "ram", "vae": "disk"}}},
        logging.INFO, "loaded tiny-sdxl on cuda:0: 28.5 MB in 0.41 s (from disk, ram)",
    ),
    (
        {"type": "model.unloaded", "model_id": "m-1", "handle": "a", "device": "cpu", "reason": "evicted",
         "freed_bytes": 2_100_000, "seconds": 0.01},
        logging.INFO, "evicted a from cpu: 2.1 MB freed in 0.01 s",
    ),
    (
        {"type": "model.unloaded", "model_id": "m-1", "device": "cpu", "reason": "expired", "freed_bytes": 0},
        logging.INFO, "unloaded (keep-alive ran out) m-1 from cpu: 0 B freed",
    ),
    (
        {"type": "registry.scanned", "summary": {"total": 28, "added": 2, "missing": 1}, "vanished_roots": []},
        logging.INFO, "scan: 28 models (2 added, 1 missing)",
    ),
    (
        {"type": "worker.exited", "device": "cuda:0", "code": -9, "lost": ["m-1"],
         "error": "worker process 12 exited with code -9"},
        logging.ERROR, "worker cuda:0 exited with code -9 (worker process 12 exited with code -9); models lost: m-1",
    ),
    ({"type": "worker.failed", "device": "cpu", "error": "gave up"}, logging.ERROR, "worker cpu failed: gave up"),
    ({"type": "job.failed", "job": "j-1", "kind": "load", "info": {}}, logging.INFO, None),  # model.failed says it
    ({"type": "job.progress", "job": "j-1"}, logging.INFO, None),
]  # fmt: skip


@pytest.mark.parametrize(("event", "level", "line"), CASES)
def test_each_event_makes_its_line(
    event: dict[str, Any], level: int, line: str | None, caplog: pytest.LogCaptureFixture
) -> None:
    with caplog.at_level(logging.INFO, logger="modelkeeper.events"):
        log_event(event)
    got = [(r.levelno, r.getMessage()) for r in caplog.records]
    assert got == ([] if line is None else [(level, line)])
