"""The orchestrator service: it builds its parts from :class:`Settings` (or takes them injected),
wires them, and starts and stops them. It does nothing else; each part is a module of its own:

- ``catalog``: the registry, references, metadata, history, the scan job (:mod:`.catalog`);
  ``watcher`` rescans it when files change under the roots (:mod:`.watch`)
- ``feed``: the RAM cache, loads through it, fills alongside (:mod:`.cachefeed`)
- ``pool``: one worker per device and its queue (:mod:`.pool`, :mod:`.workers`)
- ``loads``: load, placement (the pure policy in :mod:`.placement`), coalescing, rollback, unload, leases (:mod:`.loads`)
- ``operations``: validate, benchmark, optimize on loaded models (:mod:`.operations`)
- ``loras``: LoRAs on loaded models (:mod:`.loras`)
- ``recovery``: worker events and exits, restart, reconcile (:mod:`.recovery`)
- ``views``: the status snapshot and model detail (:mod:`.views`)
- ``idle``: unloads models whose ``keep_alive`` ran out (:mod:`.idle`)
- ``installs``: models fetched from the Hub, CivitAI or a URL, registered (:mod:`.installs`)
- ``first_scan``: the start's scan of the roots, which readiness waits for (:mod:`.firstscan`)

with the shared state they act on: the event ``bus``, ``jobs``, ``leases`` and the placement
``view``. The orchestrator never imports torch.
"""

from __future__ import annotations

import asyncio
import logging
from typing import Any

from modelkeeper.orchestrator.background import Background
from modelkeeper.orchestrator.cachefeed import CacheFeed
from modelkeeper.orchestrator.catalog import Catalog
from modelkeeper.orchestrator.errors import DeviceNotReady
from modelkeeper.orchestrator.eventlog import log_event
from modelkeeper.orchestrator.events import EventBus
from modelkeeper.orchestrator.firstscan import FirstScan
from modelkeeper.orchestrator.idle import IdleUnloader
from modelkeeper.orchestrator.installs import Installs
from modelkeeper.orchestrator.jobs import JobManager
from modelkeeper.orchestrator.leases import LeaseTable
from modelkeeper.orchestrator.loads import Loads
from modelkeeper.orchestrator.loras import Loras
from modelkeeper.orchestrator.metrics import Metrics
from modelkeeper.orchestrator.operations import Operations
from modelkeeper.orchestrator.options import LoadOptions
from modelkeeper.orchestrator.pool import WorkerPool
from modelkeeper.orchestrator.recovery import Recovery
from modelkeeper.orchestrator.settings import Preload, Settings
from modelkeeper.orchestrator.state import StateView
from modelkeeper.orchestrator.views import Views
from modelkeeper.orchestrator.watch import RootWatcher
from modelkeeper.protocol.client import WorkerFactory, WorkerProcess
from modelkeeper.protocol.errors import ProtocolError

log = logging.getLogger(__name__)


