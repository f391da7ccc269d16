"""One component in POSIX shared memory, in safetensors byte layout.

A segment is a file under ``/dev/shm`` named ``modelkeeper-<pid>-<id>.safetensors``: the pid of
the process that owns it (the orchestrator) lets a later start find and remove the leftovers of
a dead owner. Its bytes are a valid safetensors file, so a worker maps it read-only and parses it
like any file; mapping costs no copy.

Filling reads the source with several threads straight into the mapping (``os.preadv``): no
intermediate buffer. Only the segment (the cache's own file, its pages reserved first) is mapped,
never the user's source, so a source truncated while it is copied cannot fault (SIGBUS): a read
past its new end returns short. That, or a source whose size, mtime, ctime or inode changed between
its header's read and the end of the copy, raises :class:`SourceChanged` naming the file, and the
half-filled segment is removed. A whole file is copied as is; a subset of tensors (one component of a full
checkpoint) is repacked under a new header, largest element size first, so every tensor stays
aligned to its element size. A GGUF file is always repacked: its blocks become uint8 tensors, their
quant types go into the segment's metadata, and a worker reads them as it reads the GGUF file.
"""

from __future__ import annotations

import json
import mmap
import os
import re
import time
from collections.abc import Callable, Iterable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

from modelkeeper.cache.errors import CacheFull, SourceChanged
from modelkeeper.formats.errors import InvalidModelFile
from modelkeeper.formats.gguf_header import as_safetensors_header
from modelkeeper.formats.safetensors_header import DTYPE_BITS, SafetensorsHeader, TensorInfo, read_header

SHM_DIR = Path("/dev/shm")
PREFIX = "modelkeeper"
CHUNK = 64 * 1024 * 1024
_NAME = re.compile(rf"^{PREFIX}-(\d+)-([A-Za-z0-9_.-]+)\.safetensors$")

Progress = Callable[[int, int], None]


def segment_path(
    component_id: str, *, shm_dir: Path = SHM_DIR, pid: int | None = None, cache: int | None = None
) -> Path:
    """``modelkeeper-<owner pid>-[<cache instance>-]<component id>.safetensors``: the pid finds the
    leftovers of dead owners; the instance keeps two caches of one process apart."""
    safe = re.sub(r"[^A-Za-z0-9_.-]", "_", component_id)[:180]
    tag = "" if cache is None else f"{cache}-"
    return shm_dir / f"{PREFIX}-{pid if pid is not None else os.getpid()}-{tag}{safe}.safetensors"


def owner_pid(path: Path) -> int | None:
    match = _NAME.match(path.name)
    return int(match.group(1)) if match else None


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def remove_stale(shm_dir: Path = SHM_DIR) -> list[Path]:
    """Unlink the segments whose owner process is gone. Returns what was removed."""
    removed: list[Path] = []
    if not shm_dir.is_dir():
        return removed
    for path in shm_dir.iterdir():
        pid = owner_pid(path)
        if pid is not None and pid != os.getpid() and not _alive(pid):
            try:
                path.unlink()
                removed.append(path)
            except FileNotFoundError:
                pass
    return removed


@dataclass(frozen=True)
class CopyJob:
    src: int
    dst: int
    length: int


def source_header(source: Path) -> SafetensorsHeader:
    """The tensors of a source file: a safetensors header, or a GGUF file's tensors described as one
    (quantized blocks as uint8 rows, their types in the metadata), which a segment repacks."""
    if source.suffix.lower() == ".gguf":
        return as_safetensors_header(source)
    return read_header(source)


def plan_layout(header: SafetensorsHeader, names: Iterable[str] | None) -> tuple[bytes, list[CopyJob], int]:
    """(header bytes, copy jobs, total size) for a segment holding ``names`` (all when None; a GGUF
    source is always repacked, never copied as is)."""
    if names is None and header.path.suffix.lower() == ".gguf":
        names = list(header.tensors)
    if names is None:
        jobs = _chunk([CopyJob(0, 0, header.data_offset + header.data_size)])
        return b"", jobs, header.data_offset + header.data_size
    chosen: list[TensorInfo] = []
    for name in names:
        info = header.tensors.get(name)
        if info is None:
            raise InvalidModelFile(f"{header.path}: no tensor {name!r} to cache", path=str(header.path))
        chosen.append(info)
    chosen.sort(key=lambda t: (-DTYPE_BITS.get(t.dtype, 8), t.begin))
    entries: dict[str, object] = {}
    offset = 0
    runs: list[CopyJob] = []
    for info in chosen:
        size = info.end - info.begin
        entries[info.name] = {
            "dtype": info.dtype,
            "shape": list(info.shape),
            "data_offsets": [offset, offset + size],
        }
        src = header.data_offset + info.begin
        if runs and runs[-1].src + runs[-1].length == src and runs[-1].dst + runs[-1].length == offset:
            last = runs.pop()
            runs.append(CopyJob(last.src, last.dst, last.length + size))
        elif size:
            runs.append(CopyJob(src, offset, size))
        offset += size
    entries["__metadata__"] = dict(header.metadata)
    raw = json.dumps(entries, separators=(",", ":")).encode()
    raw += b" " * (-(8 + len(raw)) % 8)
    head = len(raw).to_bytes(8, "little") + raw
    jobs = [CopyJob(j.src, j.dst + len(head), j.length) for j in runs]
    return head, _chunk(jobs), len(head) + offset


