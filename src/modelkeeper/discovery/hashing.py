"""Hashing: BLAKE3 (content id, multithreaded) and SHA-256 (with its AutoV2 short form) in one read,
plus component content ids.

A component content id is BLAKE3 over the sorted list of ``dtype:blake3(tensor bytes)`` of the
component's tensors: names and shapes do not enter it, so the same VAE inside several checkpoints,
or in the original and the diffusers layout, has one id.

The file is read once, chunk by chunk, with plain reads into two reused buffers: while one chunk
is hashed (the file's BLAKE3, multithreaded, on the calling thread; SHA-256 and the per-tensor
hashes on two helper threads; hashlib and blake3 release the GIL), a reader thread fills the other.

The file is never memory-mapped: a user may overwrite or truncate it while it is hashed (``cp``
truncates first), and a mapped page past the new end faults with SIGBUS, which kills the process.
A read past the end returns short instead; that, or a change of the file's size, mtime, ctime or
inode between the start and the end of the read, raises :class:`FileChanged` naming the file.
"""

from __future__ import annotations

import os
import threading
from collections.abc import Callable, Mapping, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from hashlib import sha256 as _sha256
from pathlib import Path
from typing import Any

from blake3 import blake3

from modelkeeper.discovery.errors import FileChanged, FileVanished

#: Small enough that a chunk read into a buffer is still in the CPU's cache when it is hashed
#: (64 MiB chunks hashed at half the speed on a 32 MiB L3).
CHUNK_SIZE = 4 * 1024 * 1024
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


def _stamp(st: os.stat_result) -> tuple[int, int, int]:
    """What changes when a file's bytes do: size, mtime and ctime (a rewrite that restores the mtime,
    as ``cp -p`` does, still moves the ctime)."""
    return st.st_size, st.st_mtime_ns, st.st_ctime_ns


def _read_exact(fd: int, view: memoryview, offset: int, size: int, path: str | os.PathLike[str]) -> None:
    """Fill ``view`` from ``offset``; a file that ends early was truncated while it was read."""
    got = 0
    while got < len(view):
        n = os.preadv(fd, [view[got:]], offset + got)
        if n <= 0:
            raise FileChanged(
                f"{path}: ended at byte {offset + got:,} of {size:,} while it was hashed "
                "(truncated or rewritten meanwhile); it is hashed again after the next scan",
                path=str(path),
            )
        got += n


def _check_unchanged(fd: int, path: str | os.PathLike[str], before: os.stat_result) -> None:
    """Raise :class:`FileChanged` when the open file, or what ``path`` names, differs from ``before``."""
    after = os.fstat(fd)
    try:
        now = os.stat(path)
    except FileNotFoundError:
        raise FileChanged(
            f"{path}: deleted or renamed while it was hashed; it is hashed again after the next scan",
            path=str(path),
        ) from None
    if _stamp(after) != _stamp(before) or (now.st_dev, now.st_ino) != (after.st_dev, after.st_ino):
        raise FileChanged(
            f"{path}: changed while it was hashed (size {before.st_size:,} -> {now.st_size:,} bytes, "
            f"mtime {before.st_mtime_ns} -> {now.st_mtime_ns}); it is hashed again after the next scan",
            path=str(path),
        )


def hash_file(
    path: str | os.PathLike[str],
    *,
    sha256: bool = True,
    spans: Mapping[str, Sequence[TensorSpan]] | None = None,
    chunk_size: int = CHUNK_SIZE,
    progress: ProgressFn | None = None,
    cancel: threading.Event | None = None,
) -> FileHashes:
    """BLAKE3 and SHA-256 of ``path`` in one pass, and the content ids of ``spans``' components.

    Raises :class:`FileVanished` (no such file), :class:`FileChanged` (truncated, rewritten or
    replaced while read), :class:`HashingCancelled`, or ``OSError`` (unreadable).
    ``progress`` hears of each chunk once it is hashed."""
    b3 = blake3(max_threads=blake3.AUTO)
    sha = _sha256() if sha256 else None
    tensors = _TensorHashes(spans) if spans else None
    try:
        fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
    except FileNotFoundError as exc:
        raise FileVanished(f"{path}: deleted before hashing", path=str(path)) from exc
    try:
        before = os.fstat(fd)
        size = before.st_size
        if size:
            if hasattr(os, "posix_fadvise"):  # Linux: read ahead further
                os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_SEQUENTIAL)
            _hash_chunks(fd, path, size, chunk_size, b3, sha, tensors, progress, cancel)
        _check_unchanged(fd, path, before)
    finally:
        os.close(fd)
    digests = tensors.finish() if tensors else {}
    ids = {comp: content_id(entries) for comp, entries in digests.items()}
    return FileHashes(b3.hexdigest(), sha.hexdigest() if sha else None, size, ids, digests)


def _hash_chunks(
    fd: int,
    path: str | os.PathLike[str],
    size: int,
    chunk_size: int,
    b3: Any,
    sha: Any,
    tensors: _TensorHashes | None,
    progress: ProgressFn | None,
    cancel: threading.Event | None,
) -> None:
    """Read ``size`` bytes of ``fd`` into two buffers in turn and feed every hash, each chunk once."""
    length = min(chunk_size, size)
    buffers = [memoryview(bytearray(length)), memoryview(bytearray(length))]
    # Threads: the reader, SHA-256, the tensors. Leaving the block waits for them all.
    with ThreadPoolExecutor(3, thread_name_prefix="modelkeeper-hash") as helpers:
        reading = helpers.submit(_read_exact, fd, buffers[0][:length], 0, size, path)
        for i, start in enumerate(range(0, size, chunk_size)):
            if cancel is not None and cancel.is_set():
                raise HashingCancelled(str(path))
            stop = min(start + chunk_size, size)
            chunk = buffers[i % 2][: stop - start]
            reading.result()
            if stop < size:  # the other buffer's chunk is fully hashed: read the next one into it
                after = buffers[(i + 1) % 2][: min(stop + chunk_size, size) - stop]
                reading = helpers.submit(_read_exact, fd, after, stop, size, path)
            pending: list[Future[None]] = []
            if sha is not None:
                pending.append(helpers.submit(sha.update, chunk))
            if tensors is not None:
                pending.append(helpers.submit(tensors.feed, chunk, start, stop))
            b3.update(chunk)
            for job in pending:
                job.result()
            if progress is not None:
                progress(stop - start)


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