class Orchestrator:
    """See the module docstring. ``await start()``, use the parts, ``await stop()``."""

    def __init__(
        self, settings: Settings | None = None, *, worker_factory: WorkerFactory = WorkerProcess.start
    ) -> None:
        self.settings = s = settings or Settings()
        self.ready = False
        self.preload: dict[str, Any] = {"pending": len(s.preload), "loaded": [], "failed": []}
        self.bus = EventBus()
        self.bus.on_delivery(log_event)  # the service's log: loads, unloads, workers, scans (eventlog.py)
        self.jobs = JobManager(self.bus, keep=s.jobs_kept, accepting=lambda: self.ready)
        self.leases = LeaseTable()
        self.view = StateView()
        self.background = Background()
        self.catalog = Catalog(s, self.bus, self.jobs)
        self.watcher = RootWatcher(s, self.catalog)
        self.pool = WorkerPool(s, factory=worker_factory)
        self.feed = CacheFeed(s, self.catalog, self.bus, self.jobs, release=self.pool.release_segment)
        self.metrics = Metrics(
            lambda: self.feed.cache.stats() if self.feed.is_open else None,
            self.pool.slots,
            self.view,
            self.jobs,
            self.leases,
        )
        self.loads = Loads(
            s, self.catalog, self.feed, self.pool, self.view, self.leases, self.jobs, self.bus, self.metrics
        )
        self.operations = Operations(s, self.catalog, self.loads, self.pool, self.view, self.jobs)
        self.loras = Loras(s, self.catalog, self.loads, self.pool, self.view, self.bus)
        self.recovery = Recovery(s, self.catalog, self.loads, self.pool, self.view, self.bus, self.background)
        self.views = Views(
            self.catalog,
            self.feed,
            self.pool,
            self.view,
            self.leases,
            self.jobs,
            self.bus,
            ready=lambda: self.ready,
        )
        self.idle = IdleUnloader(self.loads, self.view, self.leases, self.bus)
        self.installs = Installs(s, self.catalog, self.jobs, self.bus)
        self.first_scan = FirstScan(self.bus, enabled=s.scan_on_start)

    async def start(self, *, require_worker: bool = False) -> None:
        """Open the registry and the RAM cache, start the workers, the first scan and the background
        parts. ``require_worker``: when no configured device could start a worker, stop what was
        started and raise DeviceNotReady naming each device and why (``serve`` refuses to run
        with nothing to load on); without it the service runs without workers."""
        s = self.settings
        self.bus.bind(asyncio.get_running_loop())
        log.info(
            "starting: model roots %s; devices %s; registry %s",
            ", ".join(str(r) for r in s.model_roots), ", ".join(s.devices), s.db or "(default)",
        )  # fmt: skip
        await self.catalog.open()
        await self.feed.open()
        await self.pool.start()
        failed = self.pool.unavailable()
        if require_worker and self.pool.slots and len(failed) == len(self.pool.slots):
            await self.stop()
            raise DeviceNotReady(
                "no device can start a worker: " + "; ".join(f"{d}: {why}" for d, why in failed.items())
            )
        if failed:
            log.warning(
                "serving without %s: %s", ", ".join(failed), "; ".join(f"{d}: {w}" for d, w in failed.items())
            )
        self.background.spawn(self.pool.poll())
        self.background.spawn(self.idle.run())
        self.ready = True
        self.bus.publish("service.ready", devices=list(self.pool.slots))
        if self.settings.scan_on_start:  # readiness waits for it (first_scan)
            started = await self.catalog.scan(wait=False, hash=self.settings.hash_on_start)
            self.first_scan.follow(started["job"]["id"])
        self.background.spawn(self.watcher.run())
        if self.settings.preload:
            self.background.spawn(self._preload())

    @property
    def preloaded(self) -> bool:
        """True once every model of ``settings.preload`` is loaded (at once when there are none)."""
        return self.preload["pending"] == 0 and not self.preload["failed"]

    async def _preload(self) -> None:
        """Load ``settings.preload`` once the first scan has registered the roots, kept loaded."""
        for job in self.jobs.list(kind="scan"):
            if job.task is not None:
                await asyncio.wait({job.task})
        for entry in self.settings.preload:
            want = entry if isinstance(entry, Preload) else Preload(model=entry)
            try:
                result = await self.loads.load(want.model, want.device, options=LoadOptions(keep_loaded=True))
                self.preload["loaded"].append({"model": want.model, "model_id": result["result"]["model_id"]})
            except ProtocolError as exc:
                log.error("preload of %s failed: %s", want.model, exc.message)
                self.preload["failed"].append(
                    {"model": want.model, "error_code": exc.code.value, "error": exc.message}
                )
                self.bus.publish("preload.failed", model=want.model, error=exc.message)
            finally:
                self.preload["pending"] -= 1
        self.bus.publish("preload.done", **{k: v for k, v in self.preload.items() if k != "pending"})

    async def stop(self) -> None:
        """Stop accepting jobs, cancel the background parts, stop the workers (their models go
        with them), close the cache and the registry."""
        models = len(self.view.placements)
        workers = [s.id for s in self.pool.slots.values() if s.proc is not None]
        self.ready = False
        await self.jobs.close()
        await self.background.cancel_all()
        await self.pool.stop()
        await self.feed.close()
        self.installs.close()
        await self.catalog.close()
        log.info(
            "stopped: %d model%s unloaded, worker%s stopped (%s)",
            models, "" if models == 1 else "s", "" if len(workers) == 1 else "s", ", ".join(workers) or "none",
        )  # fmt: skip
