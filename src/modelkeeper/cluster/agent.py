"""The node agent: one per Ray node, owning that node's single-host :class:`Orchestrator`.

``NodeAgent`` is a plain class; :mod:`.nodes` runs it as a named, detached Ray actor pinned to its
node. It builds the orchestrator from that node's ``Settings`` (its model roots, devices, registry
file, RAM cache: the same parts as one host, no fork of them) and answers the driver:

- ``start`` / ``stop``; ``state()``: devices with budget, used bytes and placements (with the parts
  each shares on its device: ``shares``, share keys in cluster terms and their bytes; and ``form``,
  the whole form it is loaded in, by which the driver refuses or reloads a load in another), the models
  on disk with their cluster keys, sizes and the bytes of them in the RAM cache;
- ``demand``: what a load of a model takes on a device, as this node's own placement counts it
  (its bytes with its parts', and the parts a device holds once), for the driver's placement;
- ``call`` / ``stream``: a method of the node orchestrator's parts (``PARTS``: loads, the RAM
  cache, validate / benchmark / optimize, LoRAs), the same code as on one host, with the node's
  own model ids and device names. ``stream`` runs a method that makes a job and is a Ray
  streaming generator: the job's progress as it changes, then its result, so the driver's job
  shows the stage and bytes of the work on the node (leases held cluster-wide are passed in
  ``held`` and hold here until the job ends, so the local eviction honours them);
- ``unload`` on a local device;
- files: ``files`` and ``read`` serve a model's bytes in chunks; ``fetch`` (streamed, bytes as
  they arrive) pulls a model from another node's agent into this node's RAM cache and, by
  default, its disk, registers it and checks its hash (:mod:`.receive`).

Every answer is ``{"ok": value}`` or ``{"error": {...}}`` (a ``ProtocolError`` as data): the
driver raises the same error again, code and details intact, without Ray's exception wrapping.
"""

from __future__ import annotations

import asyncio
import contextlib
import inspect
import logging
import os
import shutil
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import asdict
from pathlib import Path
from typing import Any, TypeVar

from modelkeeper.cluster.keys import cluster_key, cluster_share
from modelkeeper.cluster.receive import RamFolders, Receiver, read_chunk
from modelkeeper.orchestrator import LoadOptions, Orchestrator, Settings
from modelkeeper.orchestrator.completion import needs_parts
from modelkeeper.orchestrator.errors import LeaseNotFound
from modelkeeper.orchestrator.jobs import Job
from modelkeeper.orchestrator.leases import Lease
from modelkeeper.orchestrator.state import Placement, PlacementState
from modelkeeper.protocol.client import WorkerFactory, WorkerProcess
from modelkeeper.protocol.errors import ErrorCode, ProtocolError

log = logging.getLogger(__name__)
T = TypeVar("T")
Answer = dict[str, Any]
PROGRESS_S = 0.1  # how often a streamed job's progress is looked at
#: The methods of the node's orchestrator parts the driver runs through ``call`` and ``stream``:
#: the same code as on one host.
PARTS: dict[str, frozenset[str]] = {
    "loads": frozenset({"load"}),
    "feed": frozenset({"view", "get", "cache_model", "cache_component", "drop", "clear"}),
    "operations": frozenset({"run"}),
    "loras": frozenset({"apply", "strength", "remove"}),
    "recovery": frozenset({"reconcile", "optimize_memory"}),
    "catalog": frozenset({"metadata", "set_metadata"}),
    "views": frozenset({"components"}),
    "installs": frozenset({"install"}),
}
#: The methods that write the node's registry: its model listing is read again after them.
WRITES = frozenset({("catalog", "set_metadata"), ("installs", "install")})


def error_answer(exc: ProtocolError) -> Answer:
    return {
        "error": {
            "class": type(exc).__name__,
            "code": exc.code.value,
            "message": exc.message,
            "details": exc.details,
        }
    }


async def answer(work: Awaitable[T]) -> Answer:
    """``{"ok": result}``, or the ``ProtocolError`` raised as data (see the module docstring)."""
    try:
        return {"ok": await work}
    except ProtocolError as exc:
        return error_answer(exc)


def disk_free(root: Path) -> int:
    """Free bytes on the file system of ``root`` (0 when it cannot be read): where installs go."""
    try:
        return shutil.disk_usage(root).free
    except OSError:
        return 0


