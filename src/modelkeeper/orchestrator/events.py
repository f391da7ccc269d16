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
from collections.abc import AsyncIterator, Callable
from typing import Any

Event = dict[str, Any]


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

    async def subscribe(self) -> AsyncIterator[Event]:
        """Events from now on, until the consumer stops iterating."""
        q: asyncio.Queue[Event] = asyncio.Queue(self._queue_size)
        self._subscribers.add(q)
        try:
            while True:
                yield await q.get()
        finally:
            self._subscribers.discard(q)

    @property
    def subscriber_count(self) -> int:
        return len(self._subscribers)
