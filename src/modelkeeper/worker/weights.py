"""Reading safetensors weights onto a device, with progress, cancellation and a size estimate.

Headers are read and validated first (cheap), so a load is refused before any weight is read;
the bytes then travel by the paths of :mod:`modelkeeper.worker.mapping` (one device allocation
per file, tensors as views of it).
"""

from __future__ import annotations

import json
import math
import time
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path

import torch

from modelkeeper.formats.errors import InvalidModelFile
from modelkeeper.formats.gguf_header import GGUF_TYPES_KEY
from modelkeeper.worker.mapping import MappingTable, cached_header, load_tensors

FLOAT_DTYPES = {"F64", "F32", "F16", "BF16"}
FLOAT8_DTYPES = {"F8_E4M3", "F8_E5M2"}

ProgressFn = Callable[[int, int], None]
TransformFn = Callable[[dict[str, torch.Tensor]], dict[str, torch.Tensor]]
CheckFn = Callable[[], None]


@dataclass(frozen=True)
class TensorEntry:
    file: Path
    key: str
    dtype: str
    shape: tuple[int, ...]
    nbytes: int
    quant: str | None = None  # the GGML type of a quantized GGUF tensor (its bytes are blocks)

    @property
    def packed(self) -> bool:
        """Stored in a form the worker keeps packed on the device (fp8, GGUF blocks)."""
        return self.quant is not None or self.dtype in FLOAT8_DTYPES

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
        header = cached_header(path)
        quants = _gguf_types(header.metadata)
        for key, info in header.tensors.items():
            if key in entries:
                raise InvalidModelFile(
                    f"tensor {key!r} appears in both {entries[key].file} and {path}", path=str(path)
                )
            entries[key] = TensorEntry(
                path, key, info.dtype, info.shape, info.end - info.begin, quants.get(key)
            )
    return entries


def _gguf_types(metadata: Mapping[str, str]) -> dict[str, str]:
    raw = metadata.get(GGUF_TYPES_KEY)
    return dict(json.loads(raw)) if raw else {}


def as_gguf_parameters(
    tensors: dict[str, torch.Tensor], quants: Mapping[str, str]
) -> dict[str, torch.Tensor]:
    """The quantized tensors of a GGUF file as diffusers' ``GGUFParameter`` (bytes with their type,
    which key conversions carry through chunks and concatenations)."""
    if not quants:
        return tensors
    import gguf
    from diffusers.quantizers.gguf.utils import GGUFParameter

    return {
        k: GGUFParameter(t, quant_type=gguf.GGMLQuantizationType[quants[k]]) if k in quants else t
        for k, t in tensors.items()
    }


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
    transform: TransformFn | None = None,
    group_bytes: int | None = None,
    settle: list[Callable[[], None]] | None = None,
) -> dict[str, torch.Tensor]:
    """Read ``entries`` onto ``device``; floating tensors are cast to ``dtype`` when given. The
    quantized tensors of a GGUF file come as ``GGUFParameter`` (:func:`as_gguf_parameters`).

    ``check`` is called between chunks and may raise (cancellation); ``throttle_bytes_per_s``
    caps the read rate (a diagnostic knob that simulates a slow disk). ``stages`` gathers the
    seconds of the copy itself (``copy``) and of making the tensor views (``views``).
    With ``transform``, each file is read in groups of about ``group_bytes`` (one allocation
    each) and every group goes through ``transform`` before the next is read: a load that casts
    down (``storage_dtype``) holds the file's bytes one group at a time, not all at once.
    ``settle``: copies from the RAM cache to a GPU may still run when this returns; the waits for
    them are appended there (:func:`~modelkeeper.worker.mapping.load_tensors`).
    """
    total = sum(e.nbytes for e in entries)
    base = 0
    started = time.perf_counter()
    groups = _groups(entries, group_bytes if transform is not None else None)
    out: dict[str, torch.Tensor] = {}

    def report(done: int, _file_total: int) -> None:
        if progress is not None:
            progress(base + done, total)
        if throttle_bytes_per_s:
            ahead = (base + done) / throttle_bytes_per_s - (time.perf_counter() - started)
            if ahead > 0:
                time.sleep(ahead)

    for group in groups:
        path, names = group[0].file, [e.key for e in group]
        tensors = load_tensors(
            path, names, device, table=table, progress=report, check=check, stages=stages, settle=settle
        )
        base += sum(t.numel() * t.element_size() for t in tensors.values())
        tensors = as_gguf_parameters(tensors, _gguf_types(cached_header(path).metadata))
        if dtype is not None and any(t.is_floating_point() and t.dtype != dtype for t in tensors.values()):
            # every tensor leaves the file's buffer (the uncast ones by a copy), so the buffer is freed
            tensors = {
                k: t.to(dtype) if t.is_floating_point() and t.dtype != dtype else t.clone()
                for k, t in tensors.items()
            }
        if transform is not None:
            tensors = transform(tensors)
        out.update(tensors)
    return out


def _groups(entries: list[TensorEntry], group_bytes: int | None) -> list[list[TensorEntry]]:
    """``entries`` by file, in file order; with ``group_bytes``, each file's cut into runs of about
    that many bytes (a tensor larger than that is a group alone)."""
    by_file: dict[Path, list[TensorEntry]] = {}
    for e in entries:
        by_file.setdefault(e.file, []).append(e)
    groups: list[list[TensorEntry]] = []
    for file_entries in by_file.values():
        if group_bytes is None:
            groups.append(file_entries)
            continue
        current: list[TensorEntry] = []
        size = 0
        for e in file_entries:
            if current and size + e.nbytes > group_bytes:
                groups.append(current)
                current, size = [], 0
            current.append(e)
            size += e.nbytes
        if current:
            groups.append(current)
    return groups
