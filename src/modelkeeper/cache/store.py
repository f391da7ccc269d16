"""The RAM cache: segments in shared memory under a byte budget, with eviction.

The orchestrator owns one ``RamCache``. Components are cached by component id (the registry's
content id when there is one, so the same VAE inside several checkpoints is held once; else an
id made from the file's identity). Workers map segments read-only by path.

Eviction frees the least valuable segments first: least recently used, weighted by the cost of
bringing a segment back (the seconds it took to fill), so an old, cheap segment goes before a
recent or expensive one. Segments pinned by ``acquire`` (a worker is
loading from them) are never evicted.
"""

from __future__ import annotations

import itertools
import os
import threading
import time
from collections.abc import Callable, Iterable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import blake3
import psutil

from modelkeeper.cache.errors import CacheFull, SegmentInUse, SegmentNotFound
from modelkeeper.cache.prefix import resolve_segment
from modelkeeper.cache.segment import (
    SHM_DIR,
    Progress,
    create_segment,
    plan_layout,
    remove_stale,
    segment_path,
    source_header,
)
from modelkeeper.formats.pickle_sandbox import PICKLE_SUFFIXES, convert_pickle_to_safetensors

COST_WEIGHT = 10.0
_INSTANCES = itertools.count()
_REMOVALS = itertools.count()  # names a removed segment's file aside until it is unlinked


@dataclass
class Segment:
    component_id: str
    path: Path
    size: int
    source: str
    tensors: list[str] | None
    fill_seconds: float
    created_at: float = field(default_factory=time.time)
    last_used: float = field(default_factory=time.time)
    hits: int = 0
    models: set[str] = field(default_factory=set)
    pins: int = 0

    def info(self) -> dict[str, Any]:
        return {
            "component_id": self.component_id,
            "path": str(self.path),
            "bytes": self.size,
            "source": self.source,
            "tensor_count": None if self.tensors is None else len(self.tensors),
            "fill_seconds": round(self.fill_seconds, 6),
            "created_at": self.created_at,
            "last_used": self.last_used,
            "hits": self.hits,
            "models": sorted(self.models),
            "pinned": self.pins > 0,
        }

    def value(self, now: float) -> float:
        """Higher is more worth keeping: recency, plus the refill cost (a second of filling counts as
        COST_WEIGHT seconds of recency), so an old, cheap segment goes before a recent or costly one."""
        return self.last_used + COST_WEIGHT * self.fill_seconds - now


