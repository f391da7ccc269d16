"""One worker per device, its operation queue, and its restarts.

A :class:`WorkerSlot` owns the worker of one device (a subprocess by default; any
:class:`~modelkeeper.protocol.client.Worker`, the in-process one included, through ``factory``). Operations that change the device (loads,
unloads, validation, benchmarks...) run one at a time from a priority queue, each with a deadline
that covers its wait in the queue; status queries go straight to the worker, which answers them
during a load. When the process exits without being asked to, the slot calls ``on_exit`` and the
service restarts it (:meth:`restart`) and reconciles its view.
"""

from __future__ import annotations

import asyncio
import builtins
import contextlib
import itertools
import logging
import signal
import subprocess
import sys
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from enum import IntEnum, StrEnum
from typing import Any, TypeVar

from pydantic import BaseModel, ValidationError

from modelkeeper.orchestrator.errors import DeviceNotReady
from modelkeeper.protocol.client import Worker, WorkerFactory, WorkerProcess
from modelkeeper.protocol.commands import CommandType
from modelkeeper.protocol.errors import ErrorCode, ProtocolError
from modelkeeper.protocol.messages import Event, EventType, HelloResult, MemoryInfo, StatusResult

log = logging.getLogger(__name__)
T = TypeVar("T")
R = TypeVar("R", bound=BaseModel)


class Priority(IntEnum):
    """Order of queued operations on one device: higher runs first."""

    LOW = 0
    NORMAL = 1
    HIGH = 2
    CRITICAL = 3


class SlotState(StrEnum):
    STARTING = "starting"
    READY = "ready"
    RESTARTING = "restarting"
    FAILED = "failed"
    STOPPED = "stopped"


def cuda_device_count(python: str = sys.executable) -> int:
    """CUDA devices visible to a worker, asked of a short subprocess (the service never imports torch)."""
    code = "import torch; print(torch.cuda.device_count() if torch.cuda.is_available() else 0)"
    try:
        out = subprocess.run([python, "-c", code], capture_output=True, text=True, timeout=120, check=True)
        return int(out.stdout.strip().splitlines()[-1])
    except (subprocess.SubprocessError, ValueError, IndexError, OSError):
        return 0


def expand_devices(devices: list[str]) -> list[tuple[str, str]]:
    """(slot id, worker --device) per worker: 'auto' is every CUDA device, else the CPU; a device
    named twice gets ids with an index (``cpu:0``, ``cpu:1``)."""
    names: list[str] = []
    for d in devices:
        if d == "auto":
            n = cuda_device_count()
            names.extend([f"cuda:{i}" for i in range(n)] or ["cpu"])
        elif d == "cuda":
            names.append("cuda:0")
        else:
            names.append(d)
    out: list[tuple[str, str]] = []
    for i, name in enumerate(names):
        if names.count(name) > 1:
            out.append(
                (
                    f"{name}:{names[:i].count(name)}"
                    if ":" not in name
                    else f"{name}.{names[:i].count(name)}",
                    name,
                )
            )
        else:
            out.append((name, name))
    return out


def exit_words(code: int | None) -> str:
    """How a process ended, from its exit code: ``exited with code 1``, or for a negative code
    (Popen's way of saying a signal ended it) ``was killed by signal 9 (SIGKILL)``."""
    if code is None or code >= 0:
        return f"exited with code {code}"
    try:
        name = f" ({signal.Signals(-code).name})"
    except ValueError:
        name = ""
    return f"was killed by signal {-code}{name}"


@dataclass(order=True)
class _Item:
    sort_key: tuple[int, int]
    run: Callable[[], Awaitable[Any]] = field(compare=False)
    future: asyncio.Future[Any] = field(compare=False)
    deadline: float = field(compare=False)
    label: str = field(compare=False)
    finished: asyncio.Event = field(compare=False, default_factory=asyncio.Event)


