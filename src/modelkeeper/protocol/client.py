"""The caller's side of the protocol: send requests, match responses, receive events.

``WorkerConnection`` speaks over any pair of byte streams; ``WorkerProcess`` starts
``python -m modelkeeper.worker`` and speaks over its pipes. The in-process worker
(:class:`modelkeeper.worker.InProcessWorker`) is a ``WorkerConnection`` too, so a caller
cannot tell the two apart. Nothing here imports torch.
"""

from __future__ import annotations

import asyncio
import collections
import itertools
import logging
import os
import queue
import subprocess
import sys
import threading
from collections.abc import Callable, Sequence
from concurrent.futures import Future
from typing import IO, Any, Protocol

from modelkeeper.protocol.codec import encode, parse_message
from modelkeeper.protocol.commands import CommandType
from modelkeeper.protocol.errors import ErrorCode, ProtocolError
from modelkeeper.protocol.messages import ErrorResponse, Event, Response

log = logging.getLogger(__name__)

EventCallback = Callable[[Event], None]


class Worker(Protocol):
    """What drives one device's worker, whatever runs it: met by :class:`WorkerProcess` (a
    subprocess) and :class:`modelkeeper.worker.InProcessWorker` (a thread of this process). The
    orchestrator's worker slots take either."""

    hello: dict[str, Any]
    closed: threading.Event

    @property
    def pid(self) -> int: ...

    def submit(
        self, type: CommandType | str, data: dict[str, Any] | None = None, *, request_id: str | None = None
    ) -> Future[dict[str, Any]]: ...

    def on_event(self, callback: EventCallback) -> None: ...

    def alive(self) -> bool:
        """True until the worker has exited (or was killed)."""
        ...

    def wait(self) -> int | None:
        """Block until the worker has exited; its exit code (None where there is none)."""
        ...

    def kill(self) -> None:
        """End the worker at once, as a crash would: requests in flight fail with WORKER_DIED."""
        ...

    def stop(self, timeout: float = 30.0) -> int | None:
        """Ask the worker to shut down; end it if it does not in time."""
        ...

    def close(self) -> None: ...


WorkerFactory = Callable[[str, Sequence[str], float], Worker]
"""Starts the worker of a device: ``factory(device, extra_args, hello_timeout)``."""


