"""Hashing: BLAKE3 (content id, multithreaded) and SHA-256 (with its AutoV2 short form) in one read,
plus component content ids.

A component content id is BLAKE3 over the sorted list of ``dtype:blake3(tensor bytes)`` of the
component's tensors: names and shapes do not enter it, so the same VAE inside several checkpoints,
or in the original and the diffusers layout, has one id.

The file is memory-mapped and walked once, chunk by chunk: the file's BLAKE3 (multithreaded)
runs on the calling thread while SHA-256 and the per-tensor hashes run on two helper threads, all
over the same pages (hashlib and blake3 release the GIL).
"""

from __future__ import annotations

import mmap
import os
import threading
from collections.abc import Callable, Mapping, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from hashlib import sha256 as _sha256
from pathlib import Path
from typing import Any

from blake3 import blake3

from modelkeeper.discovery.errors import FileVanished

CHUNK_SIZE = 64 * 1024 * 1024
ProgressFn = Callable[[int], None]


@dataclass(frozen=True)
class TensorSpan:
    begin: int  # absolute offsets in the file
    end: int
    dtype: str


@dataclass
class FileHashes:
    blake3: str
    sha256: str | None
    size: int
    component_ids: dict[str, str] = field(default_factory=dict)
    digests: dict[str, list[tuple[str, str]]] = field(
        default_factory=dict
    )  # component -> (dtype, tensor blake3)

    @property
    def autov2(self) -> str | None:
        return self.sha256[:10] if self.sha256 else None


class HashingCancelled(Exception):
    """The cancel event was set while hashing ``args[0]`` (the path)."""


def content_id(entries: Sequence[tuple[str, str]]) -> str:
    """Content id of a component from its tensors' (dtype, blake3 hex digest)."""
    text = "\n".join(sorted(f"{dtype}:{digest}" for dtype, digest in entries))
    return blake3(text.encode()).hexdigest()


class _TensorHashes:
    """Per-tensor BLAKE3s fed chunk by chunk, in file order."""

    def __init__(self, spans: Mapping[str, Sequence[TensorSpan]]) -> None:
        self.items = sorted(((s.begin, s.end, s.dtype, comp) for comp, ss in spans.items() for s in ss))
        self.next = 0
        self.active: list[tuple[int, int, str, str, Any]] = []
        self.done: dict[str, list[tuple[str, str]]] = {comp: [] for comp in spans}

    def feed(self, view: memoryview, start: int, stop: int) -> None:
        while self.next < len(self.items) and self.items[self.next][0] < stop:
            begin, end, dtype, comp = self.items[self.next]
            self.active.append((begin, end, dtype, comp, blake3()))
            self.next += 1
        still = []
        for begin, end, dtype, comp, h in self.active:
            a, b = max(begin, start), min(end, stop)
            if a < b:
                h.update(view[a - start : b - start])
            if end <= stop:
                self.done[comp].append((dtype, h.hexdigest()))
            else:
                still.append((begin, end, dtype, comp, h))
        self.active = still

    def finish(self) -> dict[str, list[tuple[str, str]]]:
        for _begin, _end, dtype, comp, h in self.active:  # tensors past the end: a truncated file
            self.done[comp].append((dtype, h.hexdigest()))
        self.active = []
        return {comp: entries for comp, entries in self.done.items() if entries}


def hash_file(
    path: str | os.PathLike[str],
    *,
    sha256: bool = True,
    spans: Mapping[str, Sequence[TensorSpan]] | None = None,
    chunk_size: int = CHUNK_SIZE,
    progress: ProgressFn | None = None,
    cancel: threading.Event | None = None,
) -> FileHashes:
    """BLAKE3 and SHA-256 of ``path`` in one pass, and the content ids of ``spans``' components."""
    b3 = blake3(max_threads=blake3.AUTO)
    sha = _sha256() if sha256 else None
    tensors = _TensorHashes(spans) if spans else None
    try:
        f = open(path, "rb")  # noqa: SIM115 - closed below, after the map
    except FileNotFoundError as exc:
        raise FileVanished(f"{path}: deleted before hashing", path=str(path)) from exc
    with f:
        size = os.fstat(f.fileno()).st_size
        if size == 0:
            return FileHashes(b3.hexdigest(), sha.hexdigest() if sha else None, 0)
        with mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ) as mm, ThreadPoolExecutor(2) as helpers:
            if hasattr(mm, "madvise"):
                mm.madvise(mmap.MADV_SEQUENTIAL)
            view = memoryview(mm)
            pending: list[Future[None]] = []
            chunk: memoryview | None = None
            try:
                for start in range(0, size, chunk_size):
                    if cancel is not None and cancel.is_set():
                        raise HashingCancelled(str(path))
                    stop = min(start + chunk_size, size)
                    for job in pending:
                        job.result()
                    if chunk is not None:
                        chunk.release()
                    chunk = view[start:stop]
                    pending = []
                    if sha is not None:
                        pending.append(helpers.submit(sha.update, chunk))
                    if tensors is not None:
                        pending.append(helpers.submit(tensors.feed, chunk, start, stop))
                    b3.update(chunk)
                    if progress is not None:
                        progress(stop - start)
                for job in pending:
                    job.result()
            finally:
                for job in pending:
                    job.exception()  # let the helpers finish with the map before it closes
                if chunk is not None:
                    chunk.release()
                view.release()
    digests = tensors.finish() if tensors else {}
    ids = {comp: content_id(entries) for comp, entries in digests.items()}
    return FileHashes(b3.hexdigest(), sha.hexdigest() if sha else None, size, ids, digests)


def hash_folder(
    files: Mapping[str, Sequence[Path]],
    spans: Mapping[str, Mapping[Path, Sequence[TensorSpan]]],
    folder: Path,
    *,
    progress: ProgressFn | None = None,
    cancel: threading.Event | None = None,
) -> FileHashes:
    """A diffusers folder: its BLAKE3 is over ``relpath:blake3`` of its weight files; each
    component's content id is over the tensors of all its files. No SHA-256 (no tool has one)."""
    lines: list[str] = []
    per_component: dict[str, list[tuple[str, str]]] = {}
    total = 0
    for comp, paths in files.items():
        for p in paths:
            file_spans = spans.get(comp, {}).get(p, [])
            h = hash_file(
                p,
                sha256=False,
                spans={"_": file_spans} if file_spans else None,
                progress=progress,
                cancel=cancel,
            )
            total += h.size
            lines.append(f"{p.relative_to(folder).as_posix()}:{h.blake3}")
            per_component.setdefault(comp, []).extend(h.digests.get("_", []))
    digest = blake3("\n".join(sorted(lines)).encode()).hexdigest()
    ids = {c: content_id(e) for c, e in per_component.items() if e}
    return FileHashes(digest, None, total, ids, per_component)
