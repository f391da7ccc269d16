"""Memory mappings of safetensors files, registered with CUDA once, and the copy paths to a device.

- A RAM-cache segment (shared memory) is mapped once per worker and kept: on a CPU worker its
  tensors are views of the mapping (no copy at all); on a CUDA worker the mapping is page-locked
  (``cudaHostRegister``) once per segment lifetime and copied into one device allocation in large
  asynchronous chunks.
- An ordinary file on a CUDA worker is streamed: several reader threads ``pread`` into pinned
  staging buffers while the copy engine moves the previous buffers to the device (double
  buffering); on a CPU worker it is read into anonymous memory with parallel reads (a private
  mapping of a file that may change under us would not be safe to keep).

Either way a component ends as one allocation on its device, and each tensor is a view of it.
"""

from __future__ import annotations

import logging
import mmap
import os
import threading
import time
import warnings
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

import torch

from modelkeeper.formats.errors import InvalidModelFile
from modelkeeper.formats.gguf_header import as_safetensors_header
from modelkeeper.formats.safetensors_header import SafetensorsHeader, TensorInfo, read_header

log = logging.getLogger(__name__)

TORCH_DTYPES: dict[str, torch.dtype] = {
    "F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
    "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8, "U8": torch.uint8,
    "BOOL": torch.bool, "F8_E4M3": torch.float8_e4m3fn, "F8_E5M2": torch.float8_e5m2,
    "U16": torch.uint16, "U32": torch.uint32, "U64": torch.uint64,
}  # fmt: skip

COPY_CHUNK = 256 * 1024 * 1024
# 16 readers of 16 MB staging buffers: the best of the sweep on an H200 host (16 cores), 28 GB/s
# from the page cache against 21 GB/s for 8 of 64 MB (benchmarks/results/gpu_load-*-run6.log).
STAGE_CHUNK = int(float(os.environ.get("MODELKEEPER_STAGE_CHUNK_MB", "16")) * 1024 * 1024)
READ_THREADS = int(os.environ.get("MODELKEEPER_READ_THREADS", "0")) or min(16, os.cpu_count() or 4)
ALIGN = 256
CUDA_HOST_REGISTER_READ_ONLY = 8
_HEADER_CACHE: dict[tuple[str, int, int, int], SafetensorsHeader] = {}
_HEADER_LOCK = threading.Lock()


def cached_header(path: Path) -> SafetensorsHeader:
    """The validated header of ``path``, parsed once per (path, inode, size, mtime). A GGUF file's
    tensors are described as a safetensors header's (:func:`as_safetensors_header`), so every copy
    path below reads them the same way."""
    st = path.stat()
    key = (str(path), st.st_ino, st.st_size, st.st_mtime_ns)
    with _HEADER_LOCK:
        hit = _HEADER_CACHE.get(key)
    if hit is not None:
        return hit
    header = as_safetensors_header(path) if path.suffix.lower() == ".gguf" else read_header(path)
    with _HEADER_LOCK:
        if len(_HEADER_CACHE) >= 64:
            _HEADER_CACHE.pop(next(iter(_HEADER_CACHE)))
        _HEADER_CACHE[key] = header
    return header


Progress = Callable[[int, int], None]
Check = Callable[[], None]


def is_segment(path: Path) -> bool:
    """Segments of the RAM cache live in shared memory and are never changed once written."""
    return path.name.startswith("modelkeeper-") and str(path.resolve()).startswith("/dev/shm/")


