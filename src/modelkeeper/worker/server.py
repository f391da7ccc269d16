"""The protocol server of a worker: reads requests, routes them, writes responses and events.

This is the seed's ModelInstructor. The reader never blocks on device work: queries
(hello, info, status, cancel, shutdown) are answered on the reader's thread at once; device
work (loads, unloads, memory optimisation, cleanup) goes to a queue served by one device
thread, so it is serialised per device. Every failure becomes an error response; the worker
keeps serving.
"""

from __future__ import annotations

import gc
import logging
import threading
import time
from collections import deque
from collections.abc import Callable, Iterable
from typing import Any, Literal

import torch
from pydantic import BaseModel, ConfigDict

from modelkeeper.protocol.codec import (
    command_of,
    encode,
    make_error,
    make_event,
    parse_request,
    validate_data,
)
from modelkeeper.protocol.commands import IMMEDIATE_COMMANDS, CommandType
from modelkeeper.protocol.errors import ErrorCode, ProtocolError
from modelkeeper.protocol.messages import (
    CancelRequest,
    CancelResult,
    EventType,
    LoadRequest,
    ModelInfoRequest,
    Response,
    RunningOperation,
    ShutdownResult,
    StatusResult,
)
from modelkeeper.worker.errors import Busy, Cancelled, InsufficientMemory, InvalidRequest
from modelkeeper.worker.records import Operation
from modelkeeper.worker.service import CAPABILITIES, ModelService
from modelkeeper.worker.sources import normalise_kind

log = logging.getLogger("modelkeeper.worker")

#: Idle work (building skeletons ahead of need) waits for this long without a request.
IDLE_WORK_AFTER_S = 0.5

Handler = Callable[[ModelService, Any, Operation], BaseModel]

KIND_OF_COMMAND = {
    CommandType.LOAD_UNET: "unet",
    CommandType.LOAD_VAE: "vae",
    CommandType.LOAD_ENCODER: "text_encoder",
    CommandType.LOAD_TOKENIZER: "tokenizer",
}


def _load(command: CommandType) -> Handler:
    implied = KIND_OF_COMMAND.get(command)

    def handler(service: ModelService, data: LoadRequest, op: Operation) -> BaseModel:
        kind = normalise_kind(data.type, None if implied is None else normalise_kind(implied, None))
        if implied is not None and data.type is not None and kind.value != implied:
            raise InvalidRequest(f"data.type: {command} loads {implied}, not {data.type}")
        return service.load(data, kind, op)

    return handler


DEVICE_HANDLERS: dict[CommandType, Handler] = {
    CommandType.LOAD_MODEL: _load(CommandType.LOAD_MODEL),
    CommandType.LOAD_UNET: _load(CommandType.LOAD_UNET),
    CommandType.LOAD_VAE: _load(CommandType.LOAD_VAE),
    CommandType.LOAD_ENCODER: _load(CommandType.LOAD_ENCODER),
    CommandType.LOAD_TOKENIZER: _load(CommandType.LOAD_TOKENIZER),
    CommandType.UNLOAD_MODEL: lambda s, d, op: s.unload(d.name, op),
    CommandType.OPTIMIZE_MEMORY: lambda s, d, op: s.optimize_memory(d, op),
    CommandType.CLEANUP: lambda s, d, op: s.cleanup(op),
    CommandType.RELEASE_SEGMENTS: lambda s, d, op: s.release_segments(d.paths),
    CommandType.LOAD_LORA: lambda s, d, op: Result.model_validate(s.load_lora(d, op)),
    CommandType.SET_LORA_STRENGTH: lambda s, d, op: Result.model_validate(
        s.loras.set_strength(d.name, d.strength, d.role_strength)
    ),
    CommandType.UNLOAD_LORA: lambda s, d, op: Result.model_validate(s.loras.remove(d.name)),
    CommandType.VALIDATE_MODEL: lambda s, d, op: Result.model_validate(s.validate_model(d, op)),
    CommandType.BENCHMARK_MODEL: lambda s, d, op: Result.model_validate(s.benchmark_model(d, op)),
    CommandType.OPTIMIZE_MODEL: lambda s, d, op: Result.model_validate(s.optimize_model(d, op)),
    CommandType.GET_MODEL_INFO: lambda s, d, op: s.fingerprints(d.name),
}


