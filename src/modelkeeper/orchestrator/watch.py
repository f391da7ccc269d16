"""The watcher: the model roots watched (watchfiles), rescanned when something changes under them.

A file added, moved, renamed or removed under a root is registered within seconds: the watcher
gathers the changes (``watch_debounce_ms``), then runs the catalog's scan of the roots, which is
incremental (unchanged files are not reopened) and hashes what is new. Scans run one at a time
(the catalog's lock), so a burst of changes during a scan gives one more scan after it. The
registry's own files (the database, its WAL) are ignored, so a registry kept under a root does not
rescan itself forever. ``watch = false`` turns it off.
"""

from __future__ import annotations

import asyncio
import logging
import os

from watchfiles import Change, awatch

from modelkeeper.orchestrator.catalog import Catalog
from modelkeeper.orchestrator.settings import Settings

log = logging.getLogger(__name__)

__all__ = ["RootWatcher"]


class RootWatcher:
    """Rescans the catalog's roots on every change under them; ``run()`` until cancelled."""

    def __init__(self, settings: Settings, catalog: Catalog) -> None:
        self.settings = settings
        self.catalog = catalog
        db = os.path.realpath(settings.db) if settings.db else None
        self._ignored = (db, f"{db}-wal", f"{db}-shm", f"{db}-journal") if db else ()
        self.scans = 0  # rescans started by changes (for tests and the status)

    def relevant(self, change: Change, path: str) -> bool:
        """Whether a change may concern a model (everything but the registry's own files)."""
        return os.path.realpath(path) not in self._ignored

    async def run(self) -> None:
        """Watch until cancelled (the service's stop); does nothing when ``watch`` is off."""
        if not self.settings.watch:
            return
        roots = [str(r) for r in self.catalog.roots]
        try:
            async for _ in awatch(
                *roots,
                watch_filter=self.relevant,
                debounce=self.settings.watch_debounce_ms,
                step=50,
                recursive=True,
            ):
                self.scans += 1
                try:
                    await self.catalog.scan(wait=True, hash=self.settings.hash_on_start)
                except Exception as exc:  # a failed rescan must not end the watching
                    log.warning("rescan after a change under the model roots failed: %s", exc)
        except asyncio.CancelledError:
            raise
        except Exception as exc:  # a root removed, too many watches: the service goes on
            log.warning("watching the model roots stopped: %s", exc)