class WorkerSlot:
    """The worker of one device; see the module docstring."""

    def __init__(
        self,
        slot_id: str,
        device: str,
        *,
        args: list[str],
        start_timeout: float,
        ping_timeout: float = 10.0,
        cancel_wait_s: float = 60.0,
        factory: WorkerFactory = WorkerProcess.start,
        on_event: Callable[[WorkerSlot, Event], None] | None = None,
        on_exit: Callable[[WorkerSlot, int | None], None] | None = None,
    ) -> None:
        self.id = slot_id
        self.device = device
        self.args = args
        self.start_timeout = start_timeout
        self.ping_timeout = ping_timeout
        self.cancel_wait_s = cancel_wait_s  # how long a cancelled request waits for the worker to stop
        self.factory = factory
        self.on_event: Callable[[WorkerSlot, Event], None] = on_event or (lambda slot, event: None)
        self.on_exit: Callable[[WorkerSlot, int | None], None] = on_exit or (lambda slot, code: None)
        self.proc: Worker | None = None
        self.state = SlotState.STARTING
        self.hello: HelloResult | None = None
        self.memory: MemoryInfo | None = None
        self.restarts: list[float] = []
        self.last_error: str | None = None
        self.started_at: float | None = None
        self.running: _Item | None = None
        self._queue: asyncio.PriorityQueue[_Item] = asyncio.PriorityQueue()
        self._seq = itertools.count()
        self._runner: asyncio.Task[None] | None = None
        self._monitor: asyncio.Task[None] | None = None
        self._ids = itertools.count(1)
        self._stopping = False
        self._progress: dict[str, Callable[[dict[str, Any]], None]] = {}  # request id -> its listener

    # ------------------------------------------------------------------ lifecycle

    async def start(self) -> None:
        self.state = SlotState.STARTING
        proc = await asyncio.to_thread(self.factory, self.device, self.args, self.start_timeout)
        loop = asyncio.get_running_loop()

        def forward(ev: Event) -> None:
            loop.call_soon_threadsafe(self._event, ev)

        proc.on_event(forward)
        self.proc = proc
        self.hello = HelloResult.model_validate(proc.hello)
        self.memory = self.hello.memory
        self.started_at = time.time()
        self.state = SlotState.READY
        self.last_error = None
        self._monitor = loop.create_task(self._watch(proc), name=f"watch {self.id}")
        if self._runner is None or self._runner.done():
            self._runner = loop.create_task(self._run_queue(), name=f"queue {self.id}")

    async def _watch(self, proc: Worker) -> None:
        code = await asyncio.to_thread(proc.wait)
        proc.close()
        if not self._stopping and self.proc is proc:
            said = proc.last_words() if isinstance(proc, WorkerProcess) else ""
            self.last_error = f"worker process {proc.pid} {exit_words(code)}" + (f": {said}" if said else "")
            self.on_exit(self, code)

    async def restart(self) -> None:
        old = self.proc
        self.proc = None
        self.state = SlotState.RESTARTING
        self.restarts.append(time.time())
        if old is not None and old.alive():
            await asyncio.to_thread(old.kill)
        await self.start()

    def kill(self) -> None:
        """Kill the worker (a hung one); the watcher then reports its exit."""
        if self.proc is not None and self.proc.alive():
            self.proc.kill()

    async def stop(self) -> None:
        self._stopping = True
        self.state = SlotState.STOPPED
        if self._runner is not None:
            self._runner.cancel()
        while not self._queue.empty():
            item = self._queue.get_nowait()
            if not item.future.done():
                item.future.set_exception(ProtocolError("the service is stopping", ErrorCode.BUSY))
        if self.proc is not None:
            await asyncio.to_thread(self.proc.stop, 10.0)
        if self._monitor is not None:
            self._monitor.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._monitor

    def check_usable(self) -> None:
        """DeviceNotReady, saying why, when this device has no worker and will not get one
        (it did not start, or recovery gave up); a starting or restarting worker is waited for."""
        if self.state in (SlotState.FAILED, SlotState.STOPPED):
            why = f": {self.last_error}" if self.last_error else ""
            raise DeviceNotReady(f"device {self.id} has no worker ({self.state.value}){why}", device=self.id)

    # ------------------------------------------------------------------ calls

    def _connection(self) -> Worker:
        if self.proc is None or self.state is not SlotState.READY:
            raise ProtocolError(
                f"worker {self.id} is {self.state.value}"
                + (f": {self.last_error}" if self.last_error else ""),
                ErrorCode.WORKER_DIED,
                device=self.id,
            )
        return self.proc

    async def call(
        self,
        type: CommandType,
        data: BaseModel | None,
        result: builtins.type[R],
        *,
        timeout: float | None = 60.0,
        on_progress: Callable[[dict[str, Any]], None] | None = None,
    ) -> R:
        """One request to the worker, its answer read as ``result``; its progress events go to
        ``on_progress`` while it runs. On a timeout the worker is told to cancel it and pinged; a
        worker that does not answer the ping is killed (and restarted by the service).

        A caller cancelled (a job's cancel) tells the worker to cancel the request and waits for its
        answer (it stops at its next step: a benchmark pass, a validation check, a load's chunk), up
        to ``cancel_wait_s``: the job ends, and this device's next operation starts, once the worker
        has stopped, not while it still computes."""
        proc = self._connection()
        rid = f"{self.id}-{next(self._ids)}"
        if on_progress is not None:
            self._progress[rid] = on_progress
        payload = None if data is None else data.model_dump(mode="json", exclude_none=True)
        fut = asyncio.wrap_future(proc.submit(type, payload, request_id=rid))
        try:
            answer = await asyncio.wait_for(asyncio.shield(fut), timeout)
            try:
                return result.model_validate(answer)
            except ValidationError as exc:
                raise ProtocolError(
                    f"{type} on {self.id}: the worker's answer does not match {result.__name__}: {exc}",
                    ErrorCode.INTERNAL,
                    device=self.id,
                ) from None
        except TimeoutError:
            await self._after_timeout(proc, rid)
            raise ProtocolError(
                f"{type} on {self.id} ran past its time limit of {timeout:.1f} s",
                ErrorCode.TIMEOUT,
                device=self.id,
            ) from None
        except asyncio.CancelledError:
            self.cancel_request(rid)
            await self._stopped(fut, f"{type} {rid}")
            raise
        finally:
            self._progress.pop(rid, None)
            fut.cancel()  # still pending (a timeout, a worker slow to stop): its late answer is dropped

    async def _stopped(self, fut: asyncio.Future[dict[str, Any]], what: str) -> None:
        """Wait (up to ``cancel_wait_s``) for the answer to a request the worker was told to cancel:
        its CANCELLED error, or its result when it had just finished."""
        done, _ = await asyncio.wait({fut}, timeout=self.cancel_wait_s)
        if fut in done:
            fut.exception() if not fut.cancelled() else None  # retrieved: the answer was the point
        else:
            log.warning(
                "%s on %s was cancelled but the worker has not stopped after %.0f s; it will at its next step",
                what, self.id, self.cancel_wait_s,
            )  # fmt: skip

    def _event(self, event: Event) -> None:
        """A worker event, on the loop: progress to its request's listener, the rest to the service."""
        listener = self._progress.get(event.request_id or "") if event.event is EventType.PROGRESS else None
        if listener is not None:
            listener(dict(event.data))
        else:
            self.on_event(self, event)

    def cancel_request(self, rid: str) -> None:
        proc = self.proc
        if proc is not None and not proc.closed.is_set():
            proc.submit(CommandType.CONTROL_CANCEL, {"target_request_id": rid})

    async def _after_timeout(self, proc: Worker, rid: str) -> None:
        self.cancel_request(rid)
        try:
            await asyncio.wait_for(
                asyncio.wrap_future(proc.submit(CommandType.GET_STATUS)), self.ping_timeout
            )
        except (TimeoutError, ProtocolError):
            self.last_error = f"worker did not answer a status query within {self.ping_timeout} s: killed"
            self.kill()

    async def status(self, timeout: float = 10.0) -> StatusResult:
        result = await self.call(CommandType.GET_STATUS, None, StatusResult, timeout=timeout)
        self.memory = result.memory
        return result

    @property
    def budget_bytes(self) -> int:
        return self.memory.budget_bytes if self.memory is not None else 0

    @property
    def used_bytes(self) -> int:
        return self.memory.models_bytes if self.memory is not None else 0

    # ------------------------------------------------------------------ the operation queue

    async def run(self, run: Callable[[], Awaitable[T]], *, priority: int, deadline: float, label: str) -> T:
        """Queue ``run`` on this device; it starts when every higher-priority (and earlier equal)
        operation is done. Raises TIMEOUT if the deadline passes first, DeviceNotReady at once when
        the device has no worker (its queue would never run)."""
        self.check_usable()
        fut: asyncio.Future[Any] = asyncio.get_running_loop().create_future()
        item = _Item((-priority, next(self._seq)), run, fut, deadline, label)
        self._queue.put_nowait(item)
        try:
            return await asyncio.wait_for(asyncio.shield(fut), max(0.0, deadline - time.monotonic()) + 1.0)
        except asyncio.CancelledError:
            fut.cancel()  # the caller was cancelled: a queued item is skipped, a running one stopped
            if self.running is item:  # wait for the worker to stop and the clean-up (a load rolls back)
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(asyncio.shield(item.finished.wait()), self.cancel_wait_s + 60)
            raise
        except TimeoutError:
            if not fut.done():
                fut.cancel()  # still queued: the runner skips it
            raise ProtocolError(
                f"{label} on {self.id} waited past its time limit", ErrorCode.TIMEOUT, device=self.id
            ) from None

    @property
    def queue_depth(self) -> int:
        return self._queue.qsize()

    async def _run_queue(self) -> None:
        while True:
            item = await self._queue.get()
            if item.future.done():
                continue
            if time.monotonic() >= item.deadline:
                item.future.set_exception(
                    ProtocolError(f"{item.label} on {self.id} timed out in the queue", ErrorCode.TIMEOUT)
                )
                continue
            self.running = item
            task = asyncio.ensure_future(item.run())
            try:
                done, _ = await asyncio.wait({task, item.future}, return_when=asyncio.FIRST_COMPLETED)
                if task in done:
                    if not item.future.done():
                        if task.cancelled():
                            item.future.cancel()
                        elif task.exception() is not None:
                            item.future.set_exception(task.exception())  # type: ignore[arg-type]
                        else:
                            item.future.set_result(task.result())
                    else:
                        task.exception() if not task.cancelled() else None
                else:  # the caller gave up: stop the operation
                    task.cancel()
                    with contextlib.suppress(BaseException):
                        await task
            finally:
                self.running = None
                item.finished.set()

    def info(self) -> dict[str, Any]:
        proc = self.proc
        return {
            "id": self.id,
            "device": self.device,
            "state": self.state.value,
            "pid": proc.pid if proc is not None else None,
            "name": self.hello.device.name if self.hello is not None else None,
            "memory": self.memory.model_dump(mode="json") if self.memory is not None else {},
            "restarts": len(self.restarts),
            "last_error": self.last_error,
            "started_at": self.started_at,
            "queued": self.queue_depth,
            "running": self.running.label if self.running is not None else None,
        }