class Result(BaseModel):
    """A result whose fields the handler's report defines (see docs/PROTOCOL.md)."""

    model_config = ConfigDict(extra="allow")


class WorkerServer:
    """Serves one :class:`ModelService` over lines in and lines out."""

    def __init__(self, service: ModelService, write: Callable[[bytes], None]) -> None:
        self.service = service
        self._write_raw = write
        self._write_lock = threading.Lock()
        self._queue: deque[tuple[Operation, CommandType, BaseModel]] = deque()
        self._cond = threading.Condition()
        self._running: Operation | None = None
        self._known_ids: set[str] = set()
        self.stopping = threading.Event()
        self._draining = False
        self._device_thread = threading.Thread(target=self._device_loop, name="device", daemon=True)
        self._device_thread.start()

    # ------------------------------------------------------------------ output

    def write(self, message: BaseModel) -> None:
        data = encode(message)
        with self._write_lock:
            try:
                self._write_raw(data)
            except (BrokenPipeError, ValueError, OSError):
                log.warning("output closed; dropping a message")

    def emit(self, event: EventType, request_id: str | None, data: dict[str, Any]) -> None:
        self.write(make_event(event, request_id, data))

    def _respond(self, request_id: str | None, result: BaseModel) -> None:
        self.write(Response(data=result.model_dump(mode="json"), request_id=request_id))

    def _fail(self, request_id: str | None, exc: ProtocolError) -> None:
        self.write(make_error(exc, request_id))

    # ------------------------------------------------------------------ input

    def serve(self, lines: Iterable[bytes]) -> None:
        """Handle lines until end of input or ``worker.shutdown``.

        At end of input the queued work is finished first (so piped requests all complete);
        ``worker.shutdown`` cancels what is queued or running."""
        for line in lines:
            if line.strip():
                self.handle_line(line)
            if self.stopping.is_set():
                break
        if not self.stopping.is_set():
            self.drain()
        self.stop()

    def drain(self) -> None:
        """Let the device thread finish everything queued, then stop it."""
        with self._cond:
            self._draining = True
            self._cond.notify_all()
        self._device_thread.join()

    def handle_line(self, line: bytes) -> None:
        request_id: str | None = None
        try:
            request = parse_request(line)
            request_id = request.request_id
            command = command_of(request)
            if command not in CAPABILITIES:
                raise ProtocolError(
                    f"{command} is not implemented by this worker (it serves: {', '.join(sorted(CAPABILITIES))})",
                    ErrorCode.UNKNOWN_COMMAND,
                )
            data = validate_data(command, request.data)
            heavy_info = isinstance(data, ModelInfoRequest) and data.fingerprint
            if command in IMMEDIATE_COMMANDS and not heavy_info:
                self._respond(request_id, self._immediate(command, data, request_id))
                return
            if self.stopping.is_set():
                raise Busy("the worker is shutting down")
            self._enqueue(request_id, command, data)
        except ProtocolError as exc:
            rid = request_id if request_id is not None else exc.details.pop("request_id", None)
            self._fail(rid, exc)
        except Exception as exc:  # a bug must not kill the reader
            log.exception("failed to handle a request")
            self._fail(request_id, ProtocolError(f"{type(exc).__name__}: {exc}", ErrorCode.INTERNAL))

    def _enqueue(self, request_id: str, command: CommandType, data: BaseModel) -> None:
        with self._cond:
            if request_id in self._known_ids:
                raise InvalidRequest(f"request.request_id: {request_id!r} is already queued or running")
            name = getattr(data, "name", None)
            op = Operation(request_id, command.value, name if isinstance(name, str) else None, emit=self.emit)
            self._known_ids.add(request_id)
            self._queue.append((op, command, data))
            self._cond.notify()

    # ------------------------------------------------------------------ immediate commands

    def _immediate(self, command: CommandType, data: BaseModel, request_id: str) -> BaseModel:
        if command is CommandType.WORKER_HELLO:
            return self.service.hello()
        if command is CommandType.GET_MODEL_INFO:
            assert isinstance(data, ModelInfoRequest)
            return self.service.model_info(data.name)
        if command is CommandType.GET_STATUS:
            return self.status()
        if command is CommandType.CONTROL_CANCEL:
            assert isinstance(data, CancelRequest)
            return self.cancel(data.target_request_id)
        if command is CommandType.WORKER_SHUTDOWN:
            self.begin_shutdown()
            return ShutdownResult(stopping=True)
        raise ProtocolError(f"{command} is not an immediate command", ErrorCode.INTERNAL)

    def status(self) -> StatusResult:
        with self._cond:
            running = self._running
            queued = len(self._queue)
        state: Literal["idle", "busy", "stopping"] = "idle"
        if self.stopping.is_set():
            state = "stopping"
        elif running is not None:
            state = "busy"
        current = None
        if running is not None:
            current = RunningOperation(
                request_id=running.request_id,
                type=running.type,
                name=running.name,
                started_at=running.started_at,
                progress=dict(running.progress),
            )
        return StatusResult(
            state=state,
            device=self.service.memory.info(),
            running=current,
            queued=queued,
            model_count=self.service.model_count(),
            memory=self.service.memory_info(),
            uptime_seconds=round(time.time() - self.service.started_at, 3),
        )

    def cancel(self, target: str) -> CancelResult:
        with self._cond:
            for item in list(self._queue):
                if item[0].request_id == target:
                    self._queue.remove(item)
                    self._known_ids.discard(target)
                    self._fail(target, Cancelled(f"request {target} was cancelled before it started"))
                    return CancelResult(target_request_id=target, found=True, state="queued")
            if self._running is not None and self._running.request_id == target:
                self._running.cancelled.set()
                return CancelResult(target_request_id=target, found=True, state="running")
        return CancelResult(target_request_id=target, found=False, state="unknown")

    def begin_shutdown(self) -> None:
        with self._cond:
            self.stopping.set()
            queued = list(self._queue)
            self._queue.clear()
            if self._running is not None:
                self._running.cancelled.set()
            self._cond.notify_all()
        for op, _, _ in queued:
            self._fail(
                op.request_id,
                Cancelled(f"request {op.request_id} was cancelled: the worker is shutting down"),
            )

    def stop(self, timeout: float | None = None) -> None:
        """Cancel what is queued or running and, once the device thread has ended, close the service
        (its models dropped, its segments unregistered and unmapped)."""
        self.begin_shutdown()
        self._device_thread.join(timeout)
        if not self._device_thread.is_alive():
            self.service.close()

    # ------------------------------------------------------------------ device thread

    def _device_loop(self) -> None:
        while True:
            with self._cond:
                while not self._queue and not self.stopping.is_set() and not self._draining:
                    if not self.service.has_idle_work():
                        self._cond.wait()
                    elif not self._cond.wait(IDLE_WORK_AFTER_S) and not self._queue:
                        try:
                            self.service.idle_work()
                        except Exception:  # the device thread must survive anything
                            log.exception("idle work failed")
                if not self._queue:
                    return
                op, command, data = self._queue.popleft()
                self._running = op
            reply = self._run(op, command, data)
            # The operation ends before its answer leaves, so a status read after the answer sees it done.
            with self._cond:
                self._running = None
                self._known_ids.discard(op.request_id)
            try:
                self.write(reply)
            except Exception:  # the device thread must survive anything
                log.exception("failed to answer %s", op.request_id)

    def _run(self, op: Operation, command: CommandType, data: BaseModel) -> BaseModel:
        """Run one device operation; every failure becomes an error response."""
        out_of_memory: ProtocolError | None = None
        try:
            result = DEVICE_HANDLERS[command](self.service, data, op)
            return Response(data=result.model_dump(mode="json"), request_id=op.request_id)
        except ProtocolError as exc:
            return make_error(exc, op.request_id)
        except (torch.cuda.OutOfMemoryError, MemoryError) as exc:
            out_of_memory = InsufficientMemory(
                f"{command} of {op.name!r} ran out of memory on {self.service.device}: {exc}"
            )
        except Exception as exc:
            log.exception("%s failed", command)
            return make_error(
                ProtocolError(f"{type(exc).__name__}: {exc}", ErrorCode.INTERNAL), op.request_id
            )
        # Outside the except block the failed load's frames (and their tensors) are gone: now free them.
        gc.collect()
        self.service.memory.release_caches()
        return make_error(out_of_memory, op.request_id)
