"""The in-process worker: the same server and protocol, run inside the caller's process.

Requests and responses still travel as JSON lines, over a pair of OS pipes, so tests and
embedders exercise exactly what a subprocess worker does; in addition the caller can take the
live modules (``worker.module(name)``) to build a diffusers pipeline from them.
"""

from __future__ import annotations

import os
import threading
from collections.abc import Sequence
from typing import Any

from modelkeeper.protocol.client import WorkerConnection
from modelkeeper.protocol.commands import CommandType
from modelkeeper.protocol.errors import ProtocolError
from modelkeeper.protocol.messages import EventType
from modelkeeper.worker.arguments import parser
from modelkeeper.worker.device import DeviceMemory, parse_device
from modelkeeper.worker.server import WorkerServer
from modelkeeper.worker.service import ModelService


def build_server(
    device: str,
    write: Any,
    *,
    reserve_mb: float | None = None,
    budget_mb: float | None = None,
    throttle_mb_s: float | None = None,
) -> WorkerServer:
    """One device's service and its protocol server, writing lines with ``write``."""
    memory = DeviceMemory.for_device(parse_device(device), reserve_mb, budget_mb)
    server: WorkerServer | None = None

    def emit(event: EventType, request_id: str | None, data: dict[str, Any]) -> None:
        if server is not None:
            server.emit(event, request_id, data)

    service = ModelService(memory, emit=emit, throttle_mb_s=throttle_mb_s)
    server = WorkerServer(service, write)
    return server


class InProcessWorker(WorkerConnection):
    """A worker served by a thread of this process, spoken to over pipes with the real protocol."""

    def __init__(
        self,
        device: str = "cpu",
        *,
        reserve_mb: float | None = None,
        budget_mb: float | None = None,
        throttle_mb_s: float | None = None,
    ) -> None:
        to_server_r, to_server_w = os.pipe()
        to_client_r, to_client_w = os.pipe()
        server_out = os.fdopen(to_client_w, "wb", buffering=0)
        self._server_out = server_out
        self.server = build_server(
            device, server_out.write, reserve_mb=reserve_mb, budget_mb=budget_mb, throttle_mb_s=throttle_mb_s
        )
        self.service = self.server.service
        server_in = os.fdopen(to_server_r, "rb")
        self._thread = threading.Thread(
            target=self._serve, args=(server_in,), name="inprocess-worker", daemon=True
        )
        self._thread.start()
        super().__init__(
            os.fdopen(to_client_r, "rb"), os.fdopen(to_server_w, "wb"), name=f"inprocess[{device}]"
        )
        self.hello = self.call(CommandType.WORKER_HELLO, {"client": "inprocess"})

    def _serve(self, server_in: Any) -> None:
        try:
            self.server.serve(server_in)
        finally:
            server_in.close()
            self._server_out.close()

    def module(self, name: str) -> Any:
        """The live module (or tokenizer) loaded under ``name``."""
        return self.service.get(name).module

    @property
    def pid(self) -> int:
        return os.getpid()

    def alive(self) -> bool:
        return self._thread.is_alive() and not self.closed.is_set()

    def wait(self) -> int | None:
        self._thread.join()
        self.closed.wait()
        return None

    def kill(self) -> None:
        """End the worker as a crash would: the caller sees its output end (requests in flight fail
        with WORKER_DIED) and the server sees its input end (it finishes what runs, then stops)."""
        for stream in (self._server_out, self._writer):
            try:
                stream.close()
            except OSError:
                pass

    def stop(self, timeout: float = 30.0) -> None:
        if self._thread.is_alive():
            try:
                self.call(CommandType.WORKER_SHUTDOWN, timeout=timeout)
            except ProtocolError:
                pass
            self._thread.join(timeout)
        self.close()

    def __enter__(self) -> InProcessWorker:
        return self

    @classmethod
    def start(cls, device: str, args: Sequence[str], hello_timeout: float) -> InProcessWorker:
        """A :data:`~modelkeeper.protocol.client.WorkerFactory` like ``WorkerProcess.start``: the
        worker's own arguments (budget, reserve, throttle; ``--warm`` is moot in-process)."""
        opts = parser().parse_args(["--device", device, *args])
        return cls(
            device, reserve_mb=opts.reserve_mb, budget_mb=opts.budget_mb, throttle_mb_s=opts.throttle_mb_s
        )

    def __exit__(self, *exc: object) -> None:
        self.stop()
