"""The worker pool: one :class:`WorkerSlot` per device, started and stopped together.

The pool builds its slots from the settings (``devices``, budget, reserve, extra worker
arguments) and starts each worker with ``factory``: a subprocess by default, the in-process
worker in tests. Worker events and exits go to the handlers the service wires in (the recovery
part); memory figures are refreshed every ``status_poll_s``.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Callable

from modelkeeper.orchestrator.errors import DeviceNotFound, DeviceNotReady
from modelkeeper.orchestrator.settings import Settings
from modelkeeper.orchestrator.workers import SlotState, WorkerSlot, expand_devices
from modelkeeper.protocol.client import WorkerFactory, WorkerProcess
from modelkeeper.protocol.commands import CommandType
from modelkeeper.protocol.errors import ProtocolError
from modelkeeper.protocol.messages import Event
from modelkeeper.sizes import format_size

log = logging.getLogger(__name__)


class WorkerPool:
    def __init__(self, settings: Settings, *, factory: WorkerFactory = WorkerProcess.start) -> None:
        self.settings = settings
        self.factory = factory
        self.slots: dict[str, WorkerSlot] = {}
        self.on_event: Callable[[WorkerSlot, Event], None] = lambda slot, event: None
        self.on_exit: Callable[[WorkerSlot, int | None], None] = lambda slot, code: None

    def worker_args(self) -> list[str]:
        s = self.settings
        args = list(s.worker_args) + (["--warm"] if s.worker_warm else [])
        if s.worker_budget_mb is not None:
            args += ["--budget-mb", str(s.worker_budget_mb)]
        if s.worker_reserve_mb is not None:
            args += ["--reserve-mb", str(s.worker_reserve_mb)]
        return args

    async def start(self) -> None:
        """Start a worker on every configured device; one that fails is marked FAILED, not fatal."""
        s = self.settings
        devices = await asyncio.to_thread(expand_devices, s.devices)
        args = self.worker_args()
        for slot_id, device in devices:
            self.slots[slot_id] = WorkerSlot(
                slot_id,
                device,
                args=args,
                start_timeout=s.worker_start_timeout,
                ping_timeout=s.ping_timeout,
                factory=self.factory,
                on_event=self._event,
                on_exit=self._exit,
            )
        results = await asyncio.gather(
            *(slot.start() for slot in self.slots.values()), return_exceptions=True
        )
        for slot, res in zip(self.slots.values(), results, strict=True):
            if isinstance(res, BaseException):
                slot.state = SlotState.FAILED
                why = res.details.get("reason", res.message) if isinstance(res, ProtocolError) else str(res)
                slot.last_error = f"worker did not start: {why}"
                log.error("worker %s did not start: %s", slot.id, why)
            else:
                log.info(
                    "worker %s up: pid %s, %s", slot.id, slot.proc.pid if slot.proc else "-", describe(slot)
                )

    def unavailable(self) -> dict[str, str]:
        """Device -> why it has no worker, for each device whose worker failed (or stopped)."""
        return {
            s.id: s.last_error or s.state.value
            for s in self.slots.values()
            if s.state in (SlotState.FAILED, SlotState.STOPPED)
        }

    def check_ready(self) -> None:
        """DeviceNotReady naming every device and why, when no worker runs (nothing could load)."""
        if self.slots and not self.ready():
            why = "; ".join(f"{d}: {e}" for d, e in self.unavailable().items()) or "workers are restarting"
            raise DeviceNotReady(f"no worker is running ({why})")

    def _event(self, slot: WorkerSlot, event: Event) -> None:
        self.on_event(slot, event)  # looked up per call: the handlers are wired after the pool is built

    def _exit(self, slot: WorkerSlot, code: int | None) -> None:
        self.on_exit(slot, code)

    async def stop(self) -> None:
        await asyncio.gather(*(slot.stop() for slot in self.slots.values()), return_exceptions=True)

    def slot(self, device: str) -> WorkerSlot:
        slot = self.slots.get(device)
        if slot is None:
            raise DeviceNotFound(
                f"no worker on device {device!r} (devices: {', '.join(self.slots) or 'none'})", device=device
            )
        return slot

    def ready(self) -> list[WorkerSlot]:
        return [s for s in self.slots.values() if s.state is SlotState.READY]

    async def poll(self) -> None:
        """Refresh every ready worker's memory figures, forever (a background task)."""
        while True:
            await asyncio.sleep(self.settings.status_poll_s)
            for slot in self.ready():
                with contextlib.suppress(ProtocolError):
                    await slot.status(timeout=self.settings.ping_timeout)

    def release_segment(self, path: str) -> None:
        """Tell every running worker to unmap a RAM-cache segment (dropped or evicted)."""
        for slot in self.ready():
            if slot.proc is not None:
                slot.proc.submit(CommandType.RELEASE_SEGMENTS, {"paths": [path]})


def describe(slot: WorkerSlot) -> str:
    """``NVIDIA H100 80GB HBM3, budget 77.1 GB``: what a worker said of its device at hello."""
    name = slot.hello.device.name if slot.hello is not None else "?"
    return f"{name}, budget {format_size(slot.budget_bytes)}"