class WorkerConnection:
    """Correlates requests and responses by ``request_id`` over a reader and a writer.

    ``submit`` returns a future of the response's ``data``; an error response raises
    :class:`ProtocolError` with its code. Events reach every subscriber queue and callback.
    When the reader reaches end of file, every pending request fails with WORKER_DIED.
    """

    def __init__(self, reader: IO[bytes], writer: IO[bytes], *, name: str = "worker") -> None:
        self.name = name
        self._reader = reader
        self._writer = writer
        self._write_lock = threading.Lock()
        self._pending: dict[str, Future[dict[str, Any]]] = {}
        self._pending_lock = threading.Lock()
        self._ids = itertools.count(1)
        self._subscribers: list[queue.Queue[Event]] = []
        self._callbacks: list[EventCallback] = []
        self.unmatched: queue.Queue[Response | ErrorResponse] = queue.Queue()
        self.closed = threading.Event()
        self._thread = threading.Thread(target=self._read_loop, name=f"{name}-reader", daemon=True)
        self._thread.start()

    # ------------------------------------------------------------------ requests

    def submit(
        self, type: CommandType | str, data: dict[str, Any] | None = None, *, request_id: str | None = None
    ) -> Future[dict[str, Any]]:
        rid = request_id or f"{self.name}-{next(self._ids)}"
        fut: Future[dict[str, Any]] = Future()
        with self._pending_lock:
            if self.closed.is_set():
                fut.set_exception(ProtocolError(f"{self.name} is closed", ErrorCode.WORKER_DIED))
                return fut
            if rid in self._pending:
                raise ValueError(f"request_id {rid!r} is already in flight")
            self._pending[rid] = fut
        try:
            self.send_line(encode({"type": str(type), "request_id": rid, "data": data or {}}))
        except OSError as exc:
            with self._pending_lock:
                self._pending.pop(rid, None)
            fut.set_exception(ProtocolError(f"cannot write to {self.name}: {exc}", ErrorCode.WORKER_DIED))
        return fut

    def call(
        self,
        type: CommandType | str,
        data: dict[str, Any] | None = None,
        *,
        timeout: float | None = 120.0,
        request_id: str | None = None,
    ) -> dict[str, Any]:
        """Send a request and wait for its data; raises ProtocolError on an error response or a timeout."""
        fut = self.submit(type, data, request_id=request_id)
        try:
            return fut.result(timeout)
        except TimeoutError:
            raise ProtocolError(
                f"no answer to {type} from {self.name} within {timeout} s", ErrorCode.TIMEOUT
            ) from None

    async def acall(
        self, type: CommandType | str, data: dict[str, Any] | None = None, *, timeout: float | None = 120.0
    ) -> dict[str, Any]:
        rid = f"{self.name}-{next(self._ids)}"
        fut = asyncio.wrap_future(self.submit(type, data, request_id=rid))
        try:
            return await asyncio.wait_for(fut, timeout)
        except TimeoutError:
            with self._pending_lock:
                self._pending.pop(rid, None)  # a late answer is then dropped, not delivered to a dead future
            raise ProtocolError(
                f"no answer to {type} from {self.name} within {timeout} s", ErrorCode.TIMEOUT
            ) from None

    def send_line(self, line: bytes) -> None:
        """Write raw bytes (one line). Tests use it to send malformed input."""
        with self._write_lock:
            self._writer.write(line)
            self._writer.flush()

    # ------------------------------------------------------------------ events

    def subscribe(self) -> queue.Queue[Event]:
        q: queue.Queue[Event] = queue.Queue()
        self._subscribers.append(q)
        return q

    def on_event(self, callback: EventCallback) -> None:
        self._callbacks.append(callback)

    # ------------------------------------------------------------------ reading

    def _read_loop(self) -> None:
        try:
            for raw in self._reader:
                line = raw.strip()
                if not line:
                    continue
                try:
                    msg = parse_message(line)
                except ValueError as exc:
                    log.error("%s wrote a line that is not a protocol message: %s", self.name, exc)
                    continue
                if isinstance(msg, Event):
                    self._dispatch_event(msg)
                    continue
                self._answered()
                with self._pending_lock:
                    fut = self._pending.pop(msg.request_id, None) if msg.request_id else None
                try:
                    self._deliver(fut, msg)
                except Exception:  # one bad delivery must not end the connection
                    log.exception("%s: cannot deliver an answer to %s", self.name, msg.request_id)
        except (OSError, ValueError) as exc:
            log.debug("%s reader stopped: %s", self.name, exc)
        finally:
            self._fail_pending(self._closed_reason())

    def _answered(self) -> None:
        """An answer was read: the worker was well up to here (a subprocess forgets its stderr so far)."""

    def _closed_reason(self) -> str:
        """Why pending requests fail once the output ends (a subprocess adds its last words)."""
        return f"{self.name} closed its output"

    def _deliver(self, fut: Future[dict[str, Any]] | None, msg: Response | ErrorResponse) -> None:
        if fut is None:
            self.unmatched.put(msg)
        elif fut.done():  # the caller gave up (cancelled or timed out)
            return
        elif isinstance(msg, Response):
            fut.set_result(msg.data)
        else:
            error = ProtocolError(msg.error, msg.error_code)
            error.details = dict(msg.data)
            fut.set_exception(error)

    def _dispatch_event(self, event: Event) -> None:
        for q in self._subscribers:
            q.put(event)
        for cb in self._callbacks:
            try:
                cb(event)
            except Exception:
                log.exception("event callback failed")

    def _fail_pending(self, why: str) -> None:
        with self._pending_lock:
            self.closed.set()
            pending, self._pending = self._pending, {}
        for fut in pending.values():
            if not fut.done():
                fut.set_exception(ProtocolError(why, ErrorCode.WORKER_DIED))

    def close(self) -> None:
        for stream in (self._writer, self._reader):
            try:
                stream.close()
            except OSError:
                pass


class StderrTail:
    """Reads a subprocess's stderr in a thread: passes every line on to this process's stderr
    (file descriptor 2, as an inherited stderr would) and keeps the last ``lines`` of it, so that
    an error about the process's death can say why it died (a traceback it printed).

    :meth:`forget` drops what is kept: the worker's connection calls it at every answer, so the
    tail holds only what the worker wrote since its last answer, never an old traceback of a
    request that was answered (and logged) long before the process died. A line still in the
    pipe when the answer is read may survive the forgetting; a line written after it always stays."""

    def __init__(self, stream: IO[bytes], *, name: str, lines: int = 20) -> None:
        self._stream = stream
        self._lines: collections.deque[str] = collections.deque(maxlen=lines)
        self._thread = threading.Thread(target=self._pump, name=f"{name}-stderr", daemon=True)
        self._thread.start()

    def _pump(self) -> None:
        try:
            for raw in self._stream:
                self._lines.append(raw.decode("utf-8", "replace").rstrip())
                try:
                    os.write(2, raw)
                except OSError:
                    pass
        except (OSError, ValueError):
            pass
        finally:
            self._stream.close()

    def forget(self) -> None:
        """Drop the lines kept so far (they are no clue to a death that comes later)."""
        self._lines.clear()

    def text(self, wait: float = 2.0) -> str:
        """The kept lines; waits up to ``wait`` s for the stream's end (the process exiting)."""
        self._thread.join(wait)
        return "\n".join(line for line in list(self._lines) if line)


