"""Reading safetensors weights onto a device, with progress, cancellation and a size estimate.

Headers are read and validated first (cheap), so a load is refused before any weight is read;
the bytes then travel by the paths of :mod:`modelkeeper.worker.mapping` (one device allocation
per file, tensors as views of it).
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path

import torch

from modelkeeper.formats.errors import InvalidModelFile
from modelkeeper.worker.mapping import MappingTable, cached_header, load_tensors

FLOAT_DTYPES = {"F64", "F32", "F16", "BF16"}

ProgressFn = Callable[[int, int], None]
CheckFn = Callable[[], None]


@dataclass(frozen=True)
class TensorEntry:
    file: Path
    key: str
    dtype: str
    shape: tuple[int, ...]
    nbytes: int

    @property
    def numel(self) -> int:
        return math.prod(self.shape)

    def nbytes_as(self, dtype: torch.dtype | None) -> int:
        if dtype is None or self.dtype not in FLOAT_DTYPES:
            return self.nbytes
        return self.numel * dtype.itemsize


def file_metadata(path: Path) -> dict[str, str]:
    return dict(cached_header(path).metadata)


def list_tensors(files: Iterable[Path]) -> dict[str, TensorEntry]:
    """Every tensor of the files, from validated headers only. Duplicate keys across shards are an error."""
    entries: dict[str, TensorEntry] = {}
    for path in files:
        for key, info in cached_header(path).tensors.items():
            if key in entries:
                raise InvalidModelFile(
                    f"tensor {key!r} appears in both {entries[key].file} and {path}", path=str(path)
                )
            entries[key] = TensorEntry(path, key, info.dtype, info.shape, info.end - info.begin)
    return entries


def read_tensors(
    entries: list[TensorEntry],
    device: torch.device,
    *,
    table: MappingTable,
    dtype: torch.dtype | None = None,
    progress: ProgressFn | None = None,
    check: CheckFn | None = None,
    throttle_bytes_per_s: float | None = None,
    stages: dict[str, float] | None = None,
) -> dict[str, torch.Tensor]:
    """Read ``entries`` onto ``device``; floating tensors are cast to ``dtype`` when given.

    ``check`` is called between chunks and may raise (cancellation); ``throttle_bytes_per_s``
    caps the read rate (a diagnostic knob that simulates a slow disk). ``stages`` gathers the
    seconds of the copy itself (``copy``) and of making the tensor views (``views``).
    """
    total = sum(e.nbytes for e in entries)
    base = 0
    started = time.perf_counter()
    by_file: dict[Path, list[str]] = {}
    for e in entries:
        by_file.setdefault(e.file, []).append(e.key)
    out: dict[str, torch.Tensor] = {}

    def report(done: int, _file_total: int) -> None:
        if progress is not None:
            progress(base + done, total)
        if throttle_bytes_per_s:
            ahead = (base + done) / throttle_bytes_per_s - (time.perf_counter() - started)
            if ahead > 0:
                time.sleep(ahead)

    for path, names in by_file.items():
        tensors = load_tensors(path, names, device, table=table, progress=report, check=check, stages=stages)
        base += sum(t.numel() * t.element_size() for t in tensors.values())
        if dtype is not None and any(t.is_floating_point() and t.dtype != dtype for t in tensors.values()):
            # every tensor leaves the file's buffer (the uncast ones by a copy), so the buffer is freed
            tensors = {
                k: t.to(dtype) if t.is_floating_point() and t.dtype != dtype else t.clone()
                for k, t in tensors.items()
            }
        out.update(tensors)
    return out
