"""Loads: a model onto a device and off it again.

``load`` resolves the model, asks the placement policy for a device (unless one is named),
queues the load on that device, and coalesces concurrent loads of one model on one device into
one. A load makes room first (evicting what the policy picks), then loads each component through
the cache feed; any failure rolls back the components already loaded, so no half-loaded model is
left behind. ``unload`` honours leases and ``force``. Leases are granted here too, since they hold
placements. A load of a model loaded, or being loaded, in another form is refused or reloaded
(``reload.py``, on the forms of ``forms.py``). (About 550 lines: load, unload, eviction and idle
expiry share one flow of checks on the same placements and queues; split apart, each would reach
back into the others.)
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from typing import Any

from modelkeeper.orchestrator.cachefeed import CacheFeed
from modelkeeper.orchestrator.catalog import Catalog
from modelkeeper.orchestrator.coalesce import coalesced
from modelkeeper.orchestrator.errors import ModelInUse, NotLoaded, NotPlaceable
from modelkeeper.orchestrator.events import EventBus
from modelkeeper.orchestrator.jobs import Job, JobManager
from modelkeeper.orchestrator.leases import LeaseTable
from modelkeeper.orchestrator.loading import ComponentLoad
from modelkeeper.orchestrator.metrics import Metrics
from modelkeeper.orchestrator.options import LoadOptions
from modelkeeper.orchestrator.placement import DeviceView, Resident, choose_device, plan_eviction
from modelkeeper.orchestrator.pool import WorkerPool
from modelkeeper.orchestrator.reload import Reloads
from modelkeeper.orchestrator.settings import Settings
from modelkeeper.orchestrator.state import Placement, PlacementState, StateView, held_bytes
from modelkeeper.orchestrator.wording import in_users_words
from modelkeeper.orchestrator.workers import Priority, WorkerSlot
from modelkeeper.protocol.commands import CommandType
from modelkeeper.protocol.errors import ErrorCode, ProtocolError
from modelkeeper.protocol.messages import LoadResult, UnloadRequest, UnloadResult
from modelkeeper.registry import ModelRecord


class Loads:
    def __init__(
        self,
        settings: Settings,
        catalog: Catalog,
        feed: CacheFeed,
        pool: WorkerPool,
        view: StateView,
        leases: LeaseTable,
        jobs: JobManager,
        bus: EventBus,
        metrics: Metrics,
    ) -> None:
        self.settings = settings
        self.catalog = catalog
        self.feed = feed
        self.pool = pool
        self.view = view
        self.leases = leases
        self.jobs = jobs
        self.bus = bus
        self.metrics = metrics
        self.inflight: dict[tuple[str, str], asyncio.Future[dict[str, Any]]] = {}
        self.reloads = Reloads(catalog, view, self._unload_checked)  # loaded in another form

    def deadline(self, timeout: float | None) -> float:
        return time.monotonic() + (timeout or self.settings.request_timeout)

    # ------------------------------------------------------------------ placement

    def device_view(self, slot: WorkerSlot) -> DeviceView:
        """What the placement policy sees of one device."""
        residents = tuple(
            Resident(
                p.model_id,
                p.bytes,
                p.last_used,
                loaded=p.state is PlacementState.LOADED,
                leased=bool(self.leases.holding(p.model_id, slot.id)),
                keep_loaded=p.keep_loaded,
                shares=tuple((key, p.component_bytes.get(label, 0)) for label, key in p.shares.items()),
                handle=p.handle or p.name,
            )
            for p in self.view.on_device(slot.id)
        )
        loading = frozenset(m for m, d in self.inflight if d == slot.id)
        return DeviceView(slot.id, slot.budget_bytes, slot.used_bytes, residents, loading)

    async def place(self, record: ModelRecord, opts: LoadOptions) -> WorkerSlot:
        """The device placement chooses for ``record`` (memory figures refreshed first)."""
        self.pool.check_ready()
        ready = self.pool.ready()
        if not ready:
            raise ProtocolError("no worker is running: every one is restarting", ErrorCode.WORKER_DIED)
        if not any(self.device_view(s).holds(record.id) for s in ready):
            await asyncio.gather(*(s.status() for s in ready), return_exceptions=True)
        need = opts.resident_need(await self.stored_bytes(record, opts), max(s.budget_bytes for s in ready))
        wants = await self.shared_parts(record, opts)
        views = [self.device_view(s) for s in ready]
        try:
            device = choose_device(views, record.id, need, force=opts.force, wants=wants, name=record.handle)
        except NotPlaceable:
            if not opts.may_stream:
                raise
            device = choose_device(views, record.id, 0, wants=wants)  # no room whole: it streams
        return self.pool.slot(device)

    async def stored_bytes(self, record: ModelRecord, opts: LoadOptions) -> int:
        """What the model will hold on a device: its components and its parts' (``completion.py``)."""
        plan = await self.catalog.parts(record)
        parts = list(plan.records.values()) if plan is not None else []
        return sum(opts.stored_bytes(r) for r in (record, *parts))

    async def shared_parts(
        self, record: ModelRecord, opts: LoadOptions, loads: list[ComponentLoad] | None = None
    ) -> dict[str, int]:
        """Share key -> stored bytes of the model's parts (among ``loads``, its component loads when
        given) that a worker holds once for every placement on its device that loads them in the
        same form (docs/PARTS.md): placement counts them once."""
        plan = await self.catalog.parts(record)
        if plan is None:
            return {}
        out: dict[str, int] = {}
        for load in loads if loads is not None else await self.catalog.component_loads(record):
            key = opts.request(load.request).share_key()
            part = plan.records.get(load.component)
            if key is not None and part is not None:
                out[key] = opts.stored_bytes(part)
        return out

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
        """Load a model on ``device``, on every device, or where placement puts it: a job."""
        opts = options or LoadOptions()
        record = await self.catalog.resolve(ref)
        if device is not None:
            self.pool.slot(device).check_usable()  # a device whose worker did not start says why
        else:
            self.pool.check_ready()
        # what the caller must change is refused before any job: no model to load, a file gone,
        # loaded in another form (forms.py)
        self.catalog.check_loadable(record)
        if not self.view.of_model(record.id):  # loaded already: answered from its placement
            await self.catalog.verify_file(record)
        if not opts.reload:
            await self.reloads.check(record, None if all_devices else device, opts)
        plan = await self.catalog.parts(record)
        if plan is not None:
            plan.check()  # a missing or refused part is the caller's to fix: refused before any job
        params = {"model_id": record.id, "name": record.name, "device": device, "all_devices": all_devices}

        async def body(job: Job) -> Any:
            if all_devices:
                results = await asyncio.gather(
                    *(self.load_on(record, s, opts, job) for s in self.pool.ready())
                )
                return {"model_id": record.id, "placements": list(results)}
            slot = self.pool.slot(device) if device else await self.place(record, opts)
            return await self.load_on(record, slot, opts, job)

        return await self.jobs.run("load", params, body, wait=wait, timeout=opts.timeout, queued=True)

    async def load_on(
        self, record: ModelRecord, slot: WorkerSlot, opts: LoadOptions, job: Job
    ) -> dict[str, Any]:
        """``record`` on ``slot``: at once when loaded there, joined when a load is in flight, else queued."""
        key = (record.id, slot.id)
        settled = await self.reloads.settle(record, slot.id, opts, job)  # loaded there already
        if settled.answer is not None:
            job.start()  # answered at once: nothing to wait for
            return settled.answer
        opts = settled.opts
        if key in self.inflight:  # (a load may have started while a reload unloaded)
            self.reloads.check_joining(record, slot.id, opts)
        deadline = self.deadline(opts.timeout)
        asking = contextlib.nullcontext() if key in self.inflight else self.reloads.asking(key, opts)
        with asking:
            result = await coalesced(
                self.inflight,
                key,
                job,
                f"the load of {record.id} on {slot.id}",
                lambda: slot.run(
                    lambda: self._load(record, slot, opts, job, deadline),
                    priority=opts.priority,
                    deadline=deadline,
                    label=f"load {record.id}",
                ),
            )
        job.start()  # a load joined runs as the one it joined (started already: nothing changes)
        if settled.reloaded is None:
            return result
        return {**result, "reloaded": settled.reloaded, "dropped_loras": settled.dropped}

    async def _load(
        self, record: ModelRecord, slot: WorkerSlot, opts: LoadOptions, job: Job, deadline: float
    ) -> dict[str, Any]:
        job.start()  # queued until now: its device's queue runs it
        started = time.perf_counter()
        await self.catalog.verify_file(record)
        loads = await self.catalog.component_loads(record)
        await slot.status()
        need = opts.resident_need(await self.stored_bytes(record, opts), slot.budget_bytes)
        wants = await self.shared_parts(record, opts, loads)
        try:
            evicted = await self.make_room(slot, record.id, need, opts.force, wants, name=record.handle)
        except NotPlaceable:  # refused before anything was unloaded
            if not opts.may_stream:
                raise
            evicted = []  # no room for it whole: it streams, evicting nothing
        keep_alive = self.settings.keep_alive if opts.keep_alive is None else opts.keep_alive
        p = Placement(
            record.id,
            record.name,
            record.type,
            slot.id,
            keep_loaded=opts.keep_loaded,
            keep_alive=keep_alive,
            handle=record.handle,
            form=opts.form(),
        )
        self.view.put(p)
        self.bus.publish("model.loading", model_id=record.id, device=slot.id)
        done: list[str] = []
        dtypes: list[str | None] = []
        storages: list[str | None] = []
        try:
            for i, planned in enumerate(loads):
                label = planned.component or record.type
                job.step(label, component=i + 1, components=len(loads))
                t_cache = time.perf_counter()
                load = await self.feed.route(record, planned, job, require=opts.require_cache)
                load.request = opts.request(load.request)
                cache_seconds = time.perf_counter() - t_cache
                pin = (
                    self.feed.cache.acquire(load.segment.component_id)
                    if load.segment
                    else contextlib.nullcontext()
                )
                with pin:
                    try:
                        result = await slot.call(
                            CommandType.LOAD_MODEL,
                            load.request,
                            LoadResult,
                            timeout=max(0.1, deadline - time.monotonic()),
                            on_progress=job.progress_of(label),
                        )
                    except ProtocolError as exc:
                        named = naming_the_users_file(exc, load, planned)
                        raise in_users_words(named, record.handle, {label: load.request.name}) from None
                done.append(load.request.name)
                dtypes.append(result.dtype)
                storages.append(result.storage)
                p.components[label] = load.request.name
                if load.spec.get("model_id") not in (None, record.id):  # a part that completes it
                    p.parts[label] = load.spec["model_id"]
                p.sources[label] = load.source
                if load.segment is not None:
                    p.segments[label] = load.segment.component_id
                held = held_bytes(result)
                p.bytes += held
                p.component_bytes[label] = held
                if result.share is not None:
                    p.shares[label] = result.share
                if result.storage is not None:
                    p.packed[label] = result.storage
                p.streamed_bytes += result.streamed_bytes or 0
                p.timings[label] = {
                    "cache": round(cache_seconds, 6),
                    "worker": result.load_seconds,
                    **{k: round(v, 6) for k, v in result.timings.items()},
                }
                slot.memory = result.memory
                self.metrics.observe_load(slot.id, load.source, result.load_seconds)
        except BaseException as exc:
            self.view.remove(record.id, slot.id)
            for name in done:  # roll back: a half-loaded model is not left behind
                with contextlib.suppress(ProtocolError, asyncio.CancelledError):
                    await slot.call(
                        CommandType.UNLOAD_MODEL, UnloadRequest(name=name), UnloadResult, timeout=30
                    )
            code = exc.code.value if isinstance(exc, ProtocolError) else ErrorCode.CANCELLED.value
            reason = exc.message if isinstance(exc, ProtocolError) else "cancelled"
            self.view.fail(record.id, slot.id, code, reason)
            self.bus.publish(
                "model.failed", model_id=record.id, device=slot.id, error_code=code, error=reason
            )
            await self.catalog.record(
                record.id, "load.failed", {"device": slot.id, "error_code": code, "error": reason}
            )
            raise
        p.form = p.form.loaded(dtypes, storages, streams=p.streamed_bytes > 0)
        p.state = PlacementState.LOADED
        p.loaded_at = p.last_used = time.time()
        p.load_seconds = round(time.perf_counter() - started, 6)
        info = {**self.view.info(p), "evicted": evicted}
        self.bus.publish("model.loaded", model_id=record.id, device=slot.id, placement=p.info())
        await self.catalog.record(
            record.id,
            "load",
            {"device": slot.id, "seconds": p.load_seconds, "bytes": p.bytes, "sources": p.sources},
        )
        return info

    async def make_room(
        self,
        slot: WorkerSlot,
        model_id: str,
        need: int,
        force: bool,
        wants: dict[str, int] | None = None,
        *,
        name: str = "",
    ) -> list[str]:
        """Unload what the policy picks so that ``need`` bytes (of which ``wants``: shareable parts by
        share key) fit on ``slot``; the ids unloaded. ``name``: what a refusal calls the model."""
        await slot.status()
        chosen = plan_eviction(self.device_view(slot), model_id, need, force=force, wants=wants, name=name)
        for mid in chosen:
            p = self.view.get(mid, slot.id)
            if p is not None:
                self.leases.revoke(mid, slot.id)  # only force reaches a leased model
                await self.unload_placement(slot, p, reason="evicted")
        return chosen

    # ------------------------------------------------------------------ unloading

    def loaded(self, record: ModelRecord, device: str | None) -> list[Placement]:
        """The placements of a loaded model (on ``device`` only, when given); NotLoaded when none."""
        ps = [
            p
            for p in self.view.of_model(record.id)
            if p.state is PlacementState.LOADED and device in (None, p.device)
        ]
        if not ps:
            raise NotLoaded(
                f"{record.handle} ({record.id}) is not loaded"
                + (f" on {device}" if device else "")
                + "; load it first",
                model_id=record.id,
                handle=record.handle,
            )
        return ps

    async def unload(
        self, ref: str, device: str | None = None, *, force: bool = False, timeout: float | None = None
    ) -> dict[str, Any]:
        record = await self.catalog.resolve(ref)
        placements = [p for p in self.view.of_model(record.id) if device is None or p.device == device]
        if device is not None:
            self.pool.slot(device)
        if not placements:
            where = f"on {device}" if device else "on any device"
            raise NotLoaded(
                f"{record.handle} ({record.id}) is not loaded {where}",
                model_id=record.id,
                handle=record.handle,
            )
        results = [await self._unload_checked(p, force=force, timeout=timeout) for p in placements]
        return {"model_id": record.id, "handle": record.handle, "unloaded": results}

    async def unload_all(self, device: str | None = None, *, force: bool = False) -> dict[str, Any]:
        if device is not None:
            self.pool.slot(device)
        placements = [p for p in list(self.view.placements.values()) if device is None or p.device == device]
        unloaded, refused = [], []
        for p in placements:
            try:
                unloaded.append(await self._unload_checked(p, force=force, timeout=None))
            except ModelInUse as exc:
                refused.append(
                    {
                        "model_id": p.model_id,
                        "handle": p.handle or p.name,
                        "device": p.device,
                        "error": exc.message,
                    }
                )
        return {"unloaded": unloaded, "refused": refused}

    async def _unload_checked(self, p: Placement, *, force: bool, timeout: float | None) -> dict[str, Any]:
        slot = self.pool.slot(p.device)
        leases = self.leases.holding(p.model_id, p.device)
        if leases and not force:
            raise ModelInUse(
                f"{p.handle or p.name} ({p.model_id}) on {p.device} is held by {len(leases)} lease(s) "
                f"({', '.join(lease.id for lease in leases)}); release them or pass force",
                leases=[lease.id for lease in leases],
                model_id=p.model_id,
                handle=p.handle or p.name,
                device=p.device,
            )
        key = (p.model_id, p.device)
        if p.state is not PlacementState.LOADED:
            if not force:
                raise ModelInUse(
                    f"{p.handle or p.name} ({p.model_id}) on {p.device} is {p.state.value}; retry or pass force",
                    model_id=p.model_id,
                    handle=p.handle or p.name,
                    device=p.device,
                )
            fut = self.inflight.get(key)
            if fut is not None:
                with contextlib.suppress(Exception):
                    await asyncio.shield(fut)
        if force:
            self.leases.revoke(p.model_id, p.device)
        current = self.view.get(*key)
        if current is None:
            return {
                "model_id": p.model_id,
                "handle": p.handle or p.name,
                "device": p.device,
                "freed_bytes": 0,
            }
        return await slot.run(
            lambda: self.unload_placement(slot, current, reason="requested"),
            priority=Priority.HIGH,
            deadline=self.deadline(timeout),
            label=f"unload {p.model_id}",
        )

    async def unload_placement(self, slot: WorkerSlot, p: Placement, *, reason: str) -> dict[str, Any]:
        """Unload every component of ``p`` from its worker (components already gone are skipped)."""
        p.state = PlacementState.UNLOADING
        started = time.perf_counter()
        freed = 0
        result: UnloadResult | None = None
        try:
            for name in p.components.values():
                try:
                    result = await slot.call(
                        CommandType.UNLOAD_MODEL, UnloadRequest(name=name), UnloadResult, timeout=60
                    )
                    freed += result.freed_bytes
                except ProtocolError as exc:
                    if exc.code is not ErrorCode.MODEL_NOT_FOUND:
                        raise
        except BaseException:
            p.state = PlacementState.LOADED
            raise
        self.view.remove(p.model_id, p.device)
        if result is not None:
            slot.memory = result.memory_after
        self.bus.publish(
            "model.unloaded", model_id=p.model_id, device=p.device, reason=reason, freed_bytes=freed,
            handle=p.handle or p.name, seconds=round(time.perf_counter() - started, 6),
        )  # fmt: skip
        await self.catalog.record(
            p.model_id, "unload", {"device": p.device, "reason": reason, "freed_bytes": freed}
        )
        memory = slot.memory.model_dump(mode="json") if slot.memory is not None else {}
        return {"model_id": p.model_id, "handle": p.handle or p.name, "device": p.device, "freed_bytes": freed,
                "reason": reason, "memory_after": memory}  # fmt: skip

    async def expire(self, p: Placement) -> None:
        """Unload ``p`` for idleness, on its device's queue, if it is still due when its turn comes
        (an operation queued before may have used it meanwhile)."""
        slot = self.pool.slot(p.device)

        async def run() -> None:
            at = p.expires_at
            current = self.view.get(p.model_id, p.device)
            if (
                current is p
                and at is not None
                and at <= time.time()
                and not self.leases.holding(p.model_id, p.device)
            ):
                await self.unload_placement(slot, p, reason="expired")

        await slot.run(
            run, priority=Priority.NORMAL, deadline=self.deadline(None), label=f"expire {p.model_id}"
        )

    async def route(self, ref: str, *, load: bool = False) -> dict[str, Any]:
        """Which device serves ``ref`` now (its most recently used loaded placement); with
        ``load``, it is loaded first where placement puts it when it is loaded nowhere. The same
        answer as the cluster's, whose ``node`` is then set."""
        record = await self.catalog.resolve(ref)
        loaded = [p for p in self.view.of_model(record.id) if p.state is PlacementState.LOADED]
        if not loaded and load:
            await self.load(record.id, options=LoadOptions(), wait=True)
            loaded = [p for p in self.view.of_model(record.id) if p.state is PlacementState.LOADED]
        best = max(loaded, key=lambda p: p.last_used) if loaded else None
        return {
            "model_id": record.id,
            "name": record.name,
            "loaded": best is not None,
            "node": None,
            "device": best.device if best else None,
            "placements": [
                {"node": None, "device": p.device, "state": p.state.value}
                for p in self.view.of_model(record.id)
            ],
        }

    # ------------------------------------------------------------------ leases

    async def grant_lease(
        self, ref: str, device: str | None, holder: str, ttl: float | None
    ) -> dict[str, Any]:
        """Hold a model (on ``device`` or anywhere): neither evicted nor unloaded without force. A
        model not loaded there may be leased ahead of its load (``keep_alive`` 0 would unload it before
        a lease taken after the load); the answer's ``loaded`` and ``note`` say so. A LoRA or an
        embedding, never loaded, is refused (NotLoadable)."""
        record = await self.catalog.resolve(ref)
        self.catalog.check_leasable(record)
        if device is not None:
            self.pool.slot(device).check_usable()  # a device whose worker did not start says why
        else:
            self.pool.check_ready()
        held = [p.device for p in self.view.of_model(record.id) if p.state is not PlacementState.UNLOADING]
        held += [d for m, d in self.inflight if m == record.id]
        loaded = any(device in (None, where) for where in held)
        lease = self.leases.grant(record.id, device, holder, ttl or self.settings.lease_ttl)
        self.bus.publish("lease.granted", lease=lease.info())
        if loaded:
            return {**lease.info(), "loaded": True}
        where = f" on {device}" if device else ""
        return {
            **lease.info(),
            "loaded": False,
            "note": f"{record.handle} ({record.id}) is not loaded{where} now: the lease holds it from its next "
            "load (a model loaded with keep_alive 0 is leased ahead so)",
        }

    def release_lease(self, lease_id: str) -> dict[str, Any]:
        lease = self.leases.release(lease_id)
        self.bus.publish("lease.released", lease=lease.info())
        return lease.info()