def model_files(path: Path) -> list[dict[str, Any]]:
    """The files of a model (one file, or every file of a folder), relative to its parent folder."""
    base = path.parent
    if path.is_file():
        return [{"rel": path.name, "size": path.stat().st_size}]
    out = []
    for p in sorted(path.rglob("*")):
        if p.is_file():
            out.append({"rel": str(p.relative_to(base)), "size": p.stat().st_size})
    return out


class NodeAgent:
    """See the module docstring. ``overrides``: Settings fields over the node's own environment."""

    def __init__(
        self, node: str, overrides: dict[str, Any], *, workers: str = "process", receive_dir: str = "received"
    ) -> None:
        self.node = node
        self.overrides = overrides
        self.workers = workers
        self.receive_dir = receive_dir
        self.orch: Orchestrator | None = None
        self.receiver: Receiver | None = None
        self._lock = asyncio.Lock()
        self._models: list[dict[str, Any]] | None = None  # the disk listing, rebuilt after a scan
        self._forgotten = 0  # how many times the listing was dropped (a listing older is not kept)

    # ------------------------------------------------------------------ life

    def factory(self) -> WorkerFactory:
        if self.workers == "inprocess":
            from modelkeeper.worker import InProcessWorker

            return InProcessWorker.start
        return WorkerProcess.start

    async def start(self) -> Answer:
        """Start the node's orchestrator (once: a driver that attaches again finds it running) and
        wait for its first scan and hashing; answers ``state()``."""
        async with self._lock:
            if self.orch is None:
                base = Settings(**self.overrides)
                ram = RamFolders.of(self.node)  # models received into RAM only: a root of their own
                settings = base.model_copy(update={"model_roots": [*base.model_roots, ram.root]})
                orch = Orchestrator(settings, worker_factory=self.factory())
                self.receiver = Receiver(orch, self.node, self.receive_dir, ram)
                await asyncio.to_thread(ram.open)
                await orch.start()
                self.orch = orch
                await self._scans()
        return await self.state()

    async def _scans(self) -> None:
        for job in self.service.jobs.list(kind="scan"):
            with contextlib.suppress(ProtocolError):
                await self.service.jobs.wait(job)
        self._forget()

    async def stop(self) -> Answer:
        async with self._lock:
            if self.orch is not None:
                await self.orch.stop()
                self.orch = None
            if self.receiver is not None:  # its RAM root and staging files, gone with its RAM cache
                await asyncio.to_thread(self.receiver.folders.close)
                self.receiver = None
        return {"ok": True}

    @property
    def service(self) -> Orchestrator:
        if self.orch is None:
            raise ProtocolError(f"the agent of {self.node} is not started", ErrorCode.BUSY)
        return self.orch

    def pid(self) -> int:
        return os.getpid()

    # ------------------------------------------------------------------ state

    async def state(self) -> Answer:
        """Devices, placements, models on disk and in the RAM cache: what the cluster view needs."""
        return await answer(self._state())

    async def _state(self) -> dict[str, Any]:
        orch = self.service
        if self.receiver is not None and self.receiver.prune():  # RAM-only models evicted
            await orch.catalog.scan(wait=True, hash=False)
            self._forget()
        models = await self._listing()
        keys = {str(m["model_id"]): str(m["key"]) for m in models}
        ram: dict[str, int] = {}
        segments = orch.feed.segments()
        for seg in segments:
            for mid in seg["models"]:
                ram[mid] = ram.get(mid, 0) + int(seg["bytes"])
        devices = []
        for slot in orch.pool.slots.values():
            placements = [
                {
                    **orch.view.info(p, len(orch.leases.holding(p.model_id, slot.id))),
                    "loading": p.state is PlacementState.LOADING,
                    "shares": self._shares(p, keys),
                    "form": asdict(p.form),  # the whole form, for the driver's check (forms.py)
                }
                for p in orch.view.on_device(slot.id)
            ]
            devices.append(
                {
                    **slot.info(),
                    "budget": slot.budget_bytes,
                    "used": slot.used_bytes,
                    "placements": placements,
                }
            )
        return {
            "node": self.node,
            "pid": os.getpid(),
            "devices": devices,
            "models": [{**m, "ram_bytes": ram.get(m["model_id"], 0)} for m in models],
            "cache": orch.feed.cache.stats() if orch.feed.is_open else None,
            "segments": segments,
            "roots": [str(r) for r in orch.catalog.roots],
            "disk_free": await asyncio.to_thread(disk_free, orch.catalog.roots[0]),
        }

    async def _listing(self) -> list[dict[str, Any]]:
        """The models on this node's disk (the listing kept until a scan or a write drops it)."""
        models = self._models
        if models is None:
            forgotten = self._forgotten
            models = await asyncio.to_thread(self._list_models)
            if forgotten == self._forgotten:  # not dropped again while it was read
                self._models = models
        return models

    def _shares(self, p: Placement, keys: dict[str, str]) -> list[tuple[str, int]]:
        """(share key in cluster terms, bytes) of the components of ``p`` that its device may hold
        once for several placements: what the driver's placement counts once, as this node's does."""
        return [
            (cluster_share(key, keys, self.node), p.component_bytes.get(label, 0))
            for label, key in sorted(p.shares.items())
        ]

    async def demand(self, model_id: str, options: LoadOptions | None = None) -> Answer:
        """What a load of ``model_id`` (with ``options``) takes on a device, as this node's own
        placement counts it: ``need``, its bytes with its parts' (``Loads.stored_bytes``), and
        ``shares``, of those the parts a device holds once for every placement loading them in the
        same form (``Loads.shared_parts``; share keys in cluster terms -> bytes). The driver places
        a model with parts by these, so that a part already on a device takes no room there.
        MissingPart or IncompatiblePart when the model cannot be completed here."""

        async def run() -> dict[str, Any]:
            orch, opts = self.service, options or LoadOptions()
            record = await orch.catalog.get(model_id)
            need = await orch.loads.stored_bytes(record, opts)
            shares = await orch.loads.shared_parts(record, opts)
            keys = {str(m["model_id"]): str(m["key"]) for m in await self._listing()}
            return {
                "need": need,
                "shares": {cluster_share(key, keys, self.node): size for key, size in shares.items()},
            }

        return await answer(run())

    def _list_models(self) -> list[dict[str, Any]]:
        registry = self.service.catalog.registry
        out = []
        for item in registry.search(status="ok", limit=1_000_000).items:
            record = registry.get(item.id)
            hashes = record.file.hashes if record.file is not None else None
            out.append(
                {
                    "key": cluster_key(record),
                    "model_id": record.id,
                    "name": record.name,
                    "type": record.type,
                    "base": record.base,
                    "variant": record.variant,
                    "format": record.format,
                    "path": record.path,
                    "size": record.size,
                    "need": sum(c.bytes for c in record.components),  # its own: parts not counted
                    "with_parts": needs_parts(record),  # completed from parts: the driver asks ``demand``
                    "sha256": hashes.sha256 if hashes else None,
                    "tags": list(record.meta.tags),
                }
            )
        return out

    # ------------------------------------------------------------------ the parts of one host

    def _method(self, part: str, method: str) -> Callable[..., Any]:
        if method not in PARTS.get(part, ()):
            raise ProtocolError(f"{part}.{method} is not offered by a node agent", ErrorCode.INVALID_REQUEST)
        fn: Callable[..., Any] = getattr(getattr(self.service, part), method)
        return fn

    async def call(
        self,
        part: str,
        method: str,
        args: list[Any],
        kwargs: dict[str, Any],
        held: tuple[str, list[str]] | None = None,
    ) -> Answer:
        """``part.method(*args, **kwargs)`` of the node's orchestrator (see ``PARTS``), awaited.
        ``held``: (device, model ids) leased cluster-wide, held here for the call (as ``stream``)."""

        async def run() -> Any:
            granted = self._grant(*held) if held else []
            try:
                out = self._method(part, method)(*args, **kwargs)
                if inspect.isawaitable(out):
                    out = await out
            finally:
                self._release(granted)
                self._wrote(part, method)
            return out

        return await answer(run())

    async def stream(
        self,
        part: str,
        method: str,
        args: list[Any],
        kwargs: dict[str, Any],
        held: tuple[str, list[str]] | None = None,
    ) -> AsyncIterator[Answer]:
        """A method of the node's orchestrator that runs a job (``wait=False``), streamed: yields
        ``{"progress": ...}`` as its job reports progress, then ``{"ok": result}`` or ``{"error"}``.
        ``held``: (device, model ids) leased cluster-wide, held here until the job ends. A driver
        that stops reading (its job cancelled) cancels the job here."""
        granted: list[Lease] = []
        job: Job | None = None
        try:
            try:
                granted = self._grant(*held) if held else []
                started = await self._method(part, method)(*args, **{**kwargs, "wait": False})
            except ProtocolError as exc:
                yield error_answer(exc)
                return
            if "result" in started:  # answered at once (a component already cached)
                self._wrote(part, method)
                yield {"ok": started["result"]}
                return
            job = self.service.jobs.get(started["job"]["id"])
            assert job.task is not None
            async for progress in follow(job.task, lambda: job.progress_data if job else {}):
                yield {"progress": progress}
            try:
                last = {"ok": await self.service.jobs.wait(job)}
            except ProtocolError as exc:
                last = error_answer(exc)
            self._wrote(part, method)  # before the answer: the driver reads the state once it has it
            yield last
        finally:
            if job is not None and not job.state.finished:
                self.service.jobs.cancel(job.id)
            self._release(granted)
            self._wrote(part, method)

    def _wrote(self, part: str, method: str) -> None:
        """After a method that writes the node's registry (``WRITES``): its listing is read again."""
        if (part, method) in WRITES:
            self._forget()

    def _forget(self) -> None:
        """Drop the disk listing: the next ``state()`` reads the registry again."""
        self._models = None
        self._forgotten += 1

    def _grant(self, device: str, held: list[str]) -> list[Lease]:
        leases = self.service.leases
        return [leases.grant(mid, device, "cluster", self.service.settings.request_timeout) for mid in held]

    def _release(self, granted: list[Lease]) -> None:
        for lease in granted:
            with contextlib.suppress(LeaseNotFound):
                self.service.leases.release(lease.id)

    async def unload(self, model_id: str, device: str | None, force: bool, timeout: float | None) -> Answer:
        return await answer(self.service.loads.unload(model_id, device, force=force, timeout=timeout))

    async def scan(self, hash: bool = True) -> Answer:
        async def run() -> dict[str, Any]:
            result = await self.service.catalog.scan(wait=True, hash=hash)
            self._forget()
            out: dict[str, Any] = result["result"]
            return out

        return await answer(run())

    # ------------------------------------------------------------------ files

    async def files(self, model_id: str) -> Answer:
        async def run() -> list[dict[str, Any]]:
            record = await self.service.catalog.get(model_id)
            if record.path is None:
                raise ProtocolError(f"model {model_id} has no file on {self.node}", ErrorCode.FILE_NOT_FOUND)
            return await asyncio.to_thread(model_files, Path(record.path))

        return await answer(run())

    async def read(self, model_id: str, rel: str, offset: int, size: int) -> Any:
        """``size`` bytes at ``offset`` of the model's file ``rel`` (as ``files`` names it), as a
        NumPy array (the receiver reads it from its object store without a copy)."""
        record = await self.service.catalog.get(model_id)
        model = Path(record.path or "").resolve()
        path = (model.parent / rel).resolve()
        if record.path is None or not (path == model or path.is_relative_to(model)):
            raise ProtocolError(f"{rel!r} is not a file of model {model_id}", ErrorCode.INVALID_REQUEST)
        return await asyncio.to_thread(read_chunk, path, offset, size)

    async def fetch(
        self,
        key: str,
        source: Any,
        source_model_id: str,
        files: list[dict[str, Any]],
        chunk: int,
        ahead: int,
        to_disk: bool = True,
    ) -> AsyncIterator[Answer]:
        """Pull a model from ``source`` (another node's agent) into this node's RAM cache (and its
        disk, ``to_disk``), register it and check that its hash is ``key`` (:mod:`.receive`):
        streamed, ``{"progress": {"step": "transfer", "done", "total", "unit": "bytes"}}`` as
        chunks arrive, then the local model id and timings."""
        state: dict[str, Any] = {"step": "transfer", "target": self.node, "unit": "bytes"}

        def progress(done: int, total: int) -> None:
            state.update(done=done, total=total)

        async def run() -> dict[str, Any]:
            assert self.receiver is not None  # set with the orchestrator
            out = await self.receiver.receive(
                key, source, source_model_id, files, chunk=chunk, ahead=ahead, to_disk=to_disk,
                progress=progress,
            )  # fmt: skip
            self._forget()
            return out

        task = asyncio.ensure_future(answer(run()))
        try:
            async for snapshot in follow(task, lambda: state):
                yield {"progress": snapshot}
            yield task.result()
        finally:
            task.cancel()


async def follow(
    task: asyncio.Future[Any], read: Callable[[], dict[str, Any]]
) -> AsyncIterator[dict[str, Any]]:
    """Snapshots of ``read()`` while ``task`` runs, each time it changed (at most every
    ``PROGRESS_S``), and the last one when it ends."""
    last: dict[str, Any] | None = None
    while True:
        await asyncio.wait({task}, timeout=PROGRESS_S)
        now = dict(read())
        if now and now != last:
            last = now
            yield now
        if task.done():
            return
