"""Installs: models fetched from the Hub, CivitAI or a URL into the first model root, as jobs.

The :class:`~modelkeeper.install.Installer` does the transfer (resumable, verified, never
half-written) in a thread; its progress feeds the job (and so the event stream), a job's cancel
stops it. Once the files are in place the roots are rescanned and hashed, so the result names the
registered model. A failed or cancelled install leaves no file in the root and nothing in the
registry. One installer serves the service, so the same install asked twice at once is one
transfer. Content already registered (same SHA-256) is linked, not downloaded again. Tokens come
from the environment (``HF_TOKEN``, ``CIVITAI_TOKEN``) and never appear in jobs or events.
"""

from __future__ import annotations

import asyncio
import threading
from pathlib import Path
from typing import Any

from modelkeeper.install import Installer, InstallProgress
from modelkeeper.orchestrator.catalog import Catalog
from modelkeeper.orchestrator.events import EventBus
from modelkeeper.orchestrator.jobs import Job, JobManager
from modelkeeper.orchestrator.settings import Settings
from modelkeeper.protocol.errors import ProtocolError


class Installs:
    def __init__(self, settings: Settings, catalog: Catalog, jobs: JobManager, bus: EventBus) -> None:
        self.settings = settings
        self.catalog = catalog
        self.jobs = jobs
        self.bus = bus
        self._installer: Installer | None = None

    @property
    def installer(self) -> Installer:
        if self._installer is None:  # built on first use: nothing to set up for a service that never installs
            self._installer = Installer(
                hub_endpoint=self.settings.hub_endpoint,
                civitai_endpoint=self.settings.civitai_endpoint,
                known_files=self._known,
            )
        return self._installer

    def close(self) -> None:
        if self._installer is not None:
            self._installer.close()

    def _known(self, sha256: str) -> Path | None:
        """A registered file with this content (called from the install's thread)."""
        try:
            record = self.catalog.registry.resolve(sha256)
        except ProtocolError:
            return None
        f = record.file
        if f is None or f.hashes.sha256 != sha256 or not Path(f.path).is_file():
            return None
        return Path(f.path)

    async def install(
        self,
        source: str,
        *,
        model_type: str | None = None,
        name: str | None = None,
        sha256: str | None = None,
        wait: bool = True,
    ) -> dict[str, Any]:
        """Fetch ``source`` into the first model root and register it: a job."""
        root = self.catalog.roots[0]
        parsed = self.installer.parse(source)  # a bad source is refused before any job starts
        loop = asyncio.get_running_loop()

        async def body(job: Job) -> Any:
            cancel = threading.Event()
            job.on_cancel(cancel.set)

            def progress(p: InstallProgress) -> None:
                loop.call_soon_threadsafe(
                    lambda: job.progress(
                        phase=p.phase, done=p.done_bytes, total=p.total_bytes, unit="bytes", file=p.file
                    )
                )

            try:
                result = await asyncio.to_thread(
                    self.installer.install,
                    source,
                    root,
                    model_type=model_type,
                    name=name,
                    sha256=sha256,
                    progress=progress,
                    cancel=cancel,
                )
            except asyncio.CancelledError:
                cancel.set()
                raise
            job.progress(phase="register", force=True)
            await self.catalog.scan(wait=True, hash=True)
            record = await self.catalog.resolve(str(result.path))
            out = {
                "model_id": record.id,
                "name": record.name,
                "type": record.type,
                "source": result.source,
                "kind": result.kind,
                "revision": result.revision,
                "path": str(result.path),
                "bytes": result.size,
                "transferred_bytes": result.transferred_bytes,
                "seconds": round(result.elapsed_s, 3),
                "files": [
                    {"path": f.relative, "bytes": f.size, "sha256": f.sha256, "reused": f.reused}
                    for f in result.files
                ],
            }
            self.bus.publish("model.installed", model_id=record.id, source=result.source)
            return out

        return await self.jobs.run("install", {"source": parsed.canonical()}, body, wait=wait)
