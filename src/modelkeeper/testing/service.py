"""A real service for tests and benchmarks: uvicorn on a free port, in a thread of this process,
with real worker subprocesses. ``with running_service(settings) as svc: Client(svc.url)...``"""

from __future__ import annotations

import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import TYPE_CHECKING

import uvicorn

from modelkeeper.api import create_app
from modelkeeper.orchestrator import Orchestrator, Settings

if TYPE_CHECKING:
    from modelkeeper.cluster import ClusterOrchestrator


@dataclass
class RunningService:
    url: str
    port: int
    service: Orchestrator | ClusterOrchestrator
    server: uvicorn.Server


@contextmanager
def running_service(
    settings: Settings,
    *,
    start_timeout: float = 180.0,
    service: Orchestrator | ClusterOrchestrator | None = None,
) -> Iterator[RunningService]:
    """Serve ``settings`` (port 0 picks a free port) until the block ends; ``service``: a service
    built already (a cluster's driver), else an orchestrator of ``settings``."""
    service = service or Orchestrator(settings)
    app = create_app(service=service)
    config = uvicorn.Config(app, host=settings.host, port=settings.port, log_level="warning", lifespan="on")
    server = uvicorn.Server(config)
    thread = threading.Thread(target=server.run, name="uvicorn", daemon=True)
    thread.start()
    end = time.monotonic() + start_timeout
    while not server.started:
        if not thread.is_alive():
            raise RuntimeError("the service did not start (see the log above)")
        if time.monotonic() > end:
            server.should_exit = True
            raise TimeoutError(f"the service did not start within {start_timeout} s")
        time.sleep(0.02)
    port = server.servers[0].sockets[0].getsockname()[1]
    try:
        yield RunningService(f"http://{settings.host}:{port}", port, service, server)
    finally:
        server.should_exit = True
        thread.join(60)
