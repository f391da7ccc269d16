"""The event bus: every state change, job update and worker event, fanned out to subscribers.

``publish`` may be called from any thread; subscribers are asyncio queues on the service's loop.
A slow subscriber loses its oldest events, never blocks the service.

The API's event streams (Server-Sent Events) subscribe to ``frames``: each event is encoded to
its SSE frame once, and the same bytes go to every stream (a dashboard costs an append per
event, not a JSON encoding). A stream is woken to write at most once per ``COALESCE_S``, by one
timer for all streams: a burst of events (the ten of a load come within ~50 ms) goes out in one
or two writes, not one wake-up and write each. On the service-wide streams (``/api/events``: dashboards)
``job.progress`` events are thinned per job to at most one per ``PROGRESS_INTERVAL_S``, the
latest winning within a step (a change of step always goes out: a load's components, an
install's phases), and a held one goes out before the next event of its job, so a stream never
shows a job's end before its last progress; a job's own stream takes every progress.
"""

from __future__ import annotations

import asyncio
import enum
import itertools
import json
import math
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import PurePath
from typing import Any

Event = dict[str, Any]

PROGRESS_INTERVAL_S = 0.1  # job.progress on the streams: at most 10 a second per job
PING_INTERVAL_S = 15.0  # an idle stream gets a comment this often (proxies, dead peers)
COALESCE_S = 0.05  # a stream writes at most this often: a burst of events (a load) in one write
PING = b": ping\n\n"
FINISHED = frozenset({"job.succeeded", "job.failed", "job.cancelled"})


class Subscription:
    """One subscriber's events, in order: ``with bus.subscribe() as events: async for ev in events``.
    It ends when closed (the ``with`` block ends, or the iterating task is cancelled)."""

    def __init__(self, subscribers: set[asyncio.Queue[Event]], size: int) -> None:
        self._subscribers = subscribers
        self._queue: asyncio.Queue[Event] = asyncio.Queue(size)
        subscribers.add(self._queue)

    def close(self) -> None:
        self._subscribers.discard(self._queue)

    def __aiter__(self) -> Subscription:
        return self

    async def __anext__(self) -> Event:
        if self._queue not in self._subscribers:
            raise StopAsyncIteration
        try:
            return await self._queue.get()
        except BaseException:  # cancelled: the consumer is gone
            self.close()
            raise

    def __enter__(self) -> Subscription:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


class EventBus:
    def __init__(self, *, queue_size: int = 1000, history: int = 200) -> None:
        self._loop: asyncio.AbstractEventLoop | None = None
        self._subscribers: set[asyncio.Queue[Event]] = set()
        self._seq = itertools.count(1)
        self._queue_size = queue_size
        self.recent: deque[Event] = deque(maxlen=history)
        self.last_id = 0  # id of the newest event: a view built before it may be stale
        self._listeners: list[Callable[[Event], None]] = []
        self.frames = FrameFanout(queue_size=queue_size)

    def on_delivery(self, listener: Callable[[Event], None]) -> None:
        """Call ``listener`` on the loop for every event delivered (parts that react to changes)."""
        self._listeners.append(listener)

    def bind(self, loop: asyncio.AbstractEventLoop) -> None:
        self._loop = loop

    def publish(self, type: str, **data: Any) -> Event:
        event = {"id": next(self._seq), "type": type, "at": time.time(), **data}
        self.last_id = event["id"]
        loop = self._loop
        if loop is None or loop.is_closed():
            self.recent.append(event)
            return event
        try:
            running = asyncio.get_running_loop()
        except RuntimeError:
            running = None
        if running is loop:
            self._deliver(event)
        else:
            loop.call_soon_threadsafe(self._deliver, event)
        return event

    def _deliver(self, event: Event) -> None:
        self.recent.append(event)
        for listener in self._listeners:
            listener(event)
        for q in list(self._subscribers):
            if q.full():
                q.get_nowait()  # drop the oldest: a slow reader never blocks the service
            q.put_nowait(event)
        self.frames.deliver(event)

    def subscribe(self) -> Subscription:
        """The events published from now on: the subscription is made here, not at the first
        step of an iteration (an event published in between, a job's end, was lost)."""
        return Subscription(self._subscribers, self._queue_size)

    @property
    def subscriber_count(self) -> int:
        return len(self._subscribers) + self.frames.subscriber_count


# ---------------------------------------------------------------------- SSE frames