@dataclass
class Mapping:
    """A copy-on-write mapping of a whole safetensors file and its validated header."""

    path: Path
    inode: int
    header: SafetensorsHeader
    mm: mmap.mmap
    host: torch.Tensor  # uint8 view of the whole file
    registered: bool = False
    read_only: bool = False
    closed: bool = False
    device_index: int = 0
    register_failed: bool = False

    @classmethod
    def open(cls, path: Path, *, read_only: bool = False) -> Mapping:
        """Map ``path``: shared and read-only for a CUDA worker (only the copy engine reads it),
        private copy-on-write for a CPU worker (its tensors are views; a write copies one page)."""
        header = cached_header(path)
        size = header.data_offset + header.data_size
        fd = os.open(path, os.O_RDONLY)
        try:
            st = os.fstat(fd)
            if read_only:
                mm = mmap.mmap(fd, max(size, 1), mmap.MAP_SHARED, mmap.PROT_READ)
            else:
                mm = mmap.mmap(fd, max(size, 1), mmap.MAP_PRIVATE, mmap.PROT_READ | mmap.PROT_WRITE)
        finally:
            os.close(fd)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", UserWarning)  # a read-only buffer, used only as a copy source
            host = (
                torch.frombuffer(mm, dtype=torch.uint8, count=size)
                if size
                else torch.empty(0, dtype=torch.uint8)
            )
        return cls(path, st.st_ino, header, mm, host, read_only=read_only)

    def register(self) -> None:
        """Page-lock the mapping for the CUDA copy engine (once per mapping)."""
        if self.registered or self.register_failed or self.host.numel() == 0:
            return
        flags = CUDA_HOST_REGISTER_READ_ONLY if self.read_only else 0
        with torch.cuda.device(self.device_index):  # no stray context on GPU 0 for a cuda:N worker
            err = torch.cuda.cudart().cudaHostRegister(self.host.data_ptr(), self.host.numel(), flags)
        if int(err) != 0:
            self.register_failed = True  # once: later loads copy from pageable memory without retrying
            log.warning("cudaHostRegister of %s failed (%s); copying from pageable memory", self.path, err)
            return
        self.registered = True

    def close(self) -> None:
        """Forget the mapping. A CUDA worker unregisters and unmaps it (only the copy engine read it);
        a CPU worker only drops its reference, since models may still hold views of the pages
        (``torch.frombuffer`` keeps the mmap object alive, not a buffer export, so an explicit
        ``mm.close()`` would unmap memory under live tensors)."""
        if self.closed:
            return
        self.closed = True
        if self.registered:
            with torch.cuda.device(self.device_index):
                torch.cuda.cudart().cudaHostUnregister(self.host.data_ptr())
            self.registered = False
            del self.host
            self.mm.close()


@dataclass
class MappingTable:
    """The segments this worker has mapped, kept until released (one registration per lifetime)."""

    read_only: bool = False
    device_index: int = 0
    mappings: dict[Path, Mapping] = field(default_factory=dict)
    lock: threading.Lock = field(default_factory=threading.Lock)
    _stages: list[torch.Tensor] = field(default_factory=list)

    def staging(self, count: int) -> list[torch.Tensor]:
        """Pinned staging buffers, allocated once per worker and reused by every streamed load."""
        with self.lock:
            if self._stages and self._stages[0].numel() != STAGE_CHUNK:
                self._stages.clear()
            while len(self._stages) < count:
                self._stages.append(torch.empty(STAGE_CHUNK, dtype=torch.uint8, pin_memory=True))
            return self._stages[:count]

    def get(self, path: Path) -> Mapping:
        with self.lock:
            current = self.mappings.get(path)
            try:
                inode = path.stat().st_ino
            except FileNotFoundError:
                inode = -1
            if current is not None and current.inode == inode:
                return current
            if current is not None:
                self.mappings.pop(path)
                current.close()
            mapping = Mapping.open(path, read_only=self.read_only)
            mapping.device_index = self.device_index
            self.mappings[path] = mapping
            return mapping

    def release(self, path: Path | None = None) -> list[str]:
        with self.lock:
            paths = list(self.mappings) if path is None else [path]
            released = []
            for p in paths:
                m = self.mappings.pop(p, None)
                if m is not None:
                    m.close()
                    released.append(str(p))
            return released


@dataclass(frozen=True)
class _Run:
    """A contiguous byte range of the file and where it lands in the device buffer."""

    src: int
    dst: int
    length: int