class WorkerProcess(WorkerConnection):
    """A worker subprocess (``python -m modelkeeper.worker``) and the connection to it.

    The handshake runs in the constructor; its result is ``hello``. The worker runs in its own
    process group, so a Ctrl-C at the terminal reaches only the service, which stops its workers
    (no worker ``KeyboardInterrupt`` traceback). Unless ``stderr`` is given, the worker's stderr
    passes through to ours and its tail is kept: a worker that dies says why in the WORKER_DIED
    message (a CUDA device that does not exist, an import error...). A worker that cannot start
    raises WORKER_DIED "worker[DEVICE] did not start: REASON", the reason it gave when it gave one
    (``details``: ``reason``, ``exit_code``).
    """

    def __init__(
        self,
        device: str = "cpu",
        *,
        args: Sequence[str] = (),
        env: dict[str, str] | None = None,
        stderr: IO[bytes] | int | None = None,
        python: str = sys.executable,
        hello_timeout: float = 120.0,
    ) -> None:
        cmd = [python, "-m", "modelkeeper.worker", "--device", device, *args]
        self.process = subprocess.Popen(
            cmd,
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE if stderr is None else stderr,
            env={**os.environ, **(env or {})},
            process_group=0,
        )
        assert self.process.stdin is not None and self.process.stdout is not None
        self._stderr_tail = (
            StderrTail(self.process.stderr, name=f"worker[{device}]")
            if stderr is None and self.process.stderr
            else None
        )
        super().__init__(self.process.stdout, self.process.stdin, name=f"worker[{device}]")
        try:
            self.hello = self.call(CommandType.WORKER_HELLO, {"client": "modelkeeper"}, timeout=hello_timeout)
        except ProtocolError as exc:
            self.kill()
            raise self._start_failure(exc) from None

    def _start_failure(self, exc: ProtocolError) -> ProtocolError:
        """Why the handshake failed, as one WORKER_DIED error: the reason the worker gave (the
        error response with no ``request_id`` a worker writes when it cannot start), else what the
        handshake saw (its stderr's tail); ``details`` carry ``reason`` and ``exit_code``."""
        said = None
        while not self.unmatched.empty():
            msg = self.unmatched.get_nowait()
            if isinstance(msg, ErrorResponse) and msg.request_id is None:
                said = msg
        code = self.process.returncode
        if said is not None:
            reason = said.error
        elif exc.code is ErrorCode.TIMEOUT:
            reason = f"no answer to the handshake within {exc.message.rsplit('within ', 1)[-1]}: killed"
        else:
            reason = exc.message
        exited = f" (exit code {code})" if code is not None and code > 0 else ""
        return ProtocolError(
            f"{self.name} did not start: {reason}{exited}",
            ErrorCode.WORKER_DIED,
            reason=reason,
            exit_code=code,
        )

    def _answered(self) -> None:
        stderr: StderrTail | None = getattr(self, "_stderr_tail", None)
        if stderr is not None:
            stderr.forget()

    def _closed_reason(self) -> str:
        reason = super()._closed_reason()
        stderr: StderrTail | None = getattr(self, "_stderr_tail", None)  # None before it is set
        tail = stderr.text() if stderr is not None else ""
        return f"{reason}; its stderr ended with:\n{tail}" if tail else reason

    def last_words(self, lines: int = 3) -> str:
        """The last ``lines`` lines the worker wrote to stderr since its last answer (why it
        died), once it has exited; empty when it wrote nothing since."""
        stderr: StderrTail | None = getattr(self, "_stderr_tail", None)
        return " | ".join((stderr.text() if stderr is not None else "").splitlines()[-lines:])

    @property
    def pid(self) -> int:
        return self.process.pid

    def alive(self) -> bool:
        return self.process.poll() is None

    def wait(self) -> int | None:
        return self.process.wait()

    def stop(self, timeout: float = 30.0) -> int:
        """Ask the worker to shut down; kill it if it does not exit in time. Returns the exit code."""
        if self.process.poll() is None:
            try:
                self.call(CommandType.WORKER_SHUTDOWN, timeout=timeout)
            except ProtocolError:
                pass
            try:
                self.process.wait(timeout)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()
        self.close()
        return self.process.returncode

    def kill(self) -> None:
        self.process.kill()
        self.process.wait()
        self.close()

    def __enter__(self) -> WorkerProcess:
        return self

    @classmethod
    def start(cls, device: str, args: Sequence[str], hello_timeout: float) -> WorkerProcess:
        """The default :data:`WorkerFactory`: ``python -m modelkeeper.worker --device DEVICE ARGS``."""
        return cls(device, args=args, hello_timeout=hello_timeout)

    def __exit__(self, *exc: object) -> None:
        self.stop()
