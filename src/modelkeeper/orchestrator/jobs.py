"""Jobs: long operations (scan, hash, cache, load, validate, benchmark...) run in the background,
with progress, cancel and an event per change.

A job runs one coroutine. It reports progress with ``job.progress(done=..., total=...)``; a
``cancel`` cancels the coroutine (a worker operation in flight is told to stop through the hook
the coroutine registers with ``job.on_cancel``). Finished jobs are kept, newest first, up to a bound.
"""

from __future__ import annotations

import asyncio
import builtins
import itertools
import logging
import secrets
import time
from collections import OrderedDict
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from enum import StrEnum
from typing import Any

from modelkeeper.orchestrator.errors import JobNotFound, ServiceNotReady
from modelkeeper.orchestrator.events import EventBus
from modelkeeper.protocol.errors import ErrorCode, ProtocolError

_seq = itertools.count(1)
log = logging.getLogger(__name__)


#: The progress keys that count one step's work (a worker's read, a cache copy): a step's own.
STEP_COUNTS = ("stage", "done", "total", "unit", "cache_bytes_done", "cache_bytes_total")


class JobState(StrEnum):
    QUEUED = "queued"
    RUNNING = "running"
    SUCCEEDED = "succeeded"
    FAILED = "failed"
    CANCELLED = "cancelled"

    @property
    def finished(self) -> bool:
        return self in (JobState.SUCCEEDED, JobState.FAILED, JobState.CANCELLED)


@dataclass
class Job:
    kind: str
    params: dict[str, Any]
    bus: EventBus
    id: str = field(default_factory=lambda: f"j-{next(_seq)}-{secrets.token_hex(3)}")
    state: JobState = JobState.QUEUED
    created_at: float = field(default_factory=time.time)
    started_at: float | None = None
    finished_at: float | None = None
    progress_data: dict[str, Any] = field(default_factory=dict)
    result: Any = None
    error: dict[str, Any] | None = None
    task: asyncio.Task[Any] | None = None
    exception: ProtocolError | None = None
    _cancel_hooks: list[Callable[[], None]] = field(default_factory=list)
    _last_progress: float = 0.0
    _moved: Callable[[JobState, JobState], None] | None = field(default=None, repr=False)  # the counts

    def info(self) -> dict[str, Any]:
        return {
            "id": self.id,
            "kind": self.kind,
            "state": self.state.value,
            "params": self.params,
            "progress": self.progress_data,
            "result": self.result,
            "error": self.error,
            "created_at": self.created_at,
            "started_at": self.started_at,
            "finished_at": self.finished_at,
        }

    def progress(self, *, force: bool = False, **values: Any) -> None:
        """Update progress (``done``, ``total``, ``unit``, ``message``...); events at most 20 a second."""
        self.progress_data.update(values)
        now = time.monotonic()
        if force or now - self._last_progress >= 0.05:
            self._last_progress = now
            self.bus.publish("job.progress", job=self.id, kind=self.kind, progress=dict(self.progress_data))

    def step(self, name: str, **values: Any) -> None:
        """Progress moves on to step ``name`` (a component): the previous step's counts are dropped,
        so that none is reported under this one; ``values``: this step's own."""
        for key in STEP_COUNTS:
            self.progress_data.pop(key, None)
        self.progress(step=name, force=True, **values)

    def progress_of(self, name: str) -> Callable[[dict[str, Any]], None]:
        """A listener of a worker's progress events for step ``name``: each reported under it."""
        return lambda data: self.progress(**{**data, "step": name})

    def start(self) -> None:
        """Its work begins (a job that waits in a device's queue: its worker command starts): running."""
        if self.state is JobState.QUEUED:
            self._set(JobState.RUNNING)

    def on_cancel(self, hook: Callable[[], None]) -> None:
        self._cancel_hooks.append(hook)

    def _set(self, state: JobState) -> None:
        old, self.state = self.state, state
        if self._moved is not None and old is not state:
            self._moved(old, state)
        now = time.time()
        if state is JobState.RUNNING:
            self.started_at = now
        if state.finished:
            self.finished_at = now
        self.bus.publish(f"job.{state.value}", job=self.id, kind=self.kind, info=self.info())


