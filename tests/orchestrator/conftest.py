"""The orchestrator tests' shared setup: :func:`serving` starts an orchestrator over a model root with
in-process workers (the same server and protocol as the subprocess ones) and a real SQLite registry,
and returns once its first scan is done; :func:`run` runs a test's async body."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Callable, Coroutine
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

from modelkeeper.orchestrator import Orchestrator, Settings
from modelkeeper.testing import DemoManifest
from modelkeeper.worker import InProcessWorker

MiB = 1 << 20


@asynccontextmanager
async def serving(demo: DemoManifest, tmp: Path, **overrides: Any) -> AsyncIterator[Orchestrator]:
    """An orchestrator on one CPU device serving ``demo``'s root (``model_roots=[...]`` serves
    others), its registry in ``tmp``; ``overrides``: any other settings."""
    settings = Settings(
        **{
            "devices": ["cpu"],
            "model_roots": [demo.root],
            "db": tmp / "registry.sqlite3",
            "ram_cache_bytes": 256 * MiB,
            "hash_on_start": False,
            "worker_warm": False,
            "status_poll_s": 60,
            **overrides,
        }
    )
    orch = Orchestrator(settings, worker_factory=InProcessWorker.start)
    await orch.start()
    try:
        for job in orch.jobs.list(kind="scan"):
            await orch.jobs.wait(job)
        yield orch
    finally:
        await orch.stop()


def run(body: Callable[[], Coroutine[Any, Any, Any]], timeout: float | None = 120) -> None:
    """``body()`` on an event loop of its own, failing after ``timeout`` seconds (``None``: bounded
    by pytest's own timeout only)."""
    asyncio.run(asyncio.wait_for(body(), timeout))