def default_budget() -> int:
    return int(psutil.virtual_memory().available // 2)


def file_component_id(path: Path, tensors: Iterable[str] | None = None) -> str:
    """An id from the file's identity (path, size, mtime, inode) and the tensor subset."""
    st = path.stat()
    h = blake3.blake3(f"{path.resolve()}|{st.st_size}|{st.st_mtime_ns}|{st.st_ino}".encode())
    if tensors is not None:
        h.update("|".join(sorted(tensors)).encode())
    return "f" + h.hexdigest()[:31]


class RamCache:
    """Components in shared memory under a byte budget. Thread-safe."""

    def __init__(
        self,
        budget_bytes: int | None = None,
        *,
        shm_dir: Path = SHM_DIR,
        threads: int = 8,
        on_remove: Callable[[Segment], None] | None = None,
    ) -> None:
        """``on_remove`` hears of every segment dropped or evicted (under the cache's lock: it must
        not block), so that workers can be told to unmap it."""
        self.budget_bytes = default_budget() if budget_bytes is None else budget_bytes
        self.on_remove = on_remove
        self.shm_dir = shm_dir
        self.threads = threads
        self._segments: dict[str, Segment] = {}
        self._lock = threading.RLock()
        self._filling: dict[str, threading.Event] = {}
        self._doomed: list[Path] = []  # files of removed segments, unlinked outside the lock
        self.hits = 0
        self.misses = 0
        self.evictions = 0
        self.evicted_bytes = 0
        self.instance = next(_INSTANCES)
        self.removed_stale = remove_stale(shm_dir)

    # ------------------------------------------------------------------ queries

    def segment_path(self, component_id: str) -> Path:
        """Where this cache keeps (or would keep) the segment of ``component_id``."""
        return segment_path(component_id, shm_dir=self.shm_dir, cache=self.instance)

    @property
    def used_bytes(self) -> int:
        with self._lock:
            return sum(s.size for s in self._segments.values())

    def segments(self) -> list[dict[str, Any]]:
        with self._lock:
            return [s.info() for s in sorted(self._segments.values(), key=lambda s: s.created_at)]

    def stats(self) -> dict[str, Any]:
        with self._lock:
            lookups = self.hits + self.misses
            return {
                "segments": len(self._segments),
                "bytes_used": self.used_bytes,
                "budget_bytes": self.budget_bytes,
                "hits": self.hits,
                "misses": self.misses,
                "hit_rate": self.hits / lookups if lookups else 0.0,
                "evictions": self.evictions,
                "evicted_bytes": self.evicted_bytes,
                "shm_dir": str(self.shm_dir),
            }

    def get(self, component_id: str) -> Segment:
        with self._lock:
            seg = self._segments.get(component_id)
            if seg is None:
                raise SegmentNotFound(f"no cached component {component_id!r}", component_id=component_id)
            return seg

    def resolve(self, prefix: str) -> str:
        """The id of the one segment ``prefix`` names: its id or a unique prefix of it
        (:func:`~modelkeeper.cache.prefix.resolve_segment`)."""
        with self._lock:
            return resolve_segment(prefix, self._segments)

    def __contains__(self, component_id: object) -> bool:
        with self._lock:
            return component_id in self._segments

    # ------------------------------------------------------------------ filling

    def lookup(
        self,
        path: str | os.PathLike[str],
        *,
        component_id: str | None = None,
        tensors: Iterable[str] | None = None,
        model: str | None = None,
    ) -> Segment | None:
        """The segment of ``path`` (or of its tensors) when it is cached (a hit), else None at once:
        a miss, or a fill still under way, counts nothing (the fill counts its miss)."""
        cid = component_id or file_component_id(Path(path), None if tensors is None else list(tensors))
        with self._lock:
            return self._hit(cid, model)

    def _hit(self, cid: str, model: str | None) -> Segment | None:
        """The segment of ``cid``, counted as a hit, or None (the caller holds the lock)."""
        seg = self._segments.get(cid)
        if seg is None:
            return None
        self.hits += 1
        seg.hits += 1
        seg.last_used = time.time()
        if model:
            seg.models.add(model)
        return seg

    def cache_file(
        self,
        path: str | os.PathLike[str],
        *,
        component_id: str | None = None,
        tensors: Iterable[str] | None = None,
        model: str | None = None,
        progress: Progress | None = None,
    ) -> Segment:
        """The segment of ``path`` (or of its tensors ``tensors``), filling it on a miss.

        Concurrent calls for the same component fill it once; the others wait and hit.
        """
        source = Path(path)
        names = None if tensors is None else list(tensors)
        cid = component_id or file_component_id(source, names)
        while True:
            with self._lock:
                seg = self._hit(cid, model)
                if seg is not None:
                    return seg
                waiter = self._filling.get(cid)
                if waiter is None:
                    self.misses += 1
                    self._filling[cid] = threading.Event()
                    break
            waiter.wait()
        try:
            seg = self._fill(source, cid, names, progress)
            if model:
                seg.models.add(model)
            return seg
        finally:
            with self._lock:
                self._filling.pop(cid).set()

    def _fill(self, source: Path, cid: str, names: list[str] | None, progress: Progress | None) -> Segment:
        if source.suffix.lower() in PICKLE_SUFFIXES:
            estimate = source.stat().st_size
        else:  # a component of a checkpoint needs only its own tensors' room
            estimate = plan_layout(source_header(source), names)[2]
        self._make_room(estimate, cid)
        dest = self.segment_path(cid)
        dest.unlink(missing_ok=True)
        if source.suffix.lower() in PICKLE_SUFFIXES:
            started = time.perf_counter()
            convert_pickle_to_safetensors(source, dest)
            size, seconds = dest.stat().st_size, time.perf_counter() - started
        else:
            size, seconds = create_segment(source, dest, names=names, threads=self.threads, progress=progress)
        seg = Segment(cid, dest, size, str(source), names, seconds)
        with self._lock:
            self._segments[cid] = seg
            over = self.used_bytes - self.budget_bytes
        if over > 0:  # the estimate was low (pickle conversion): make room after the fact
            try:
                self._make_room(0, cid)
            except CacheFull:
                self.drop(cid)
                raise
        return seg

    def adopt(
        self,
        path: str | os.PathLike[str],
        *,
        source: str | os.PathLike[str],
        component_id: str | None = None,
        model: str | None = None,
    ) -> Segment:
        """Take a complete safetensors file already in shared memory (``path``, on the cache's
        filesystem: bytes received from another node) as the segment of the whole file ``source``,
        without copying it: the segment is a hard link to it. A cached component is a hit."""
        src = Path(source)
        cid = component_id or file_component_id(src)
        with self._lock:
            seg = self._hit(cid, model)
            if seg is not None:
                return seg
        started = time.perf_counter()
        size = Path(path).stat().st_size
        self._make_room(size, cid)
        dest = self.segment_path(cid)
        dest.unlink(missing_ok=True)
        os.link(path, dest)
        seg = Segment(cid, dest, size, str(src), None, time.perf_counter() - started)
        if model:
            seg.models.add(model)
        with self._lock:
            self._segments[cid] = seg
        return seg

    def _make_room(self, incoming: int, keep: str) -> None:
        with self._lock:
            need = self.used_bytes + incoming - self.budget_bytes
            if need <= 0:
                return
            now = time.time()
            candidates = sorted(
                (s for s in self._segments.values() if s.pins == 0 and s.component_id != keep),
                key=lambda s: s.value(now),
            )
            chosen: list[Segment] = []
            freed = 0
            for seg in candidates:
                if freed >= need:
                    break
                chosen.append(seg)
                freed += seg.size
            if freed < need:
                raise CacheFull(
                    f"{incoming} bytes do not fit the RAM cache budget of {self.budget_bytes} bytes "
                    f"({self.used_bytes} used, {freed} evictable)",
                    required_bytes=incoming,
                    budget_bytes=self.budget_bytes,
                )
            for seg in chosen:
                self._remove(seg)
                self.evictions += 1
                self.evicted_bytes += seg.size
        self._reap()

    # ------------------------------------------------------------------ pins and removal

    @contextmanager
    def acquire(self, component_id: str) -> Iterator[Segment]:
        """Pin a segment while a worker loads from it: it is not evicted or dropped meanwhile."""
        with self._lock:
            seg = self.get(component_id)
            seg.pins += 1
            seg.last_used = time.time()
        try:
            yield seg
        finally:
            with self._lock:
                seg.pins -= 1

    def drop(self, component_id: str, *, force: bool = False) -> int:
        try:
            with self._lock:
                return self._drop(component_id, force)
        finally:
            self._reap()

    def drop_all(self, *, force: bool = False) -> int:
        try:
            with self._lock:
                ids = [s.component_id for s in self._segments.values() if force or s.pins == 0]
                return sum(self._drop(cid, force) for cid in ids)
        finally:
            self._reap()

    def _drop(self, component_id: str, force: bool) -> int:
        seg = self.get(component_id)
        if seg.pins and not force:
            raise SegmentInUse(
                f"component {component_id!r} is being loaded by a worker", component_id=component_id
            )
        self._remove(seg)
        return seg.size

    def _remove(self, seg: Segment) -> None:
        """Forget ``seg`` and move its file aside (the caller holds the lock). Renaming is O(1);
        unlinking a segment frees its pages (~0.2 s a GB of tmpfs), which ``_reap`` does once the
        lock is released: a status query or a pin waiting for the lock never waits for that. The
        name aside keeps the owner's pid, so a crash before ``_reap`` leaves a stale segment that
        ``remove_stale`` finds; a new fill of the component writes its usual name meanwhile."""
        self._segments.pop(seg.component_id, None)
        aside = seg.path.with_name(f"{seg.path.stem}.removed-{next(_REMOVALS)}{seg.path.suffix}")
        try:
            seg.path.rename(aside)
            self._doomed.append(aside)
        except FileNotFoundError:
            pass
        if self.on_remove is not None:
            self.on_remove(seg)

    def _reap(self) -> None:
        """Unlink the files of removed segments, outside the lock (see ``_remove``)."""
        with self._lock:
            doomed, self._doomed = self._doomed, []
        for path in doomed:
            path.unlink(missing_ok=True)

    def close(self) -> None:
        """Remove every segment (the orchestrator is stopping)."""
        self.drop_all(force=True)
