"""The orchestrator service: registry, discovery, RAM cache, one worker per device, placement,
jobs, leases and events, wired together here and nowhere else.

Every public coroutine is what one API endpoint does. Long operations run as jobs
(:mod:`modelkeeper.orchestrator.jobs`): with ``wait=True`` the caller gets the job's result (or its
error), else the job at once. Device operations queue per device by priority
(:mod:`modelkeeper.orchestrator.workers`). The orchestrator never imports torch.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import os
import threading
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar

from modelkeeper.cache import CacheFull, RamCache, Segment
from modelkeeper.discovery import Hasher, HashProgress, Scanner, ScanProgress
from modelkeeper.orchestrator.errors import (
    DeviceNotFound,
    InvalidReference,
    ModelInUse,
    NotLoaded,
    NotPlaceable,
    PathOutsideRoots,
    ServiceNotReady,
)
from modelkeeper.orchestrator.events import EventBus
from modelkeeper.orchestrator.jobs import Job, JobManager
from modelkeeper.orchestrator.leases import LeaseTable
from modelkeeper.orchestrator.loading import (
    CachePlan,
    ComponentLoad,
    cache_plan,
    component_requests,
    fill,
    from_segment,
    lookup,
    through_cache,
)
from modelkeeper.orchestrator.metrics import Metrics
from modelkeeper.orchestrator.settings import Settings
from modelkeeper.orchestrator.state import Placement, StateView
from modelkeeper.orchestrator.workers import Priority, SlotState, WorkerSlot, expand_devices
from modelkeeper.protocol.commands import CommandType
from modelkeeper.protocol.errors import ErrorCode, ProtocolError
from modelkeeper.protocol.messages import Event, EventType
from modelkeeper.registry import ModelNotFound, ModelRecord, Registry

log = logging.getLogger(__name__)
T = TypeVar("T")
STATUS_MAX_AGE = 0.25  # seconds a status snapshot may serve when no event came


@dataclass
class LoadOptions:
    priority: int = Priority.NORMAL
    timeout: float | None = None
    force: bool = False
    keep_loaded: bool = False
    require_cache: bool = False


class Orchestrator:
    """See the module docstring. ``await start()``, use, ``await stop()``."""

    def __init__(self, settings: Settings | None = None) -> None:
        self.settings = settings or Settings()
        self.bus = EventBus()
        self.jobs = JobManager(self.bus, keep=self.settings.jobs_kept)
        self.leases = LeaseTable()
        self.view = StateView()
        self.metrics = Metrics(self)
        self.slots: dict[str, WorkerSlot] = {}
        self._registry: Registry | None = None
        self._cache: RamCache | None = None
        self._inflight: dict[tuple[str, str], asyncio.Future[dict[str, Any]]] = {}
        self._tasks: set[asyncio.Task[Any]] = set()
        self._fills: dict[tuple[str | None, str, tuple[str, ...]], asyncio.Future[None]] = {}
        self._loop: asyncio.AbstractEventLoop | None = None
        self.ready = False
        self.started_at = time.time()
        self._status_cache: tuple[int, float, bytes] | None = None
        self.roots = [Path(os.path.realpath(r)) for r in self.settings.model_roots]

    # ------------------------------------------------------------------ lifecycle

    @property
    def registry(self) -> Registry:
        if self._registry is None:
            raise ServiceNotReady("the registry is not open yet")
        return self._registry

    @property
    def cache(self) -> RamCache:
        if self._cache is None:
            raise ServiceNotReady("the RAM cache is not set up yet")
        return self._cache

    async def start(self) -> None:
        self._loop = asyncio.get_running_loop()
        self.bus.bind(self._loop)
        s = self.settings
        for root in self.roots:
            root.mkdir(parents=True, exist_ok=True)
        self._registry = await asyncio.to_thread(Registry.open, s.db)
        self._cache = await asyncio.to_thread(RamCache, s.ram_cache_bytes, on_remove=self._segment_removed)
        devices = await asyncio.to_thread(expand_devices, s.devices)
        args = list(s.worker_args) + (["--warm"] if s.worker_warm else [])
        if s.worker_budget_mb is not None:
            args += ["--budget-mb", str(s.worker_budget_mb)]
        if s.worker_reserve_mb is not None:
            args += ["--reserve-mb", str(s.worker_reserve_mb)]
        for slot_id, device in devices:
            self.slots[slot_id] = WorkerSlot(
                slot_id,
                device,
                args=args,
                start_timeout=s.worker_start_timeout,
                ping_timeout=s.ping_timeout,
                on_event=self._worker_event,
                on_exit=self._worker_exit,
            )
        results = await asyncio.gather(
            *(slot.start() for slot in self.slots.values()), return_exceptions=True
        )
        for slot, res in zip(self.slots.values(), results, strict=True):
            if isinstance(res, BaseException):
                slot.state = SlotState.FAILED
                slot.last_error = f"worker did not start: {res}"
                log.error("worker %s did not start: %s", slot.id, res)
        self._spawn(self._poll_status())
        self.ready = True
        self.bus.publish("service.ready", devices=list(self.slots))
        if s.scan_on_start:
            await self.scan(wait=False, hash=s.hash_on_start)

    async def stop(self) -> None:
        self.ready = False
        await self.jobs.close()
        for t in list(self._tasks):
            t.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        await asyncio.gather(*(slot.stop() for slot in self.slots.values()), return_exceptions=True)
        await self.wait_for_fills()  # a fill's thread cannot be stopped: let it finish before closing
        if self._cache is not None:
            await asyncio.to_thread(self._cache.close)
        if self._registry is not None:
            self._registry.close()

    def _spawn(self, coro: Awaitable[Any]) -> asyncio.Task[Any]:
        task = asyncio.ensure_future(coro)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)
        return task

    async def _poll_status(self) -> None:
        while True:
            await asyncio.sleep(self.settings.status_poll_s)
            for slot in list(self.slots.values()):
                if slot.state is SlotState.READY:
                    with contextlib.suppress(ProtocolError):
                        await slot.status(timeout=self.settings.ping_timeout)

    # ------------------------------------------------------------------ helpers

    async def _db(self, fn: Callable[..., T], *args: Any, **kwargs: Any) -> T:
        """Registry calls run off the event loop: a scan writing in a thread never stalls the API."""
        return await asyncio.to_thread(fn, *args, **kwargs)

    def check_path(self, path: str) -> Path:
        """``path`` (absolute, or relative to a model root) resolved with symlinks followed;
        PathOutsideRoots unless it lies inside a model root."""
        if "\0" in path:
            raise InvalidReference(f"path {path!r} contains a NUL byte", path=path)
        candidates = [path] if os.path.isabs(path) else [os.path.join(root, path) for root in self.roots]
        for candidate in candidates:
            real = Path(os.path.realpath(candidate))
            if not os.path.isabs(path) and not os.path.exists(real):
                continue
            if self.settings.allow_outside_roots or any(real.is_relative_to(root) for root in self.roots):
                return real
        if not os.path.isabs(path) and not any(os.path.exists(c) for c in candidates):
            raise ModelNotFound(f"no model matches {path!r}: no such path under the model roots", ref=path)
        raise PathOutsideRoots(
            f"path {path!r} resolves to {str(real)!r}, outside every model root", path=path
        )

    async def resolve(self, ref: str) -> ModelRecord:
        """A model by id, name, path (inside a model root) or hash prefix."""
        if "/" in ref or ref.startswith("."):
            ref = str(self.check_path(ref))
        return await self._db(self.registry.resolve, ref)

    def slot(self, device: str) -> WorkerSlot:
        slot = self.slots.get(device)
        if slot is None:
            raise DeviceNotFound(
                f"no worker on device {device!r} (devices: {', '.join(self.slots) or 'none'})", device=device
            )
        return slot

    def _deadline(self, timeout: float | None) -> float:
        return time.monotonic() + (timeout or self.settings.request_timeout)

    async def run_job(
        self,
        kind: str,
        params: dict[str, Any],
        body: Callable[[Job], Awaitable[Any]],
        *,
        wait: bool,
        timeout: float | None = None,
    ) -> dict[str, Any]:
        """Run ``body`` as a job: its result when ``wait`` (errors raised), else the job at once."""
        if not self.ready:
            raise ServiceNotReady("the service is starting or stopping")
        job = self.jobs.submit(kind, body, params)
        if not wait:
            return {"job": job.info()}
        try:
            # the operation's own deadline fires first (and says where it was); this is the backstop
            result = await self.jobs.wait(job, None if timeout is None else timeout + 2.0)
        except TimeoutError:
            self.jobs.cancel(job.id)
            raise ProtocolError(
                f"{kind} ran past its time limit of {timeout} s", ErrorCode.TIMEOUT, job=job.id
            ) from None
        return {"job": job.info(), "result": result}

    # ------------------------------------------------------------------ views

    def tiers(self, record: ModelRecord) -> dict[str, Any]:
        """Where the model is: disk (its file), ram (cached components), vram (per device), failures."""
        cached = {s["component_id"]: s for s in self.cache.segments()} if self._cache else {}
        ram = [
            {"component_id": s["component_id"], "bytes": s["bytes"]}
            for s in cached.values()
            if record.id in s["models"]
        ]
        placements = self.view.of_model(record.id)
        return {
            "disk": {"status": record.status, "path": record.path, "bytes": record.size},
            "ram": ram,
            "vram": [p.info(len(self.leases.holding(p.model_id, p.device))) for p in placements],
            "failed": [f.info() for f in self.view.failures_of(record.id)],
        }

    def device_status(self, device: str) -> dict[str, Any]:
        slot = self.slot(device)
        models = [p.info(len(self.leases.holding(p.model_id, p.device))) for p in self.view.on_device(device)]
        return {**slot.info(), "models": models}

    def status(self) -> dict[str, Any]:
        cache = self._cache.stats() if self._cache else None
        return {
            "ready": self.ready,
            "uptime_seconds": round(time.time() - self.started_at, 3),
            "devices": [self.device_status(d) for d in self.slots],
            "cache": cache,
            "jobs": self.jobs.counts(),
            "leases": len(self.leases.list()),
        }

    def status_json(self) -> bytes:
        """``status()`` as JSON, rebuilt only after an event or when STATUS_MAX_AGE has passed (memory
        figures are polled): hundreds of pollers a second cost one build, not one each."""
        now = time.monotonic()
        cached = self._status_cache
        if cached is None or cached[0] != self.bus.last_id or now - cached[1] > STATUS_MAX_AGE:
            body = json.dumps(self.status(), separators=(",", ":")).encode()
            self._status_cache = cached = (self.bus.last_id, now, body)
        return cached[2]

    async def list_models(self, **filters: Any) -> dict[str, Any]:
        page = await self._db(self.registry.search, **filters)
        out = page.model_dump(mode="json")
        for item in out["items"]:
            item["loaded_on"] = [p.device for p in self.view.of_model(item["id"]) if p.state == "loaded"]
        return out

    async def model_detail(self, ref: str, *, history: int = 20) -> dict[str, Any]:
        record = await self.resolve(ref)
        hist = await self._db(self.registry.history, record.id, history)
        out = record.model_dump(mode="json", exclude={"identification"})
        out["identification"] = {
            k: v
            for k, v in record.identification.model_dump(mode="json").items()
            if k in ("rule", "rules", "confidence", "evidence", "hints", "hint_conflicts", "loadable")
        }
        out["state"] = self.tiers(record)
        out["performance"] = _performance([h.model_dump(mode="json") for h in hist])
        out["history"] = [h.model_dump(mode="json") for h in hist]
        return out

    async def available(self, type: str | None = None) -> list[dict[str, Any]]:
        page = await self._db(self.registry.search, type=type, limit=10_000)
        return [
            {**item.model_dump(mode="json"), "loaded_on": [p.device for p in self.view.of_model(item.id)]}
            for item in page.items
            if item.type not in ("unknown",)
        ]

    async def components(self, type: str | None = None) -> list[dict[str, Any]]:
        def collect() -> list[dict[str, Any]]:
            page = self.registry.search(type=None, limit=10_000)
            seen: dict[str, dict[str, Any]] = {}
            for item in page.items:
                record = self.registry.get(item.id)
                for c in record.components:
                    if type is not None and c.kind.value != type:
                        continue
                    key = c.content_id or f"{record.id}/{c.name}"
                    entry = seen.setdefault(
                        key,
                        {
                            "component_id": c.content_id,
                            "kind": c.kind.value,
                            "base": c.base.value,
                            "bytes": c.bytes,
                            "tensor_count": c.tensor_count,
                            "parameters": c.parameters,
                            "dtypes": c.dtypes,
                            "models": [],
                        },
                    )
                    entry["models"].append({"model_id": record.id, "name": record.name, "component": c.name})
            return list(seen.values())

        comps = await self._db(collect)
        cached = {s["component_id"] for s in self.cache.segments()} if self._cache else set()
        for c in comps:
            c["cached"] = c["component_id"] in cached
        return comps

    # ------------------------------------------------------------------ loading

    async def load(
        self,
        ref: str,
        device: str | None = None,
        *,
        all_devices: bool = False,
        options: LoadOptions | None = None,
        wait: bool = True,
    ) -> dict[str, Any]:
        """Load a model on ``device``, on every device, or where placement puts it."""
        opts = options or LoadOptions()
        record = await self.resolve(ref)
        if device is not None:
            self.slot(device)
        params = {"model_id": record.id, "name": record.name, "device": device, "all_devices": all_devices}

        async def body(job: Job) -> Any:
            if all_devices:
                ready = [s for s in self.slots.values() if s.state is SlotState.READY]
                results = await asyncio.gather(*(self._load_one(record, s, opts, job) for s in ready))
                return {"model_id": record.id, "placements": list(results)}
            slot = self.slot(device) if device else await self._place(record, opts)
            return await self._load_one(record, slot, opts, job)

        return await self.run_job("load", params, body, wait=wait, timeout=opts.timeout)

    async def _place(self, record: ModelRecord, opts: LoadOptions) -> WorkerSlot:
        """The device already holding (or loading) the model; else the one with most free budget
        that fits; else the one where evicting least-valuable unleased models makes room."""
        ready = [s for s in self.slots.values() if s.state is SlotState.READY]
        if not ready:
            raise ProtocolError("no worker is running", ErrorCode.WORKER_DIED)
        for s in ready:
            p = self.view.get(record.id, s.id)
            if p is not None or (record.id, s.id) in self._inflight:
                return s
        need = sum(c.bytes for c in record.components)
        await asyncio.gather(*(s.status() for s in ready), return_exceptions=True)

        def free(s: WorkerSlot) -> int:
            return int(s.memory.get("budget_bytes", 0)) - int(s.memory.get("models_bytes", 0))

        budgets = {s.id: int(s.memory.get("budget_bytes", 0)) for s in ready}
        if all(b < need for b in budgets.values()):
            raise NotPlaceable(
                f"model {record.id} needs {need} bytes, more than the budget of any device ("
                + ", ".join(f"{d}: {b} bytes" for d, b in budgets.items())
                + ")",
                required_bytes=need,
                budgets=budgets,
            )
        fits = [s for s in ready if free(s) >= need]
        if fits:
            return max(fits, key=free)
        after = {
            s.id: free(s) + sum(p.bytes for p in self._evictable(s.id, opts.force, record.id)) for s in ready
        }
        room = [s for s in ready if after[s.id] >= need]
        if room:
            return max(room, key=lambda s: after[s.id])
        evictable = {p.model_id for s in ready for p in self._evictable(s.id, opts.force, record.id)}
        held = {
            s.id: [p.model_id for p in self.view.on_device(s.id) if p.model_id not in evictable]
            for s in ready
        }
        raise NotPlaceable(
            f"model {record.id} needs {need} bytes; no device has room even after evicting the models "
            "that are not leased or kept loaded ("
            + "; ".join(
                f"{s.id}: {after[s.id]} bytes, held by {', '.join(held[s.id]) or 'nothing'}" for s in ready
            )
            + "); unload a model, release its lease, or pass force",
            required_bytes=need,
            devices={s.id: after[s.id] for s in ready},
            held=sorted({m for ms in held.values() for m in ms}),
        )

    async def _load_one(
        self, record: ModelRecord, slot: WorkerSlot, opts: LoadOptions, job: Job
    ) -> dict[str, Any]:
        key = (record.id, slot.id)
        p = self.view.get(*key)
        if p is not None and p.state == "loaded":
            p.last_used = time.time()
            if opts.keep_loaded:
                p.keep_loaded = True
            return {**p.info(), "already_loaded": True}
        joined = self._inflight.get(key)
        if joined is not None:
            job.progress(message=f"joined the load of {record.id} on {slot.id} already in flight", force=True)
            return {**(await asyncio.shield(joined)), "coalesced": True}
        fut: asyncio.Future[dict[str, Any]] = asyncio.get_running_loop().create_future()
        fut.add_done_callback(lambda f: f.cancelled() or f.exception())
        self._inflight[key] = fut
        deadline = self._deadline(opts.timeout)
        try:
            result = await slot.run(
                lambda: self._do_load(record, slot, opts, job, deadline),
                priority=opts.priority,
                deadline=deadline,
                label=f"load {record.id}",
            )
        except BaseException as exc:
            if not fut.done():
                fut.set_exception(
                    exc
                    if isinstance(exc, Exception)
                    else ProtocolError("load cancelled", ErrorCode.CANCELLED)
                )
            raise
        finally:
            self._inflight.pop(key, None)
        fut.set_result(result)
        return result

    async def _component_loads(self, record: ModelRecord) -> list[ComponentLoad]:
        """The worker requests of the model's loadable components (reads headers: off the loop)."""
        spec = await self._db(self.registry.worker_spec, record.id)
        return await asyncio.to_thread(component_requests, record, spec)

    @staticmethod
    def check_file(record: ModelRecord) -> None:
        """Refuse a model whose file was deleted or changed since it was registered: what the
        registry says of it (type, layout, components) may no longer hold."""
        f = record.file
        if f is None:
            return
        try:
            st = os.stat(f.path)
        except OSError as exc:
            raise ProtocolError(
                f"model {record.id}: {f.path} is gone since it was registered ({exc.strerror}); rescan the roots",
                ErrorCode.FILE_NOT_FOUND,
                path=f.path,
            ) from None
        if f.kind == "file" and (st.st_size != f.size or st.st_mtime_ns != f.mtime_ns):
            raise ProtocolError(
                f"model {record.id}: {f.path} changed since it was registered (size {f.size} -> {st.st_size}); "
                "rescan the roots (POST /api/model/cache/refresh) before loading it",
                ErrorCode.INVALID_MODEL_FILE,
                path=f.path,
            )

    async def _do_load(
        self, record: ModelRecord, slot: WorkerSlot, opts: LoadOptions, job: Job, deadline: float
    ) -> dict[str, Any]:
        started = time.perf_counter()
        self.check_file(record)
        loads = await self._component_loads(record)
        need = sum(c.bytes for c in loads)
        evicted = await self._make_room(slot, need, record.id, opts.force)
        p = Placement(record.id, record.name, record.type, slot.id, keep_loaded=opts.keep_loaded)
        self.view.put(p)
        self.bus.publish("model.loading", model_id=record.id, device=slot.id)
        done: list[str] = []
        loop = asyncio.get_running_loop()
        try:
            for i, planned in enumerate(loads):
                label = planned.component or record.type
                job.progress(step=label, component=i + 1, components=len(loads), force=True)
                t_cache = time.perf_counter()
                load = await self._via_cache(record, planned, opts, job, loop)
                cache_seconds = time.perf_counter() - t_cache
                pin = (
                    self.cache.acquire(load.segment.component_id)
                    if load.segment
                    else contextlib.nullcontext()
                )
                with pin:
                    result = await slot.call(
                        CommandType.LOAD_MODEL,
                        load.request,
                        timeout=max(0.1, deadline - time.monotonic()),
                        on_progress=lambda data: job.progress(**data),
                    )
                done.append(load.request["name"])
                p.components[label] = load.request["name"]
                p.sources[label] = load.source
                if load.segment is not None:
                    p.segments[label] = load.segment.component_id
                p.bytes += int(result.get("bytes", 0))
                p.timings[label] = {
                    "cache": round(cache_seconds, 6),
                    "worker": float(result.get("load_seconds", 0.0)),
                    **{k: round(float(v), 6) for k, v in dict(result.get("timings") or {}).items()},
                }
                slot.memory = dict(result.get("memory", slot.memory))
                self.metrics.observe_load(slot.id, load.source, float(result.get("load_seconds", 0.0)))
        except BaseException as exc:
            self.view.remove(record.id, slot.id)
            for name in done:  # roll back: a half-loaded model is not left behind
                with contextlib.suppress(ProtocolError, asyncio.CancelledError):
                    await slot.call(CommandType.UNLOAD_MODEL, {"name": name}, timeout=30)
            code = exc.code.value if isinstance(exc, ProtocolError) else ErrorCode.CANCELLED.value
            reason = exc.message if isinstance(exc, ProtocolError) else "cancelled"
            self.view.fail(record.id, slot.id, code, reason)
            self.bus.publish(
                "model.failed", model_id=record.id, device=slot.id, error_code=code, error=reason
            )
            await self._history(
                record.id, "load.failed", {"device": slot.id, "error_code": code, "error": reason}
            )
            raise
        p.state = "loaded"
        p.loaded_at = p.last_used = time.time()
        p.load_seconds = round(time.perf_counter() - started, 6)
        info = {**p.info(), "evicted": evicted}
        self.bus.publish("model.loaded", model_id=record.id, device=slot.id, placement=p.info())
        await self._history(
            record.id,
            "load",
            {"device": slot.id, "seconds": p.load_seconds, "bytes": p.bytes, "sources": p.sources},
        )
        return info

    async def _via_cache(
        self,
        record: ModelRecord,
        load: ComponentLoad,
        opts: LoadOptions,
        job: Job,
        loop: asyncio.AbstractEventLoop,
    ) -> ComponentLoad:
        if not (self.settings.cache_loads or opts.require_cache):
            return load

        def progress(done: int, total: int) -> None:
            loop.call_soon_threadsafe(lambda: job.progress(cache_bytes_done=done, cache_bytes_total=total))

        try:
            if opts.require_cache or self.settings.cache_fill == "before":
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
            raise ProtocolError(
                f"model {record.id}: cannot read {exc.filename or load.request['path']}: {exc.strerror or exc}",
                ErrorCode.FILE_NOT_FOUND,
                path=str(exc.filename or load.request["path"]),
            ) from None
        except CacheFull:
            if opts.require_cache:
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

    def _evictable(self, device: str, force: bool, keep: str) -> list[Placement]:
        out = [
            p
            for p in self.view.on_device(device)
            if p.state == "loaded"
            and p.model_id != keep
            and (force or (not p.keep_loaded and not self.leases.holding(p.model_id, device)))
        ]
        return sorted(out, key=lambda p: p.last_used)

    async def _make_room(self, slot: WorkerSlot, need: int, keep: str, force: bool) -> list[str]:
        await slot.status()
        budget = int(slot.memory.get("budget_bytes", 0))
        used = int(slot.memory.get("models_bytes", 0))
        if need > budget:
            raise NotPlaceable(
                f"model {keep} needs {need} bytes; the budget of {slot.id} is {budget} bytes",
                required_bytes=need,
                budget_bytes=budget,
                device=slot.id,
            )
        if used + need <= budget:
            return []
        chosen: list[Placement] = []
        freed = 0
        for p in self._evictable(slot.id, force, keep):
            if used + need - freed <= budget:
                break
            chosen.append(p)
            freed += p.bytes
        if used + need - freed > budget:
            held = [
                p.model_id for p in self.view.on_device(slot.id) if p not in chosen and p.model_id != keep
            ]
            raise NotPlaceable(
                f"model {keep} needs {need} bytes on {slot.id}: {budget - used} free of {budget}, and the "
                f"other models there are leased, kept loaded or busy ({', '.join(held) or 'none'}); "
                "unload one, release its lease, or pass force",
                required_bytes=need,
                free_bytes=budget - used,
                device=slot.id,
                held=held,
            )
        for p in chosen:
            self.leases.revoke(p.model_id, slot.id)  # only force reaches a leased model
            await self._unload_placement(slot, p, reason="evicted")
        return [p.model_id for p in chosen]

    # ------------------------------------------------------------------ unloading

    async def unload(
        self, ref: str, device: str | None = None, *, force: bool = False, timeout: float | None = None
    ) -> dict[str, Any]:
        record = await self.resolve(ref)
        placements = [p for p in self.view.of_model(record.id) if device is None or p.device == device]
        if device is not None:
            self.slot(device)
        if not placements:
            where = f"on {device}" if device else "on any device"
            raise NotLoaded(f"model {record.id} ({record.name}) is not loaded {where}", model_id=record.id)
        results = []
        for p in placements:
            results.append(await self._unload_checked(p, force=force, timeout=timeout))
        return {"model_id": record.id, "unloaded": results}

    async def _unload_checked(self, p: Placement, *, force: bool, timeout: float | None) -> dict[str, Any]:
        slot = self.slot(p.device)
        leases = self.leases.holding(p.model_id, p.device)
        if leases and not force:
            raise ModelInUse(
                f"model {p.model_id} on {p.device} is held by {len(leases)} lease(s); release them or pass force",
                leases=[lease.id for lease in leases],
                model_id=p.model_id,
                device=p.device,
            )
        key = (p.model_id, p.device)
        if p.state != "loaded":
            if not force:
                raise ModelInUse(f"model {p.model_id} on {p.device} is {p.state}; retry or pass force")
            fut = self._inflight.get(key)
            if fut is not None:
                with contextlib.suppress(Exception):
                    await asyncio.shield(fut)
        if force:
            self.leases.revoke(p.model_id, p.device)
        current = self.view.get(*key)
        if current is None:
            return {"model_id": p.model_id, "device": p.device, "freed_bytes": 0}
        return await slot.run(
            lambda: self._unload_placement(slot, current, reason="requested"),
            priority=Priority.HIGH,
            deadline=self._deadline(timeout),
            label=f"unload {p.model_id}",
        )

    async def _unload_placement(self, slot: WorkerSlot, p: Placement, *, reason: str) -> dict[str, Any]:
        p.state = "unloading"
        freed = 0
        result: dict[str, Any] = {}
        try:
            for name in p.components.values():
                try:
                    result = await slot.call(CommandType.UNLOAD_MODEL, {"name": name}, timeout=60)
                    freed += int(result.get("freed_bytes", 0))
                except ProtocolError as exc:
                    if exc.code is not ErrorCode.MODEL_NOT_FOUND:
                        raise
        except BaseException:
            p.state = "loaded"
            raise
        self.view.remove(p.model_id, p.device)
        if result:
            slot.memory = dict(result.get("memory_after", slot.memory))
        self.bus.publish(
            "model.unloaded", model_id=p.model_id, device=p.device, reason=reason, freed_bytes=freed
        )
        await self._history(
            p.model_id, "unload", {"device": p.device, "reason": reason, "freed_bytes": freed}
        )
        return {"model_id": p.model_id, "device": p.device, "freed_bytes": freed, "reason": reason,
                "memory_after": slot.memory}  # fmt: skip

    async def unload_all(self, device: str | None = None, *, force: bool = False) -> dict[str, Any]:
        if device is not None:
            self.slot(device)
        placements = [p for p in list(self.view.placements.values()) if device is None or p.device == device]
        unloaded, refused = [], []
        for p in placements:
            try:
                unloaded.append(await self._unload_checked(p, force=force, timeout=None))
            except ModelInUse as exc:
                refused.append({"model_id": p.model_id, "device": p.device, "error": exc.message})
        return {"unloaded": unloaded, "refused": refused}

    # ------------------------------------------------------------------ worker operations on loaded models

    def _placements_for(self, record: ModelRecord, device: str | None) -> list[Placement]:
        ps = [p for p in self.view.of_model(record.id) if p.state == "loaded" and device in (None, p.device)]
        if not ps:
            raise NotLoaded(
                f"model {record.id} ({record.name}) is not loaded"
                + (f" on {device}" if device else "")
                + "; load it first",
                model_id=record.id,
            )
        return ps

    async def model_operation(
        self,
        op: str,
        ref: str | None,
        device: str | None,
        data: dict[str, Any],
        *,
        component: str | None = None,
        wait: bool = True,
        timeout: float | None = None,
        priority: int = Priority.NORMAL,
    ) -> dict[str, Any]:
        """validate / benchmark / optimize on every loaded component of a model (``ref``) or of every
        loaded model (``ref`` None). The result is always a list: one entry (``model_id``, ``device``,
        ``components``) per placement, whether one model on one device or many."""
        command = {
            "validate": CommandType.VALIDATE_MODEL,
            "benchmark": CommandType.BENCHMARK_MODEL,
            "optimize": CommandType.OPTIMIZE_MODEL,
        }[op]
        if ref is not None:
            record = await self.resolve(ref)
            placements = self._placements_for(record, device)
        else:
            placements = [
                p for p in self.view.placements.values() if p.state == "loaded" and device in (None, p.device)
            ]
        params = {"model_id": None if ref is None else placements[0].model_id, "device": device, **data}

        async def body(job: Job) -> Any:
            out: list[dict[str, Any]] = []
            for i, p in enumerate(placements):
                slot = self.slot(p.device)
                job.progress(done=i, total=len(placements), model_id=p.model_id, device=p.device, force=True)

                def run(p: Placement = p, slot: WorkerSlot = slot) -> Awaitable[dict[str, Any]]:
                    return self._on_components(command, op, slot, p, data, component, job)

                out.append(
                    await slot.run(
                        run,
                        priority=priority,
                        deadline=self._deadline(timeout),
                        label=f"{op} {p.model_id}",
                    )
                )
            job.progress(done=len(placements), total=len(placements), force=True)
            return out

        return await self.run_job(op, params, body, wait=wait, timeout=timeout)

    async def _on_components(
        self,
        command: CommandType,
        op: str,
        slot: WorkerSlot,
        p: Placement,
        data: dict[str, Any],
        component: str | None,
        job: Job,
    ) -> dict[str, Any]:
        results: dict[str, Any] = {}
        for label, name in p.components.items():
            if component is not None and component != label:
                continue
            results[label] = await slot.call(
                command,
                {**data, "name": name},
                timeout=self.settings.request_timeout,
                on_progress=lambda data: job.progress(**data),
            )
        if component is not None and not results:
            raise NotLoaded(
                f"model {p.model_id} has no loaded component {component!r} ({', '.join(p.components)})"
            )
        p.last_used = time.time()
        out = {"model_id": p.model_id, "device": p.device, "components": results}
        await self._history(p.model_id, op, {"device": p.device, "components": _summary(op, results)})
        return out

    # ------------------------------------------------------------------ LoRA on loaded models

    async def apply_lora(
        self,
        ref: str,
        lora_ref: str,
        *,
        device: str | None = None,
        strength: float = 1.0,
        timeout: float | None = None,
        priority: int = Priority.NORMAL,
    ) -> dict[str, Any]:
        """Patch every placement of a loaded model (or the one on ``device``) with a registered LoRA."""
        record = await self.resolve(ref)
        lora = await self.resolve(lora_ref)
        if lora.type != "lora" or lora.path is None:
            raise ProtocolError(
                f"{lora_ref!r} is a {lora.type}, not a LoRA", ErrorCode.INVALID_REQUEST, field="lora_id"
            )
        self.check_file(lora)
        out = []
        for p in self._placements_for(record, device):
            slot = self.slot(p.device)
            targets = {
                r: n
                for r, n in p.components.items()
                if r in ("unet", "transformer", "text_encoder", "text_encoder_2")
            }
            name = f"{lora.id}@{p.model_id}"
            data = {"name": name, "path": lora.path, "targets": targets, "strength": strength}

            async def run(slot: WorkerSlot = slot, data: dict[str, Any] = data) -> dict[str, Any]:
                if any(
                    entry["name"] == data["name"]
                    for q in self.view.on_device(slot.id)
                    for entry in q.loras.values()
                ):
                    await slot.call(CommandType.UNLOAD_LORA, {"name": data["name"]}, timeout=60)  # re-apply
                return await slot.call(CommandType.LOAD_LORA, data, timeout=self.settings.request_timeout)

            result = await slot.run(
                run, priority=priority, deadline=self._deadline(timeout), label=f"lora {lora.id}"
            )
            p.loras[lora.id] = {"name": name, "lora": lora.name, "strength": strength}
            p.last_used = time.time()
            out.append({"device": p.device, **result})
            self.bus.publish(
                "model.lora", model_id=p.model_id, device=p.device, lora_id=lora.id, strength=strength
            )
        await self._history(record.id, "lora.apply", {"lora_id": lora.id, "strength": strength})
        return {"model_id": record.id, "lora_id": lora.id, "applied": out}

    async def lora_strength(
        self, ref: str, lora_ref: str, strength: float, device: str | None = None
    ) -> dict[str, Any]:
        return await self._lora_each(ref, lora_ref, device, CommandType.SET_LORA_STRENGTH, strength)

    async def remove_lora(self, ref: str, lora_ref: str, device: str | None = None) -> dict[str, Any]:
        return await self._lora_each(ref, lora_ref, device, CommandType.UNLOAD_LORA, None)

    async def _lora_each(
        self, ref: str, lora_ref: str, device: str | None, command: CommandType, strength: float | None
    ) -> dict[str, Any]:
        record = await self.resolve(ref)
        lora = await self.resolve(lora_ref)
        held = [p for p in self._placements_for(record, device) if lora.id in p.loras]
        if not held:
            raise NotLoaded(
                f"LoRA {lora.id} ({lora.name}) is not applied to model {record.id}", lora_id=lora.id
            )
        out = []
        for p in held:
            slot = self.slot(p.device)
            data: dict[str, Any] = {"name": p.loras[lora.id]["name"]}
            if strength is not None:
                data["strength"] = strength
            result = await slot.run(
                lambda slot=slot, data=data: slot.call(command, data, timeout=60),  # type: ignore[misc]
                priority=Priority.HIGH,
                deadline=self._deadline(None),
                label=f"lora {lora.id}",
            )
            if strength is None:
                del p.loras[lora.id]
            else:
                p.loras[lora.id]["strength"] = strength
            out.append({"device": p.device, **result})
        return {"model_id": record.id, "lora_id": lora.id, "devices": out}

    # ------------------------------------------------------------------ cache

    def cache_view(self) -> dict[str, Any]:
        return {"stats": self.cache.stats(), "segments": self.cache.segments()}

    async def cache_model(self, ref: str, *, wait: bool = True) -> dict[str, Any]:
        record = await self.resolve(ref)
        loop = asyncio.get_running_loop()

        async def body(job: Job) -> Any:
            self.check_file(record)
            loads = await self._component_loads(record)
            out = []
            for i, planned in enumerate(loads):
                job.progress(component=i + 1, components=len(loads), step=planned.component, force=True)
                load = await self._via_cache(record, planned, LoadOptions(require_cache=True), job, loop)
                if load.segment is not None:
                    out.append({"component": load.component, **load.segment.info()})
            return {"model_id": record.id, "segments": out}

        return await self.run_job("cache", {"model_id": record.id}, body, wait=wait)

    async def cache_component(self, component_id: str, *, wait: bool = True) -> dict[str, Any]:
        if component_id in self.cache:
            return {"result": {"segments": [self.cache.get(component_id).info()]}}
        owners = await self._db(self.registry.models_with_component, component_id)
        if not owners:
            raise ProtocolError(
                f"no registered model has a component with content id {component_id!r} (hash the models first)",
                ErrorCode.MODEL_NOT_FOUND,
                component_id=component_id,
            )
        model_id, name = owners[0]
        record = await self._db(self.registry.get, model_id)
        loop = asyncio.get_running_loop()

        async def body(job: Job) -> Any:
            load = next(c for c in await self._component_loads(record) if c.component == name)
            load = await self._via_cache(record, load, LoadOptions(require_cache=True), job, loop)
            return {"segments": [load.segment.info()] if load.segment else []}

        return await self.run_job("cache", {"component_id": component_id}, body, wait=wait)

    def cache_drop(self, component_id: str, *, force: bool = False) -> dict[str, Any]:
        freed = self.cache.drop(component_id, force=force)
        return {"component_id": component_id, "freed_bytes": freed}

    def cache_clear(self, *, force: bool = False) -> dict[str, Any]:
        before = self.cache.stats()["segments"]
        freed = self.cache.drop_all(force=force)
        return {"dropped": before - self.cache.stats()["segments"], "freed_bytes": freed}

    def _segment_removed(self, seg: Segment) -> None:
        """Called by the cache (any thread) for every dropped or evicted segment: workers unmap it."""
        loop = self._loop
        if loop is None or loop.is_closed():
            return
        loop.call_soon_threadsafe(self._release_segment, str(seg.path), seg.component_id)

    def _release_segment(self, path: str, component_id: str) -> None:
        for slot in self.slots.values():
            if slot.state is SlotState.READY and slot.proc is not None:
                slot.proc.submit(CommandType.RELEASE_SEGMENTS, {"paths": [path]})
        self.bus.publish("cache.removed", component_id=component_id)

    # ------------------------------------------------------------------ discovery

    async def scan(self, *, wait: bool = True, hash: bool = True) -> dict[str, Any]:
        loop = asyncio.get_running_loop()
        roots = [str(r) for r in self.roots]

        async def body(job: Job) -> Any:
            def on_scan(p: ScanProgress) -> None:
                loop.call_soon_threadsafe(
                    lambda: job.progress(
                        phase=p.phase, found=p.found, done=p.done, total=p.total, unit="files"
                    )
                )

            scanner = Scanner(
                self.registry,
                roots,
                allow_outside_roots=self.settings.allow_outside_roots,
                workers=self.settings.scan_threads,
            )
            report = await asyncio.to_thread(scanner.scan, on_scan)
            result: dict[str, Any] = {
                "summary": report.summary(),
                "seconds": round(report.seconds, 3),
                "rejected": [e.to_json() for e in report.entries if e.status == "rejected"][:200],
                "missing": report.missing[:200],
            }
            self.bus.publish("registry.scanned", summary=result["summary"])
            if hash:
                cancel = threading.Event()
                job.on_cancel(cancel.set)

                def on_hash(h: HashProgress) -> None:
                    loop.call_soon_threadsafe(
                        lambda: job.progress(
                            phase="hash",
                            done=h.bytes_done,
                            total=h.bytes_total,
                            unit="bytes",
                            current=h.current,
                        )
                    )

                hreport = await asyncio.to_thread(Hasher(self.registry).run, progress=on_hash, cancel=cancel)
                result["hashed"] = {
                    "files": hreport.hashed,
                    "bytes": hreport.bytes,
                    "errors": len(hreport.errors),
                }
            return result

        return await self.run_job("scan", {"roots": roots, "hash": hash}, body, wait=wait)

    # ------------------------------------------------------------------ registry pass-through

    async def search(self, **filters: Any) -> dict[str, Any]:
        return await self.list_models(**filters)

    async def metadata(self, ref: str) -> dict[str, Any]:
        record = await self.resolve(ref)
        return {"model_id": record.id, "name": record.name, **record.meta.model_dump(mode="json")}

    async def set_metadata(self, ref: str, values: dict[str, Any]) -> dict[str, Any]:
        record = await self.resolve(ref)
        await self._db(self.registry.set_meta, record.id, values)
        self.bus.publish("model.metadata", model_id=record.id, keys=sorted(values))
        return await self.metadata(record.id)

    async def _history(self, model_id: str, op: str, data: dict[str, Any]) -> None:
        try:
            await self._db(self.registry.add_history, model_id, op, data)
        except ProtocolError as exc:  # a model deleted meanwhile: the operation itself stands
            log.warning("history of %s not recorded: %s", model_id, exc)

    # ------------------------------------------------------------------ leases

    async def grant_lease(
        self, ref: str, device: str | None, holder: str, ttl: float | None
    ) -> dict[str, Any]:
        record = await self.resolve(ref)
        if device is not None:
            self.slot(device)
        lease = self.leases.grant(record.id, device, holder, ttl or self.settings.lease_ttl)
        self.bus.publish("lease.granted", lease=lease.info())
        return lease.info()

    # ------------------------------------------------------------------ worker events, deaths, reconciliation

    def _worker_event(self, slot: WorkerSlot, event: Event) -> None:
        data = dict(event.data)
        if event.event is EventType.MEMORY_PRESSURE:
            slot.memory = data
            self.bus.publish("worker.memory_pressure", device=slot.id, memory=data)
            return
        if event.event is EventType.STATE:
            self.bus.publish("worker.state", device=slot.id, **data)
            if data.get("state") == "unloaded" and data.get("reason") not in (None, "cleanup"):
                name = str(data.get("name", ""))
                for p in self.view.on_device(slot.id):
                    if p.state == "loaded" and name in p.components.values():
                        self.view.remove(p.model_id, p.device)
                        self.bus.publish(
                            "model.lost", model_id=p.model_id, device=slot.id, reason=data.get("reason")
                        )

    def _worker_exit(self, slot: WorkerSlot, code: int | None) -> None:
        self._spawn(self._recover(slot, code))

    async def _recover(self, slot: WorkerSlot, code: int | None) -> None:
        lost = self.view.on_device(slot.id)
        keep = [p for p in lost if p.keep_loaded]
        for p in lost:
            self.view.remove(p.model_id, p.device)
            self.bus.publish(
                "model.lost", model_id=p.model_id, device=slot.id, reason=f"worker exited ({code})"
            )
        self.bus.publish("worker.exited", device=slot.id, code=code, lost=[p.model_id for p in lost])
        window = time.time() - self.settings.restart_window_s
        if len([t for t in slot.restarts if t > window]) >= self.settings.worker_max_restarts:
            slot.state = SlotState.FAILED
            slot.last_error = f"gave up after {self.settings.worker_max_restarts} restarts: {slot.last_error}"
            self.bus.publish("worker.failed", device=slot.id, error=slot.last_error)
            return
        try:
            await slot.restart()
        except Exception as exc:
            slot.state = SlotState.FAILED
            slot.last_error = f"restart failed: {exc}"
            self.bus.publish("worker.failed", device=slot.id, error=slot.last_error)
            return
        report = await self.reconcile(slot.id)
        self.bus.publish(
            "worker.restarted", device=slot.id, pid=slot.proc.pid if slot.proc else None, **report
        )
        for p in keep:
            with contextlib.suppress(ProtocolError):
                await self.load(p.model_id, slot.id, options=LoadOptions(keep_loaded=True), wait=False)

    async def reconcile(self, device: str) -> dict[str, Any]:
        """Make the view of ``device`` match the worker's full state: placements whose components
        the worker no longer holds are dropped; models the worker holds that the view lacks are
        adopted (when the registry knows them) or reported as unmanaged."""
        slot = self.slot(device)
        info = await slot.call(CommandType.GET_MODEL_INFO, {}, timeout=30)
        held = {m["name"]: m for m in info.get("models", [])}
        slot.memory = dict(info.get("memory", slot.memory))
        lost, adopted, unmanaged = [], [], []
        for p in self.view.on_device(device):
            if p.state == "loaded" and any(n not in held for n in p.components.values()):
                self.view.remove(p.model_id, device)
                lost.append(p.model_id)
                self.bus.publish("model.lost", model_id=p.model_id, device=device, reason="reconciled")
        claimed = {n for p in self.view.on_device(device) for n in p.components.values()}
        for name, m in held.items():
            if name in claimed:
                continue
            model_id, _, component = name.partition("/")
            try:
                record = await self._db(self.registry.get, model_id)
            except ProtocolError:
                unmanaged.append(name)
                continue
            p = self.view.get(model_id, device) or Placement(
                record.id, record.name, record.type, device, state="loaded"
            )
            label = component or record.type
            p.components[label] = name
            p.sources.setdefault(label, "unknown")
            p.bytes += int(m.get("bytes", 0))
            p.loaded_at = p.loaded_at or float(m.get("loaded_at", time.time()))
            self.view.put(p)
            adopted.append(name)
        return {"lost": lost, "adopted": adopted, "unmanaged": unmanaged}


def _summary(op: str, results: dict[str, Any]) -> dict[str, Any]:
    """What the history keeps of an operation's result: the figures, not the payload."""
    keep = {
        "validate": ("passed", "level", "seconds"),
        "benchmark": ("figures", "class_name", "seconds"),
        "optimize": ("applied", "latency_before_s", "latency_after_s", "speedup"),
    }[op]
    return {name: {k: v for k, v in r.items() if k in keep} for name, r in results.items()}


def _performance(history: list[dict[str, Any]]) -> dict[str, Any]:
    """Load times, last validation and benchmark figures, from the history (newest first)."""
    loads = [h["data"].get("seconds") for h in history if h["op"] == "load" and h["data"].get("seconds")]
    last = {
        op: next((h for h in history if h["op"] == op), None) for op in ("validate", "benchmark", "optimize")
    }
    return {
        "loads": len(loads),
        "last_load_seconds": loads[0] if loads else None,
        "best_load_seconds": min(loads) if loads else None,
        **{f"last_{op}": (h["data"] | {"at": h["at"]}) if h else None for op, h in last.items()},
    }