def _plan(header: SafetensorsHeader, infos: list[TensorInfo]) -> tuple[list[_Run], dict[str, int], int]:
    """Merge the tensors' ranges into runs; each run starts ALIGN-aligned in the destination."""
    runs: list[_Run] = []
    where: dict[str, int] = {}
    size = 0
    for info in sorted(infos, key=lambda t: t.begin):
        src = header.data_offset + info.begin
        n = info.end - info.begin
        if runs and runs[-1].src + runs[-1].length == src:
            last = runs[-1]
            where[info.name] = last.dst + last.length
            runs[-1] = _Run(last.src, last.dst, last.length + n)
        else:
            size += -size % ALIGN
            where[info.name] = size
            runs.append(_Run(src, size, n))
        size = runs[-1].dst + runs[-1].length
    return runs, where, size


def _views(buffer: torch.Tensor, infos: list[TensorInfo], where: dict[str, int]) -> dict[str, torch.Tensor]:
    out: dict[str, torch.Tensor] = {}
    for info in infos:
        dtype = TORCH_DTYPES.get(info.dtype)
        if dtype is None:
            raise InvalidModelFile(
                f"tensor {info.name!r}: dtype {info.dtype} is not loadable", tensor=info.name
            )
        start = where[info.name]
        raw = buffer[start : start + info.end - info.begin]
        if start % dtype.itemsize:
            raw = raw.clone()  # misaligned in the file: this tensor alone is copied
        out[info.name] = raw.view(dtype).view(info.shape)
    return out


def load_tensors(
    path: Path,
    names: list[str],
    device: torch.device,
    *,
    table: MappingTable,
    progress: Progress | None = None,
    check: Check | None = None,
    threads: int | None = None,
    stages: dict[str, float] | None = None,
    settle: list[Callable[[], None]] | None = None,
) -> dict[str, torch.Tensor]:
    """The tensors ``names`` of the safetensors file ``path`` on ``device``, as views of one allocation.

    ``stages`` (when given) gathers the seconds of the copy (``copy``: the bytes moved into the
    allocation, the device synchronised) and of the views (``views``).

    ``settle``: a copy from a RAM-cache segment to a CUDA device returns as soon as it is queued,
    and a wait for its end is appended to ``settle``; the caller calls it before it hands the
    tensors out. Meanwhile work queued on the device's current stream runs after the copy (the
    stream waits for it), so the host builds the module while the bytes are still moving. ``copy``
    is then the time to queue it."""
    segment = is_segment(path)
    if segment:
        mapping = table.get(path)
        header = mapping.header
    else:
        header = cached_header(path)
    infos = [header.tensors[n] for n in names]
    if segment and device.type == "cpu":
        where = {i.name: header.data_offset + i.begin for i in infos}
        if progress is not None:
            progress(sum(i.end - i.begin for i in infos), sum(i.end - i.begin for i in infos))
        return _views(mapping.host, infos, where)
    runs, where, size = _plan(header, infos)
    buffer = torch.empty(size, dtype=torch.uint8, device=device)
    if segment:
        mapping.register()
    started = time.perf_counter()
    if segment:
        _copy_from_mapping(mapping.host, buffer, runs, progress, check, settle)
    elif device.type == "cuda":
        _stream_to_device(path, buffer, runs, table, progress, check)
    else:
        _read_into(path, buffer, runs, threads or READ_THREADS, progress, check)
    copied = time.perf_counter()
    views = _views(buffer, infos, where)
    if stages is not None:
        stages["copy"] = stages.get("copy", 0.0) + copied - started
        stages["views"] = stages.get("views", 0.0) + time.perf_counter() - copied
    return views


def _pieces(runs: list[_Run], chunk: int) -> list[_Run]:
    return [
        _Run(r.src + off, r.dst + off, min(chunk, r.length - off))
        for r in runs
        for off in range(0, r.length, chunk)
    ]


