"""The event bus: every state change, job update and worker event, fanned out to subscribers.

``publish`` may be called from any thread; subscribers are asyncio queues on the service's loop
(the API streams them as Server-Sent Events). A slow subscriber loses its oldest events, never
blocks the service.
"""

from __future__ import annotations

import asyncio
import itertools
import time
from collections import deque
from collections.abc import Callable
from typing import Any

Event = dict[str, Any]


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

    def subscribe(self) -> Subscription:
        """The events published from now on: the subscription is made here, not at the first
        step of an iteration (an event published in between, a job's end, was lost)."""
        return Subscription(self._subscribers, self._queue_size)

    @property
    def subscriber_count(self) -> int:
        return len(self._subscribers)