@dataclass(frozen=True, slots=True)
class Frame:
    """One event as the bytes of a Server-Sent Event, shared by every stream that sends it."""

    type: str
    job: str | None
    data: bytes


def _plain(value: Any) -> Any:
    """JSON for what ``json`` does not know (pydantic models, enums, paths, sets)."""
    if hasattr(value, "model_dump"):
        return value.model_dump(mode="json")
    if isinstance(value, enum.Enum):
        return value.value
    if isinstance(value, PurePath):
        return str(value)
    if isinstance(value, set | frozenset):
        return sorted(value, key=str)
    return str(value)


def _finite(value: Any) -> Any:
    """``value`` with NaN and infinities as null (JSON has neither; browsers refuse them)."""
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, dict):
        return {k: _finite(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_finite(v) for v in value]
    return value


def encode_frame(type: str, data: Any, id: int | str) -> bytes:
    """The SSE wire form of one event: ``event:``, one ``data:`` line of compact JSON, ``id:``."""
    try:
        body = json.dumps(data, separators=(",", ":"), default=_plain, allow_nan=False)
    except ValueError:
        body = json.dumps(_finite(json.loads(json.dumps(data, default=_plain))), separators=(",", ":"))
    return b"event: %s\ndata: %s\nid: %s\n\n" % (type.encode(), body.encode(), str(id).encode())


class FrameSubscription:
    """One stream's frames waiting to be written. ``types``: type prefixes to send (empty: all);
    ``exclude``: type prefixes not to send; ``job``: only that job's events, and every progress of
    it (a job's own stream, followed by one client: the CLI prints each step); the others take
    thinned progress. The reader is woken by the fanout's coalescing timer, not by each frame."""

    def __init__(
        self, fanout: FrameFanout, types: tuple[str, ...], exclude: tuple[str, ...], job: str | None
    ) -> None:
        self._fanout = fanout
        self.types = types
        self.exclude = exclude
        self.job = job
        self.thin = job is None
        self.frames: deque[Frame] = deque(maxlen=fanout.queue_size)  # full: the oldest is dropped
        self._marked = False  # due in the fanout's next flush
        self._due = False  # flushed: the reader may take the frames
        self._waiter: asyncio.Future[None] | None = None

    def wants(self, frame: Frame) -> bool:
        if self.job is not None and frame.job != self.job:
            return False
        return (not self.types or frame.type.startswith(self.types)) and not frame.type.startswith(
            self.exclude
        )

    def put(self, frame: Frame) -> None:
        """Keep ``frame`` (a slow reader loses its oldest, never blocks the service)."""
        self.frames.append(frame)
        if not self._marked:
            self._marked = True
            self._fanout.mark(self)

    def wake(self) -> None:
        """The fanout's flush: the frames kept so far may go."""
        self._marked = False
        self._due = True
        if self._waiter is not None and not self._waiter.done():
            self._waiter.set_result(None)

    async def next_batch(self) -> list[Frame]:
        """The frames kept up to the fanout's last flush (at least one: waits for it): a burst of
        events goes out in one write."""
        while not (self._due and self.frames):
            self._due = False
            self._waiter = asyncio.get_running_loop().create_future()
            try:
                await self._waiter
            finally:
                self._waiter = None
        self._due = False
        batch = list(self.frames)
        self.frames.clear()
        return batch

    def close(self) -> None:
        self._fanout.unsubscribe(self)

    def __enter__(self) -> FrameSubscription:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


PING_FRAME = Frame(type="", job=None, data=PING)
STAGE_KEYS = ("step", "component", "phase")  # what names a job's step in its progress


def _stage(event: Event) -> tuple[Any, ...]:
    """The step a progress event reports (a load's component, an install's phase): thinning keeps
    the latest within a step and lets every change of step through (a job has few)."""
    progress = event.get("progress")
    return tuple(progress.get(k) for k in STAGE_KEYS) if isinstance(progress, dict) else ()


class FrameFanout:
    """Events to the event streams as shared frames, ``job.progress`` thinned per job (see the
    module docstring). Runs on the service's loop (``EventBus._deliver``)."""

    def __init__(
        self,
        *,
        queue_size: int = 1000,
        progress_interval: float = PROGRESS_INTERVAL_S,
        coalesce: float = COALESCE_S,
    ) -> None:
        self.queue_size = queue_size
        self.progress_interval = progress_interval
        self.coalesce = coalesce
        self._subscribers: set[FrameSubscription] = set()
        self._marked: list[FrameSubscription] = []  # streams with frames since the last flush
        self._flusher: asyncio.TimerHandle | None = None
        self._sent_at: dict[str, float] = {}  # job -> loop time its last progress went out
        self._held: dict[str, Frame] = {}  # job -> its newest progress not sent yet
        self._stage: dict[str, tuple[Any, ...]] = {}  # job -> the step of its last progress sent
        self._timers: dict[str, asyncio.TimerHandle] = {}
        self._pinger: asyncio.TimerHandle | None = None

    @property
    def subscriber_count(self) -> int:
        return len(self._subscribers)

    def subscribe(
        self, types: tuple[str, ...] = (), exclude: tuple[str, ...] = (), job: str | None = None
    ) -> FrameSubscription:
        """A subscription from now on (on the loop); close it (or use it as a context manager)."""
        sub = FrameSubscription(self, types, exclude, job)
        self._subscribers.add(sub)
        if self._pinger is None:
            self._pinger = asyncio.get_running_loop().call_later(PING_INTERVAL_S, self._ping)
        return sub

    def unsubscribe(self, sub: FrameSubscription) -> None:
        self._subscribers.discard(sub)
        if not self._subscribers:
            self._reset()

    def deliver(self, event: Event) -> None:
        if not self._subscribers:
            return
        job = event.get("job")
        frame = Frame(
            event["type"],
            job if isinstance(job, str) else None,
            encode_frame(event["type"], event, event["id"]),
        )
        if frame.job is None:
            self._send(frame)
            return
        job = frame.job
        loop = asyncio.get_running_loop()
        if frame.type == "job.progress":
            self._send(frame, thin=False)  # the streams that take every progress (one job's)
            now = loop.time()
            stage = _stage(event)
            if stage != self._stage.get(job):  # a new step is shown, never thinned away
                self._flush(job)  # the last step's latest first
                self._stage[job] = stage
                self._sent_at[job] = now
                self._send(frame, thin=True)
            elif job not in self._held and now - self._sent_at.get(job, -math.inf) >= self.progress_interval:
                self._sent_at[job] = now
                self._send(frame, thin=True)
            else:
                self._held[job] = frame  # the latest wins
                if job not in self._timers:
                    due = self._sent_at[job] + self.progress_interval
                    self._timers[job] = loop.call_at(due, self._flush, job)
            return
        self._flush(job)  # a held progress goes out before its job's next event
        self._send(frame)
        if frame.type in FINISHED:
            self._sent_at.pop(job, None)
            self._stage.pop(job, None)
        if len(self._sent_at) > 1000:  # jobs that never finished: old entries hold nothing back
            now = loop.time()
            self._sent_at = {j: t for j, t in self._sent_at.items() if now - t < self.progress_interval}
            self._stage = {j: v for j, v in self._stage.items() if j in self._sent_at}

    def _flush(self, job: str) -> None:
        timer = self._timers.pop(job, None)
        if timer is not None:
            timer.cancel()
        frame = self._held.pop(job, None)
        if frame is not None:
            self._sent_at[job] = asyncio.get_running_loop().time()
            self._send(frame, thin=True)

    def _send(self, frame: Frame, thin: bool | None = None) -> None:
        """``frame`` to the subscriptions that want it (``thin``: only those that do (True) or do
        not (False) thin progress; None: all)."""
        for sub in list(self._subscribers):
            if (thin is None or sub.thin is thin) and sub.wants(frame):
                sub.put(frame)

    def mark(self, sub: FrameSubscription) -> None:
        """``sub`` holds frames: wake it at the next flush (one timer for every stream)."""
        self._marked.append(sub)
        if self._flusher is None:
            self._flusher = asyncio.get_running_loop().call_later(self.coalesce, self._flush_marked)

    def _flush_marked(self) -> None:
        self._flusher = None
        marked, self._marked = self._marked, []
        for sub in marked:
            sub.wake()

    def _ping(self) -> None:
        self._pinger = None
        if not self._subscribers:
            return
        for sub in list(self._subscribers):
            if not sub.frames:
                sub.put(PING_FRAME)
        self._pinger = asyncio.get_running_loop().call_later(PING_INTERVAL_S, self._ping)

    def _reset(self) -> None:
        for timer in self._timers.values():
            timer.cancel()
        self._timers.clear()
        self._held.clear()
        self._sent_at.clear()
        self._stage.clear()
        if self._pinger is not None:
            self._pinger.cancel()
            self._pinger = None
        if self._flusher is not None:
            self._flusher.cancel()
            self._flusher = None
        self._marked.clear()
