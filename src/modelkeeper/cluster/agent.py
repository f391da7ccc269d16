"""The node agent: one per Ray node, owning that node's single-host :class:`Orchestrator`.

``NodeAgent`` is a plain class; :mod:`.nodes` runs it as a named, detached Ray actor pinned to its
node. It builds the orchestrator from that node's ``Settings`` (its model roots, devices, registry
file, RAM cache: the same parts as one host, no fork of them) and answers the driver:

- ``start`` / ``stop``; ``state()``: devices with budget, used bytes and placements, the models on
  disk with their cluster keys, sizes and the bytes of them in the RAM cache;
- ``load`` / ``unload`` on a local device (leases held cluster-wide are passed in ``held`` and
  hold here for the time of the call, so the local eviction honours them);
- files: ``files`` and ``read`` serve a model's bytes in chunks; ``fetch`` pulls a model from
  another node's agent into this node's ``receive_dir``, registers it and checks its hash.

Every method answers ``{"ok": value}`` or ``{"error": {...}}`` (a ``ProtocolError`` as data): the
driver raises the same error again, code and details intact, without Ray's exception wrapping.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import shutil
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any, TypeVar

from modelkeeper.cluster.errors import TransferFailed
from modelkeeper.orchestrator import LoadOptions, Orchestrator, Settings
from modelkeeper.orchestrator.errors import LeaseNotFound
from modelkeeper.orchestrator.state import PlacementState
from modelkeeper.protocol.client import WorkerFactory, WorkerProcess
from modelkeeper.protocol.errors import ErrorCode, ProtocolError
from modelkeeper.registry import ModelRecord

log = logging.getLogger(__name__)
T = TypeVar("T")
Answer = dict[str, Any]


def cluster_key(record: ModelRecord) -> str:
    """A model's identity across nodes: its content hash (BLAKE3), or ``name:<name>`` until hashed."""
    hashes = record.file.hashes if record.file is not None else None
    if hashes is not None and hashes.blake3:
        return hashes.blake3
    return f"name:{record.name}"


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
        self._lock = asyncio.Lock()
        self._models: list[dict[str, Any]] | None = None  # the disk listing, rebuilt after a scan

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
                orch = Orchestrator(Settings(**self.overrides), worker_factory=self.factory())
                await orch.start()
                self.orch = orch
                await self._scans()
        return await self.state()

    async def _scans(self) -> None:
        for job in self.service.jobs.list(kind="scan"):
            with contextlib.suppress(ProtocolError):
                await self.service.jobs.wait(job)
        self._models = None

    async def stop(self) -> Answer:
        async with self._lock:
            if self.orch is not None:
                await self.orch.stop()
                self.orch = None
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
        if self._models is None:
            self._models = await asyncio.to_thread(self._list_models)
        ram: dict[str, int] = {}
        for seg in orch.feed.segments():
            for mid in seg["models"]:
                ram[mid] = ram.get(mid, 0) + int(seg["bytes"])
        devices = []
        for slot in orch.pool.slots.values():
            placements = [
                {
                    **p.info(len(orch.leases.holding(p.model_id, slot.id))),
                    "loading": p.state is PlacementState.LOADING,
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
            "models": [{**m, "ram_bytes": ram.get(m["model_id"], 0)} for m in self._models],
            "cache": orch.feed.cache.stats() if orch.feed.is_open else None,
            "roots": [str(r) for r in orch.catalog.roots],
        }

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
                    "need": sum(c.bytes for c in record.components),
                    "sha256": hashes.sha256 if hashes else None,
                    "tags": list(record.meta.tags),
                }
            )
        return out

    # ------------------------------------------------------------------ loads

    async def load(self, model_id: str, device: str, options: dict[str, Any], held: list[str]) -> Answer:
        """Load ``model_id`` on the local ``device``; ``held``: model ids leased cluster-wide there."""
        return await answer(self._with_leases(device, held, lambda: self._load(model_id, device, options)))

    async def _load(self, model_id: str, device: str, options: dict[str, Any]) -> dict[str, Any]:
        result = await self.service.loads.load(model_id, device, options=LoadOptions(**options), wait=True)
        out: dict[str, Any] = result["result"]
        return out

    async def _with_leases(self, device: str, held: list[str], work: Callable[[], Awaitable[T]]) -> T:
        leases = self.service.leases
        granted = [
            leases.grant(mid, device, "cluster", self.service.settings.request_timeout) for mid in held
        ]
        try:
            return await work()
        finally:
            for lease in granted:
                with contextlib.suppress(LeaseNotFound):
                    leases.release(lease.id)

    async def unload(self, model_id: str, device: str | None, force: bool, timeout: float | None) -> Answer:
        return await answer(self.service.loads.unload(model_id, device, force=force, timeout=timeout))

    async def scan(self) -> Answer:
        async def run() -> dict[str, Any]:
            result = await self.service.catalog.scan(wait=True, hash=True)
            self._models = None
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

    async def read(self, model_id: str, rel: str, offset: int, size: int) -> bytes:
        """``size`` bytes at ``offset`` of the model's file ``rel`` (as ``files`` names it)."""
        record = await self.service.catalog.get(model_id)
        model = Path(record.path or "").resolve()
        path = (model.parent / rel).resolve()
        if record.path is None or not (path == model or path.is_relative_to(model)):
            raise ProtocolError(f"{rel!r} is not a file of model {model_id}", ErrorCode.INVALID_REQUEST)

        def chunk() -> bytes:
            with open(path, "rb") as f:
                f.seek(offset)
                return f.read(size)

        return await asyncio.to_thread(chunk)

    async def fetch(
        self, key: str, source: Any, source_model_id: str, files: list[dict[str, Any]], chunk: int, ahead: int
    ) -> Answer:
        """Pull a model from ``source`` (another node's agent) into this node's ``receive_dir``,
        register it, and check that its hash is ``key``; answers the local model id and timings."""
        return await answer(self._fetch(key, source, source_model_id, files, chunk, ahead))

    async def _fetch(
        self, key: str, source: Any, source_model_id: str, files: list[dict[str, Any]], chunk: int, ahead: int
    ) -> dict[str, Any]:
        import time

        started = time.perf_counter()
        root = self.service.catalog.roots[0] / self.receive_dir / key[:16]
        partial = root.with_name(root.name + ".partial")
        await asyncio.to_thread(shutil.rmtree, partial, True)
        total = 0
        for f in files:
            target = partial / f["rel"]
            target.parent.mkdir(parents=True, exist_ok=True)
            offsets = list(range(0, int(f["size"]), chunk)) or [0]
            with open(target, "wb") as out:
                # ``ahead`` chunks requested at once: the next arrives while this one is written
                pending = [source.read.remote(source_model_id, f["rel"], o, chunk) for o in offsets[:ahead]]
                nxt = ahead
                while pending:
                    try:
                        data: bytes = await pending.pop(0)
                    except Exception as exc:
                        raise TransferFailed(
                            f"model {key}: reading {f['rel']} from its node failed: {exc}", key=key
                        ) from None
                    await asyncio.to_thread(out.write, data)
                    total += len(data)
                    if nxt < len(offsets):
                        pending.append(source.read.remote(source_model_id, f["rel"], offsets[nxt], chunk))
                        nxt += 1
        moved = time.perf_counter() - started
        await asyncio.to_thread(shutil.rmtree, root, True)
        os.replace(partial, root)
        top = root / files[0]["rel"].split("/")[0]
        await self.service.catalog.scan(wait=True, hash=True)
        self._models = None
        try:
            record = await self.service.catalog.resolve(str(top))
        except ProtocolError as exc:
            raise TransferFailed(
                f"model {key} received on {self.node} at {top} but not registered: {exc.message}"
            ) from None
        got = cluster_key(record)
        if got != key:
            await asyncio.to_thread(shutil.rmtree, root, True)
            await self.service.catalog.scan(wait=True, hash=False)
            raise TransferFailed(
                f"model {key} received on {self.node} hashes to {got}: deleted", expected=key, got=got
            )
        return {"model_id": record.id, "path": str(top), "bytes": total, "seconds": round(moved, 6)}