def _copy_from_mapping(
    host: torch.Tensor,
    buffer: torch.Tensor,
    runs: list[_Run],
    progress: Progress | None,
    check: Check | None,
    settle: list[Callable[[], None]] | None = None,
) -> None:
    """Queue the copies of ``runs`` on a stream of their own; wait for them, or with ``settle``
    leave them running (see :func:`load_tensors`)."""
    pieces = _pieces(runs, COPY_CHUNK)
    total = sum(p.length for p in pieces)
    done = 0
    current = torch.cuda.current_stream(buffer.device)
    stream = torch.cuda.Stream(buffer.device)
    # ``buffer`` may reuse memory that work queued on the current stream still reads (a group freed
    # after its cast): the copies start after that work
    stream.wait_stream(current)
    queued = False
    try:
        with torch.cuda.stream(stream):
            for p in pieces:
                if check is not None:
                    check()
                buffer[p.dst : p.dst + p.length].copy_(host[p.src : p.src + p.length], non_blocking=True)
                done += p.length
                if progress is not None:
                    progress(done, total)
        queued = settle is not None
    finally:
        if queued and settle is not None:
            buffer.record_stream(stream)  # freed early (an error), its memory waits for the copies
            current.wait_stream(stream)
            settle.append(stream.synchronize)
        else:
            stream.synchronize()  # also on cancel: no copy may still write into a buffer handed back


def _pread_into(fd: int, target: memoryview, offset: int, path: Path) -> None:
    got = 0
    while got < len(target):
        n = os.preadv(fd, [target[got:]], offset + got)
        if n <= 0:
            raise InvalidModelFile(f"{path}: file ended early (changed while loading?)", path=str(path))
        got += n


def _read_into(
    path: Path,
    buffer: torch.Tensor,
    runs: list[_Run],
    threads: int,
    progress: Progress | None,
    check: Check | None,
) -> None:
    """Parallel reads straight into a CPU buffer."""
    pieces = _pieces(runs, STAGE_CHUNK)
    total = sum(p.length for p in pieces)
    view = buffer.numpy().data
    fd = os.open(path, os.O_RDONLY)
    done = 0
    try:
        with ThreadPoolExecutor(max_workers=threads) as pool:
            futures = [
                pool.submit(_pread_into, fd, view[p.dst : p.dst + p.length], p.src, path) for p in pieces
            ]
            for fut, p in zip(futures, pieces, strict=True):
                if check is not None:
                    try:
                        check()
                    except BaseException:
                        for f in futures:
                            f.cancel()
                        raise
                fut.result()
                done += p.length
                if progress is not None:
                    progress(done, total)
    finally:
        view.release()
        os.close(fd)


def _stream_to_device(
    path: Path,
    buffer: torch.Tensor,
    runs: list[_Run],
    table: MappingTable,
    progress: Progress | None,
    check: Check | None,
) -> None:
    """Readers fill pinned staging buffers; the copy engine drains them to the device meanwhile."""
    pieces = _pieces(runs, STAGE_CHUNK)
    total = sum(p.length for p in pieces)
    nbuf = max(1, min(READ_THREADS, len(pieces)))
    stages = table.staging(nbuf)
    views = [s.numpy().data for s in stages]
    events: list[torch.cuda.Event | None] = [None] * nbuf
    stream = torch.cuda.Stream(buffer.device)
    fd = os.open(path, os.O_RDONLY)
    try:
        os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_SEQUENTIAL)
    except OSError:
        pass
    done = 0

    def read(i: int) -> None:
        p = pieces[i]
        slot = i % nbuf
        event = events[slot]
        if event is not None:
            event.synchronize()  # the copy out of this staging buffer has finished
        _pread_into(fd, views[slot][: p.length], p.src, path)

    try:
        with ThreadPoolExecutor(max_workers=nbuf) as pool:
            pending: dict[int, Future[None]] = {
                i: pool.submit(read, i) for i in range(min(nbuf, len(pieces)))
            }
            for i, p in enumerate(pieces):
                if check is not None:
                    check()
                pending.pop(i).result()
                slot = i % nbuf
                with torch.cuda.stream(stream):
                    buffer[p.dst : p.dst + p.length].copy_(stages[slot][: p.length], non_blocking=True)
                    event = torch.cuda.Event()
                    event.record(stream)
                events[slot] = event
                if i + nbuf < len(pieces):
                    pending[i + nbuf] = pool.submit(read, i + nbuf)
                done += p.length
                if progress is not None:
                    progress(done, total)
    finally:
        stream.synchronize()  # also on cancel or error: staging buffers and the target are reused
        for v in views:
            v.release()
        os.close(fd)
