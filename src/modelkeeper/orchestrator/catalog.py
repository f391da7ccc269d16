"""The catalog: what the service knows of models, from its registry and its model roots.

The service serves its model roots: one path policy for every kind of reference. A model answers
(by id, handle, name, path or hash) only if it has a location under a model root, and it loads
from that location; listings show only such models; the scan hashes only what lies under the
roots. The registry may know other folders (``modelkeeper scan`` of another one, an old setting):
their entries are kept, neither hashed nor served, and a reference to one is refused with
PathOutsideRoots naming the setting that serves it anyway (``allow_outside_roots``). Entries of
folders that no longer exist are marked missing at each scan.

It opens the registry, resolves references (id, handle, name, path inside a model root, hash prefix),
checks that a registered file is still what was registered, turns a model into the worker
requests of its components (a transformer-only Flux or SD3 file: and of the text encoders and VAE
that complete it, ``completion.py``), keeps user metadata and the history of operations, and runs the
scan (and hashing) of the roots as a job. Registry calls run off the event loop: a scan writing in
a thread never stalls the API. It knows nothing of devices or the cache.
"""

from __future__ import annotations

import asyncio
import logging
import os
import threading
from collections.abc import Callable
from pathlib import Path
from typing import Any, TypeVar

from modelkeeper.discovery import Hasher, HashProgress, Scanner, ScanProgress
from modelkeeper.orchestrator.completion import PartsPlan, check_pinned_parts, needs_parts, plan_parts
from modelkeeper.orchestrator.errors import InvalidReference, NotLoadable, PathOutsideRoots, ServiceNotReady
from modelkeeper.orchestrator.events import EventBus
from modelkeeper.orchestrator.jobs import Job, JobManager
from modelkeeper.orchestrator.loading import ComponentLoad, as_part, component_requests
from modelkeeper.orchestrator.settings import Settings
from modelkeeper.protocol.errors import ErrorCode, ProtocolError
from modelkeeper.registry import ModelNotFound, ModelRecord, Registry, SearchPage, worker_spec

OUTSIDE_HINT = (
    "add its folder to model_roots, or set allow_outside_roots (MODELKEEPER_ALLOW_OUTSIDE_ROOTS=1) "
    "to serve models outside the roots"
)

#: Types a worker loads no model of, with what to do with one instead (``check_loadable``).
NOT_LOADED_ALONE = {
    "lora": "a LoRA: apply it to a loaded model with `lora apply` (POST /api/model/{model}/lora)",
    "textual_inversion": "a textual-inversion embedding: it is no model to load or cache on its own",
}

log = logging.getLogger(__name__)
T = TypeVar("T")


