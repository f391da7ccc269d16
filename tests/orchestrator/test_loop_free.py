"""The service's event loop is never held by the load path's blocking work: loads from disk and
from the RAM cache, unloads, evictions, drops of segments and the stop run every file-system,
registry and segment-removal call in a thread, and no unlink of a segment (which frees its pages:
~0.2 s a GB of tmpfs) runs while the cache's lock is held (a status snapshot and a load's pin take
that lock on the loop).

Deterministic: the blocking functions are wrapped to record the thread they ran on (and, for an
unlink, whether another thread could take the cache's lock), and the test asserts on what ran on
the loop's thread, never on a wall-clock bound."""

from __future__ import annotations

import asyncio
import inspect
import threading
from collections import defaultdict
from pathlib import Path
from typing import Any

import pytest

from modelkeeper.cache import RamCache
from modelkeeper.orchestrator import catalog as catalog_module
from modelkeeper.orchestrator.catalog import Catalog
from modelkeeper.registry import Registry
from modelkeeper.testing import DemoManifest

from .conftest import MiB, run, serving
from .test_orchestrator import SD15, UNET

pytestmark = pytest.mark.xdist_group("orchestrator-inprocess")


class Threads:
    """Where each wrapped call ran: the names of the calls made on the loop's thread."""

    def __init__(self) -> None:
        self.loop_thread: int | None = None
        self.calls: defaultdict[str, int] = defaultdict(int)
        self.on_loop: list[str] = []
        self.unlinks_under_lock: list[str] = []

    def note(self, name: str) -> None:
        self.calls[name] += 1
        if threading.get_ident() == self.loop_thread:
            self.on_loop.append(name)

    def wrap(self, owner: Any, attr: str, *, static: bool = False) -> Any:
        original = inspect.getattr_static(owner, attr)
        fn = original.__func__ if isinstance(original, staticmethod) else original
        name = attr if isinstance(owner, type(threading)) else f"{owner.__name__}.{attr}"

        def wrapped(*args: Any, **kwargs: Any) -> Any:
            self.note(name)
            return fn(*args, **kwargs)

        return staticmethod(wrapped) if static else wrapped


def lock_taken_elsewhere(lock: Any) -> bool:
    """True when any thread (the caller too) holds ``lock``: asked from a helper thread, which an
    RLock held by the caller does not let in, without waiting."""
    held: list[bool] = []

    def probe() -> None:
        got = lock.acquire(blocking=False)
        if got:
            lock.release()
        held.append(not got)

    t = threading.Thread(target=probe)
    t.start()
    t.join()
    return held[0]


@pytest.fixture
def threads(monkeypatch: pytest.MonkeyPatch) -> Threads:
    seen = Threads()
    monkeypatch.setattr(Catalog, "check_file", seen.wrap(Catalog, "check_file", static=True))
    monkeypatch.setattr(Catalog, "check_path", seen.wrap(Catalog, "check_path"))
    for attr in ("resolve", "get", "add_history", "close"):
        monkeypatch.setattr(Registry, attr, seen.wrap(Registry, attr))
    monkeypatch.setattr(catalog_module, "component_requests", seen.wrap(catalog_module, "component_requests"))
    caches: list[RamCache] = []
    init = RamCache.__init__

    def remember(cache: RamCache, *args: Any, **kwargs: Any) -> None:
        init(cache, *args, **kwargs)
        caches.append(cache)

    monkeypatch.setattr(RamCache, "__init__", remember)
    unlink = Path.unlink

    def watched_unlink(path: Path, missing_ok: bool = False) -> None:
        for cache in caches:
            if path.parent == cache.shm_dir and path.name.startswith("modelkeeper-") and path.exists():
                seen.note("unlink of a segment")
                if lock_taken_elsewhere(cache._lock):
                    seen.unlinks_under_lock.append(path.name)
        unlink(path, missing_ok=missing_ok)

    monkeypatch.setattr(Path, "unlink", watched_unlink)
    return seen


def test_loads_unloads_evictions_and_drops_leave_the_loop_free(
    demo: DemoManifest, tmp_path: Path, threads: Threads
) -> None:
    async def body() -> None:
        threads.loop_thread = threading.get_ident()
        # room for SD15's segments, not for the UNet's beside them: caching the UNet evicts
        async with serving(demo, tmp_path, ram_cache_bytes=10 * MiB) as orch:
            for _ in range(2):  # from disk (the segments fill alongside), then from RAM
                placed = (await orch.loads.load(SD15))["result"]
                await orch.feed.wait_for_fills()
                await orch.loads.unload(SD15)
            assert set(placed["sources"].values()) == {"ram"}
            assert orch.feed.cache.stats()["segments"] > 0
            await orch.feed.cache_model(UNET)  # evicts SD15's segments in the fill's thread
            assert orch.feed.cache.evictions > 0
            segment = orch.feed.segments()[0]["component_id"]
            await orch.feed.drop(segment)
            await orch.loads.load(SD15)
            await orch.feed.wait_for_fills()
            assert (await orch.feed.clear(force=True))["dropped"] > 0
        await asyncio.sleep(0)

    run(body)
    for name in (
        "Catalog.check_file",
        "Catalog.check_path",
        "Registry.resolve",
        "Registry.add_history",
        "Registry.close",
        "component_requests",
        "unlink of a segment",
    ):
        assert threads.calls[name] > 0, f"{name} never ran: the test no longer reaches it"
    assert threads.on_loop == [], f"blocking calls ran on the event loop's thread: {threads.on_loop}"
    assert threads.unlinks_under_lock == [], (
        f"segments unlinked while the cache's lock was held: {threads.unlinks_under_lock}"
    )