def _chunk(jobs: list[CopyJob]) -> list[CopyJob]:
    out = []
    for job in jobs:
        for start in range(0, job.length, CHUNK):
            n = min(CHUNK, job.length - start)
            out.append(CopyJob(job.src + start, job.dst + start, n))
    return out


def create_segment(
    source: Path,
    dest: Path,
    *,
    names: Iterable[str] | None = None,
    threads: int = 8,
    progress: Progress | None = None,
) -> tuple[int, float]:
    """Write ``source`` (or the tensors ``names`` of it) into a new segment file ``dest``.

    Returns (size in bytes, seconds). The file is created exclusively and removed again if
    anything fails, so a half-filled segment is never left behind.
    """
    started = time.perf_counter()
    header = source_header(source)
    head, jobs, size = plan_layout(header, names)
    fd_out = os.open(dest, os.O_RDWR | os.O_CREAT | os.O_EXCL, 0o600)
    try:
        try:  # reserve the pages now: a full tmpfs would otherwise fault (SIGBUS) while filling
            os.posix_fallocate(fd_out, 0, max(size, 1))
        except OSError as exc:
            raise CacheFull(
                f"{dest.parent} has no room for {size} bytes: {exc}", required_bytes=size
            ) from None
        with mmap.mmap(fd_out, max(size, 1), mmap.MAP_SHARED, mmap.PROT_READ | mmap.PROT_WRITE) as mm:
            view = memoryview(mm)
            try:
                view[: len(head)] = head
                _parallel_read(source, view, jobs, threads, progress, file_size=header.file_size)
            finally:
                view.release()
    except BaseException:
        os.close(fd_out)
        dest.unlink(missing_ok=True)
        raise
    os.close(fd_out)
    return size, time.perf_counter() - started


def _stamp(st: os.stat_result) -> tuple[int, int, int, int, int]:
    """What changes when a file's bytes do (or another file takes its name)."""
    return st.st_size, st.st_mtime_ns, st.st_ctime_ns, st.st_dev, st.st_ino


def _changed(source: Path, what: str) -> SourceChanged:
    return SourceChanged(
        f"{source}: {what} while it was copied into the RAM cache (a copy over it still running?); "
        "rescan it once it is complete",
        path=str(source),
    )


def _parallel_read(
    source: Path,
    view: memoryview,
    jobs: list[CopyJob],
    threads: int,
    progress: Progress | None,
    *,
    file_size: int,
) -> None:
    """Run ``jobs`` from ``source`` into ``view``; ``file_size``: the size its header was read at."""
    total = sum(j.length for j in jobs)
    done = 0
    fd = os.open(source, os.O_RDONLY | os.O_CLOEXEC)
    try:
        before = os.fstat(fd)
        if before.st_size != file_size:
            raise _changed(source, f"changed size ({file_size:,} -> {before.st_size:,} bytes)")

        def run(job: CopyJob) -> int:
            got = 0
            while got < job.length:
                n = os.preadv(fd, [view[job.dst + got : job.dst + job.length]], job.src + got)
                if n <= 0:
                    raise _changed(source, f"ended at byte {job.src + got:,} of {file_size:,}")
                got += n
            return got

        with ThreadPoolExecutor(max_workers=max(1, threads)) as pool:
            for n in pool.map(run, jobs):
                done += n
                if progress is not None:
                    progress(done, total)
        try:
            now = os.stat(source)
        except FileNotFoundError:
            raise _changed(source, "was deleted or renamed") from None
        if _stamp(os.fstat(fd)) != _stamp(before) or _stamp(now) != _stamp(before):
            raise _changed(source, "was rewritten or replaced")
    finally:
        os.close(fd)