def naming_the_users_file(exc: ProtocolError, routed: ComponentLoad, planned: ComponentLoad) -> ProtocolError:
    """A worker's error about a component it loaded from a RAM-cache segment, naming the user's file
    (``planned``'s path: the registered file or folder) where the worker named the segment
    (``/dev/shm/modelkeeper-*``, an internal name that means nothing to the user), in the message
    and the details. Other errors are returned as they are."""
    if routed.segment is None:
        return exc
    user = planned.request.path
    if planned.request.subfolder:
        user = f"{user.rstrip('/')}/{planned.request.subfolder}"
    return renaming(
        exc, routed.request.path, user, f"{user} ({planned.component})" if planned.component else user
    )


def renaming(exc: ProtocolError, internal: str, user: str, shown: str) -> ProtocolError:
    """``exc`` with the ``internal`` path replaced: by ``shown`` in its message, by ``user`` in its
    details (a detail path under ``internal`` becomes the same path under ``user``)."""
    exc.message = exc.message.replace(internal, shown)
    exc.args = (exc.message, *exc.args[1:])
    under = internal.rstrip("/") + "/"

    def renamed(v: Any) -> Any:
        if v == internal or (isinstance(v, str) and v.startswith(under)):
            return user + v[len(internal) :]
        return v

    exc.details = {k: renamed(v) for k, v in exc.details.items()}
    return exc
