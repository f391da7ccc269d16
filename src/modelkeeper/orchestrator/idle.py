"""Idle unloading (Ollama's ``keep_alive``): a loaded model goes once it has gone unused for its
``keep_alive`` seconds; never while a lease holds it or an operation runs on it. Its RAM-cache
segments stay, so the next load comes from RAM.

The part sleeps until the earliest expiry and is woken by every event of the bus (a load, an
operation's end, a released lease change what is due), so it costs nothing while nothing expires.
"""

from __future__ import annotations

import asyncio
import logging
import time

from modelkeeper.orchestrator.events import Event, EventBus
from modelkeeper.orchestrator.leases import LeaseTable
from modelkeeper.orchestrator.loads import Loads
from modelkeeper.orchestrator.state import Placement, StateView
from modelkeeper.protocol.errors import ProtocolError

log = logging.getLogger(__name__)


class IdleUnloader:
    def __init__(self, loads: Loads, view: StateView, leases: LeaseTable, bus: EventBus) -> None:
        self.loads = loads
        self.view = view
        self.leases = leases
        self._wake = asyncio.Event()
        bus.on_delivery(self._poke)

    def _poke(self, event: Event) -> None:
        self._wake.set()

    def _expiring(self) -> list[tuple[float, Placement]]:
        out = []
        for p in self.view.placements.values():
            at = p.expires_at
            if at is not None and not self.leases.holding(p.model_id, p.device):
                out.append((at, p))
        return sorted(out, key=lambda e: e[0])

    async def run(self) -> None:
        """Unload what is due, then sleep until the next expiry or the next event (a background task)."""
        while True:
            self._wake.clear()
            pending = self._expiring()
            now = time.time()
            for at, p in pending:
                if at <= now:
                    try:
                        await self.loads.expire(p)
                    except ProtocolError as exc:  # a worker gone meanwhile: recovery deals with it
                        log.warning("idle unload of %s on %s failed: %s", p.model_id, p.device, exc)
            later = [at for at, _ in pending if at > now]
            timeout = max(0.0, min(later) - time.time()) if later else None
            # asyncio.wait, not wait_for: Python 3.11's wait_for swallows a cancel that arrives
            # as the event is set, and the service could then never stop this task
            waiter = asyncio.ensure_future(self._wake.wait())
            try:
                await asyncio.wait({waiter}, timeout=timeout)
            finally:
                waiter.cancel()
