"""The cache feed: the RAM cache as loads and the API use it.

It owns the service's :class:`RamCache`; routes a component's load through it (a hit points the
worker at the segment; a miss loads from disk while the segment fills alongside, or fills first
with ``cache_fill = "before"`` or when the caller requires the cache); caches a model or one
component on request; drops segments. Every dropped or evicted segment is unmapped by the workers.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable
from pathlib import Path
from typing import Any

from modelkeeper.cache import CacheFull, RamCache, Segment
from modelkeeper.formats.pickle_sandbox import PICKLE_SUFFIXES
from modelkeeper.orchestrator.catalog import Catalog
from modelkeeper.orchestrator.errors import ServiceNotReady
from modelkeeper.orchestrator.events import EventBus
from modelkeeper.orchestrator.jobs import Job, JobManager
from modelkeeper.orchestrator.loading import (
    CachePlan,
    ComponentLoad,
    cache_plan,
    fill,
    from_segment,
    lookup,
    through_cache,
)
from modelkeeper.orchestrator.settings import Settings
from modelkeeper.protocol.errors import ErrorCode, ProtocolError
from modelkeeper.registry import ModelRecord

log = logging.getLogger(__name__)


class CacheFeed:
    def __init__(
        self,
        settings: Settings,
        catalog: Catalog,
        bus: EventBus,
        jobs: JobManager,
        *,
        release: Callable[[str], None],
    ) -> None:
        self.settings = settings
        self.catalog = catalog
        self.bus = bus
        self.jobs = jobs
        self.release = release  # tells the workers to unmap a segment path
        self._cache: RamCache | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._fills: dict[tuple[str | None, str, tuple[str, ...]], asyncio.Future[None]] = {}

    async def open(self) -> None:
        self._loop = asyncio.get_running_loop()
        self._cache = await asyncio.to_thread(
            RamCache, self.settings.ram_cache_bytes, on_remove=self._removed
        )

    async def close(self) -> None:
        await self.wait_for_fills()  # a fill's thread cannot be stopped: let it finish before closing
        if self._cache is not None:
            await asyncio.to_thread(self._cache.close)

    @property
    def cache(self) -> RamCache:
        if self._cache is None:
            raise ServiceNotReady("the RAM cache is not set up yet")
        return self._cache

    @property
    def is_open(self) -> bool:
        return self._cache is not None

    def segments(self) -> list[dict[str, Any]]:
        return self._cache.segments() if self._cache is not None else []

    # ------------------------------------------------------------------ loads through the cache

    async def route(
        self, record: ModelRecord, load: ComponentLoad, job: Job, *, require: bool = False
    ) -> ComponentLoad:
        """``load`` pointed at its component's segment when cached (or filled first: ``require``,
        ``cache_fill = "before"``, or a pickle file, which is converted in the sandbox whether the
        cache is on or off); else unchanged, with the segment filling alongside."""
        # a pickle file reaches a worker only as a segment, converted in the sandbox: cache on or off
        pickle = Path(load.request.path).suffix.lower() in PICKLE_SUFFIXES
        if not (self.settings.cache_loads or require or pickle):
            return load
        loop = asyncio.get_running_loop()

        def progress(done: int, total: int) -> None:
            loop.call_soon_threadsafe(lambda: job.progress(cache_bytes_done=done, cache_bytes_total=total))

        try:
            if require or pickle or self.settings.cache_fill == "before":
                return await asyncio.to_thread(through_cache, self.cache, record, load, progress)
            plan = await asyncio.to_thread(cache_plan, load)
            if plan is None:
                return load
            seg = await asyncio.to_thread(lookup, self.cache, record, plan)
            if seg is not None:
                return from_segment(load, plan, seg)
            self._fill_alongside(record, plan)
            return load  # from disk now; the next load hits the segment
        except OSError as exc:
            path = str(exc.filename or load.request.path)
            raise ProtocolError(
                f"model {record.id}: cannot read {path}: {exc.strerror or exc}",
                ErrorCode.FILE_NOT_FOUND,
                path=path,
            ) from None
        except CacheFull:
            if require or pickle:
                raise
            return load  # no room in RAM: straight from disk

    def _fill_alongside(self, record: ModelRecord, plan: CachePlan) -> None:
        """Fill a component's segment while a worker reads the same file (the page cache serves
        both: the disk is read once). A fill that cannot fit or fails only costs the next load its
        hit; it is published as ``cache.fill_failed``."""
        # One component of a file: without a content id, a checkpoint's components share its path.
        key = (plan.component_id, str(plan.source), tuple(plan.names or ()))
        if key in self._fills:
            return

        async def run() -> None:
            try:
                seg = await asyncio.to_thread(fill, self.cache, record, plan)
                self.bus.publish(
                    "cache.filled", model_id=record.id, component_id=seg.component_id, bytes=seg.size
                )
            except (CacheFull, ProtocolError, OSError) as exc:
                reason = exc.message if isinstance(exc, ProtocolError) else str(exc)
                log.info("cache fill of %s for %s skipped: %s", plan.source, record.id, reason)
                self.bus.publish(
                    "cache.fill_failed", model_id=record.id, source=str(plan.source), error=reason
                )
            finally:
                self._fills.pop(key, None)

        self._fills[key] = asyncio.ensure_future(run())

    async def wait_for_fills(self) -> None:
        """Until the segments being filled beside loads are complete (tests, shutdown)."""
        while self._fills:
            await asyncio.gather(*list(self._fills.values()), return_exceptions=True)

    # ------------------------------------------------------------------ the cache API

    def view(self) -> dict[str, Any]:
        return {"stats": self.cache.stats(), "segments": self.cache.segments()}

    def get(self, component_id: str) -> dict[str, Any]:
        return self.cache.get(component_id).info()

    async def cache_model(self, ref: str, *, wait: bool = True) -> dict[str, Any]:
        """Every component of a model into the cache: a job."""
        record = await self.catalog.resolve(ref)
        self.catalog.check_loadable(record)  # a LoRA, an embedding: refused before any job
        await self.catalog.verify_file(record)

        async def body(job: Job) -> Any:
            await self.catalog.verify_file(record)
            loads = await self.catalog.component_loads(record)
            out = []
            for i, planned in enumerate(loads):
                job.step(planned.component, component=i + 1, components=len(loads))
                load = await self.route(record, planned, job, require=True)
                if load.segment is not None:
                    out.append({"component": load.component, **load.segment.info()})
            return {"model_id": record.id, "segments": out}

        return await self.jobs.run("cache", {"model_id": record.id}, body, wait=wait)

    async def cache_component(self, component_id: str, *, wait: bool = True) -> dict[str, Any]:
        """One component (by content id) into the cache, from the first model that has it: a job."""
        if component_id in self.cache:
            return {"result": {"segments": [self.cache.get(component_id).info()]}}
        owners = await self.catalog.db(self.catalog.registry.models_with_component, component_id)
        if not owners:
            raise ProtocolError(
                f"no registered model has a component with content id {component_id!r} (hash the models first)",
                ErrorCode.MODEL_NOT_FOUND,
                component_id=component_id,
            )
        model_id, name = owners[0]
        record = await self.catalog.get(model_id)
        self.catalog.check_loadable(record)

        async def body(job: Job) -> Any:
            load = next(c for c in await self.catalog.component_loads(record) if c.component == name)
            load = await self.route(record, load, job, require=True)
            return {"segments": [load.segment.info()] if load.segment else []}

        return await self.jobs.run("cache", {"component_id": component_id}, body, wait=wait)

    async def drop(self, component_id: str, *, force: bool = False) -> dict[str, Any]:
        """Drop a segment, named by its id or a unique prefix of it (as the cache table shows it),
        off the loop: unlinking it frees its pages (~0.2 s a GB of tmpfs). Answers its full id."""
        full = self.cache.resolve(component_id)
        freed = await asyncio.to_thread(self.cache.drop, full, force=force)
        return {"component_id": full, "freed_bytes": freed}

    async def clear(self, *, force: bool = False) -> dict[str, Any]:
        """Drop every segment (pinned ones only with ``force``), off the loop as ``drop``."""

        def clear() -> dict[str, Any]:
            before = self.cache.stats()["segments"]
            freed = self.cache.drop_all(force=force)
            return {"dropped": before - self.cache.stats()["segments"], "freed_bytes": freed}

        return await asyncio.to_thread(clear)

    def _removed(self, seg: Segment) -> None:
        """Called by the cache (any thread) for every dropped or evicted segment: workers unmap it."""
        loop = self._loop
        if loop is None or loop.is_closed():
            return
        loop.call_soon_threadsafe(self._release, str(seg.path), seg.component_id)

    def _release(self, path: str, component_id: str) -> None:
        self.release(path)
        self.bus.publish("cache.removed", component_id=component_id)