class Catalog:
    def __init__(self, settings: Settings, bus: EventBus, jobs: JobManager) -> None:
        self.settings = settings
        self.bus = bus
        self.jobs = jobs
        self.roots = [Path(os.path.realpath(r)) for r in settings.model_roots]
        self._registry: Registry | None = None
        self._scanning = asyncio.Lock()  # one scan at a time (a request, the start, the watcher)

    @property
    def served_roots(self) -> list[str]:
        """The roots a model must lie under to be served (none: every model, allow_outside_roots)."""
        return [] if self.settings.allow_outside_roots else [str(r) for r in self.roots]

    async def open(self) -> None:
        for root in self.roots:
            root.mkdir(parents=True, exist_ok=True)
        self._registry = await asyncio.to_thread(Registry.open, self.settings.db)

    async def close(self) -> None:
        """Close the registry, off the loop: it waits for a registry call running in a thread (a
        scan's or a hash's write) to finish."""
        if self._registry is not None:
            await asyncio.to_thread(self._registry.close)

    @property
    def registry(self) -> Registry:
        if self._registry is None:
            raise ServiceNotReady("the registry is not open yet")
        return self._registry

    async def db(self, fn: Callable[..., T], *args: Any, **kwargs: Any) -> T:
        """A registry call, off the event loop."""
        return await asyncio.to_thread(fn, *args, **kwargs)

    # ------------------------------------------------------------------ references

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
            f"path {path!r} resolves to {str(real)!r}, outside every model root; {OUTSIDE_HINT}",
            path=path,
            setting="allow_outside_roots",
        )

    async def resolve(self, ref: str) -> ModelRecord:
        """A model by id, handle, name, path (inside a model root) or hash prefix, with a location
        under a model root (its ``file``: one there). PathOutsideRoots for a model that has none.
        Off the loop in one hop: a path is resolved on the file system, then looked up."""
        return await self.db(self._resolve, ref)

    def _resolve(self, ref: str) -> ModelRecord:
        if "/" in ref or ref.startswith("."):
            ref = str(self.check_path(ref))
        roots = self.served_roots
        try:
            return self.registry.resolve(ref, roots)
        except ModelNotFound:
            if not roots:
                raise
            outside = self.registry.resolve(ref)  # raises if it is nowhere
            raise PathOutsideRoots(
                f"model {outside.handle!r} ({outside.id}) lies outside every model root ({outside.path}); "
                f"{OUTSIDE_HINT}",
                model_id=outside.id,
                path=outside.path,
                setting="allow_outside_roots",
            ) from None

    async def get(self, model_id: str) -> ModelRecord:
        return await self.db(self.registry.get, model_id, self.served_roots)

    async def search(self, **filters: Any) -> SearchPage:
        """The registry's search over the models served (a location under a model root)."""
        return await self.db(self.registry.search, **filters, roots=self.served_roots)

    @staticmethod
    def check_loadable(record: ModelRecord) -> None:
        """NotLoadable for a model that is no model to load or cache (a LoRA, an embedding), naming
        what to do with it instead: refused before any job."""
        use = NOT_LOADED_ALONE.get(record.type)
        if use is not None:
            raise NotLoadable(
                f"{record.handle} ({record.id}) is {use}",
                model_id=record.id,
                handle=record.handle,
                type=record.type,
            )

    @staticmethod
    def check_leasable(record: ModelRecord) -> None:
        """NotLoadable for a lease on what is never loaded (a LoRA, an embedding): it would hold
        nothing. Named by its type, with what to lease instead."""
        use = NOT_LOADED_ALONE.get(record.type)
        if use is not None:
            raise NotLoadable(
                f"{record.handle} is {use}; a lease holds a loaded model and {record.handle} "
                f"({record.type}) is never loaded: lease the model it is applied to",
                model_id=record.id,
                handle=record.handle,
                type=record.type,
            )

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
            seen = (
                "the last scan found it missing; put it back, or rescan once it is back"
                if record.status == "missing"
                else "rescan the roots"
            )
            raise ProtocolError(
                f"{record.handle} ({record.id}): its file {f.path} is missing ({exc.strerror}); {seen}",
                ErrorCode.FILE_NOT_FOUND,
                model_id=record.id,
                handle=record.handle,
                path=f.path,
            ) from None
        if f.kind == "file" and (st.st_size != f.size or st.st_mtime_ns != f.mtime_ns):
            raise ProtocolError(
                f"model {record.id}: {f.path} changed since it was registered (size {f.size} -> {st.st_size}); "
                "rescan the roots (POST /api/model/cache/refresh) before loading it",
                ErrorCode.INVALID_MODEL_FILE,
                path=f.path,
            )

    async def verify_file(self, record: ModelRecord) -> None:
        """``check_file`` off the loop (a ``stat`` can wait on a slow or network disk)."""
        await asyncio.to_thread(self.check_file, record)

    async def parts(self, record: ModelRecord) -> PartsPlan | None:
        """The parts a transformer-only Flux or SD3 model is completed with (None for another
        model), chosen among the models served (see ``completion.py``)."""
        if not needs_parts(record):
            return None  # most models: no registry reads, no thread
        return await self.db(plan_parts, self.registry, record, self.served_roots)

    async def component_loads(self, record: ModelRecord) -> list[ComponentLoad]:
        """The worker requests of the model's loadable components, then those of its parts (a
        transformer-only model): MissingPart or IncompatiblePart when one cannot be had. Reads
        headers: off the loop."""
        spec = worker_spec(record)  # of this record: its file is the location under the roots
        loads = await asyncio.to_thread(component_requests, record, spec)
        plan = await self.parts(record)
        if plan is None:
            return loads
        plan.check()
        for role, part in plan.records.items():
            await self.verify_file(part)
            for load in await asyncio.to_thread(component_requests, part, worker_spec(part)):
                loads.append(as_part(record, role, load))
        return loads

    # ------------------------------------------------------------------ metadata and history

    async def metadata(self, ref: str) -> dict[str, Any]:
        record = await self.resolve(ref)
        return {"model_id": record.id, "name": record.name, **record.meta.model_dump(mode="json")}

    async def set_metadata(self, ref: str, values: dict[str, Any]) -> dict[str, Any]:
        """Set user metadata; parts pinned in ``default_settings.parts`` that do not fit the model
        are refused (IncompatiblePart) before anything is written."""
        record = await self.resolve(ref)
        if "default_settings" in values:
            settings = values["default_settings"]
            await self.db(check_pinned_parts, self.registry, record, settings, self.served_roots)
        await self.db(self.registry.set_meta, record.id, values)
        self.bus.publish("model.metadata", model_id=record.id, keys=sorted(values))
        return await self.metadata(record.id)

    async def record(self, model_id: str, op: str, data: dict[str, Any]) -> None:
        """Add an operation to the model's history (a model deleted meanwhile: the operation stands)."""
        try:
            await self.db(self.registry.add_history, model_id, op, data)
        except ProtocolError as exc:
            log.warning("history of %s not recorded: %s", model_id, exc)

    # ------------------------------------------------------------------ scanning

    def forget_vanished_folders(self) -> list[str]:
        """Mark missing the entries of recorded roots that no longer exist; returns those roots."""
        gone = [root for root in self.registry.recorded_roots() if not os.path.isdir(root)]
        for root in gone:
            rows = [r for r in self.registry.file_rows([root]).values() if r.status != "missing"]
            self.registry.mark_missing(rows)
        return gone

    async def scan(self, *, wait: bool = True, hash: bool = True) -> dict[str, Any]:
        """Scan the model roots (new, changed, moved and deleted files), then hash what is new
        under them: a job. Scans run one at a time."""
        loop = asyncio.get_running_loop()
        roots = [str(r) for r in self.roots]

        async def body(job: Job) -> Any:
            async with self._scanning:
                return await scan_roots(job)

        async def scan_roots(job: Job) -> Any:
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
            vanished = await asyncio.to_thread(self.forget_vanished_folders)
            report = await asyncio.to_thread(scanner.scan, on_scan)
            result: dict[str, Any] = {
                "summary": report.summary(),
                "seconds": round(report.seconds, 3),
                "rejected": [e.to_json() for e in report.entries if e.status == "rejected"][:200],
                "missing": report.missing[:200],
            }
            if vanished:
                log.info("folders gone, their entries marked missing: %s", ", ".join(vanished))
            self.bus.publish("registry.scanned", summary=result["summary"], vanished_roots=vanished)
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

                hasher = Hasher(self.registry, roots=roots)  # only what the service serves
                hreport = await asyncio.to_thread(hasher.run, progress=on_hash, cancel=cancel)
                result["hashed"] = {
                    "files": hreport.hashed,
                    "bytes": hreport.bytes,
                    "errors": len(hreport.errors),
                }
            return result

        return await self.jobs.run("scan", {"roots": roots, "hash": hash}, body, wait=wait)