class JobManager:
    def __init__(
        self, bus: EventBus, *, keep: int = 1000, accepting: Callable[[], bool] = lambda: True
    ) -> None:
        self.bus = bus
        self.keep = keep
        self.accepting = accepting  # False while the service starts or stops: run() refuses
        self._jobs: OrderedDict[str, Job] = OrderedDict()
        self._counts = dict.fromkeys(JobState, 0)  # kept jobs by state, kept as they move: the
        # status snapshot reads them after every event, and a count over 1,000 jobs cost 0.2 ms

    async def run(
        self,
        kind: str,
        params: dict[str, Any],
        body: Callable[[Job], Awaitable[Any]],
        *,
        wait: bool,
        timeout: float | None = None,
        queued: bool = False,
    ) -> dict[str, Any]:
        """Run ``body`` as a job: ``{"job", "result"}`` when ``wait`` (errors raised), else
        ``{"job"}`` at once. ``timeout`` is a backstop: the operation's own deadline fires first
        (and says where it was). ``queued``: the job stays queued until ``body`` calls
        :meth:`Job.start` (work that waits in a device's queue)."""
        if not self.accepting():
            raise ServiceNotReady("the service is starting or stopping")
        job = self.submit(kind, body, params, queued=queued)
        if not wait:
            return {"job": job.info()}
        try:
            result = await self.wait(job, None if timeout is None else timeout + 2.0)
        except TimeoutError:
            self.cancel(job.id)
            raise ProtocolError(
                f"{kind} ran past its time limit of {timeout} s", ErrorCode.TIMEOUT, job=job.id
            ) from None
        return {"job": job.info(), "result": result}

    def submit(
        self,
        kind: str,
        run: Callable[[Job], Awaitable[Any]],
        params: dict[str, Any] | None = None,
        *,
        queued: bool = False,
    ) -> Job:
        """Start ``run(job)`` as a job; its return value becomes the job's result (``queued``: see
        :meth:`run`)."""
        job = Job(kind, dict(params or {}), self.bus, _moved=self._moved)
        self._jobs[job.id] = job
        self._counts[job.state] += 1
        job._set(JobState.QUEUED)
        job.task = asyncio.get_running_loop().create_task(self._run(job, run, queued), name=f"job {job.id}")
        self._trim()
        return job

    async def _run(self, job: Job, run: Callable[[Job], Awaitable[Any]], queued: bool = False) -> Any:
        if not queued:
            job._set(JobState.RUNNING)
        try:
            job.result = await run(job)
        except asyncio.CancelledError:
            job.error = {"error_code": ErrorCode.CANCELLED.value, "error": "cancelled"}
            job._set(JobState.CANCELLED)
            raise
        except ProtocolError as exc:
            job.exception = exc
            job.error = {"error_code": exc.code.value, "error": exc.message, "details": exc.details}
            job._set(JobState.FAILED)
            return None
        except Exception as exc:
            log.exception("job %s (%s) failed", job.id, job.kind)
            job.exception = ProtocolError(f"{type(exc).__name__}: {exc}", ErrorCode.INTERNAL)
            job.error = {"error_code": ErrorCode.INTERNAL.value, "error": f"{type(exc).__name__}: {exc}"}
            job._set(JobState.FAILED)
            return None
        job._set(JobState.SUCCEEDED)
        return job.result

    async def wait(self, job: Job, timeout: float | None = None) -> Any:
        """The job's result, or its error raised (as a ProtocolError)."""
        assert job.task is not None
        try:
            result = await asyncio.wait_for(asyncio.shield(job.task), timeout)
        except asyncio.CancelledError:
            if job.state is JobState.CANCELLED:
                raise ProtocolError(f"job {job.id} was cancelled", ErrorCode.CANCELLED, job=job.id) from None
            raise
        if job.exception is not None:
            raise job.exception
        return result

    def get(self, job_id: str) -> Job:
        job = self._jobs.get(job_id)
        if job is None:
            raise JobNotFound(f"no job {job_id!r}", job_id=job_id)
        return job

    def list(
        self, *, state: str | None = None, kind: str | None = None, limit: int = 100
    ) -> builtins.list[Job]:
        jobs = [j for j in reversed(self._jobs.values()) if (state is None or j.state == state)]
        return [j for j in jobs if kind is None or j.kind == kind][:limit]

    def cancel(self, job_id: str) -> Job:
        job = self.get(job_id)
        if not job.state.finished and job.task is not None:
            for hook in job._cancel_hooks:
                hook()
            job.task.cancel()
        return job

    def counts(self) -> dict[str, int]:
        """Jobs kept, by state."""
        return {s.value: n for s, n in self._counts.items()}

    def _moved(self, old: JobState, new: JobState) -> None:
        self._counts[old] -= 1
        self._counts[new] += 1

    def _trim(self) -> None:
        finished = [jid for jid, j in self._jobs.items() if j.state.finished]
        for jid in finished[: max(0, len(self._jobs) - self.keep)]:
            self._counts[self._jobs.pop(jid).state] -= 1

    async def close(self) -> None:
        tasks = [j.task for j in self._jobs.values() if j.task is not None and not j.task.done()]
        for t in tasks:
            t.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
