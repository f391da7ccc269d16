"""Reading safetensors weights onto a device, with progress, cancellation and a size estimate.

Headers are read first (cheap) so that a load is refused before any weight is read; tensors
are then read one by one straight onto the device, so cancellation is checked between
tensors and progress is reported as bytes.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors import SafetensorError, safe_open

from modelkeeper.formats.errors import InvalidModelFile, ModelFileNotFound

ITEMSIZE = {
    "F64": 8, "F32": 4, "F16": 2, "BF16": 2, "I64": 8, "I32": 4, "I16": 2, "I8": 1, "U8": 1,
    "U16": 2, "U32": 4, "U64": 8, "BOOL": 1, "F8_E4M3": 1, "F8_E5M2": 1,
}  # fmt: skip
FLOAT_DTYPES = {"F64", "F32", "F16", "BF16"}

ProgressFn = Callable[[int, int], None]
CheckFn = Callable[[], None]


@dataclass(frozen=True)
class TensorEntry:
    file: Path
    key: str
    dtype: str
    shape: tuple[int, ...]

    @property
    def numel(self) -> int:
        n = 1
        for d in self.shape:
            n *= d
        return n

    @property
    def nbytes(self) -> int:
        return self.numel * ITEMSIZE.get(self.dtype, 4)

    def nbytes_as(self, dtype: torch.dtype | None) -> int:
        if dtype is None or self.dtype not in FLOAT_DTYPES:
            return self.nbytes
        return self.numel * dtype.itemsize


def _open(path: Path, device: str = "cpu"):  # type: ignore[no-untyped-def]
    try:
        return safe_open(str(path), framework="pt", device=device)
    except FileNotFoundError:
        raise ModelFileNotFound(f"{path} does not exist", path=str(path)) from None
    except (SafetensorError, OSError, ValueError) as exc:
        raise InvalidModelFile(f"{path} is not a valid safetensors file: {exc}", path=str(path)) from None


def file_metadata(path: Path) -> dict[str, str]:
    with _open(path) as fh:
        return dict(fh.metadata() or {})


def list_tensors(files: Iterable[Path]) -> dict[str, TensorEntry]:
    """Every tensor of the files, from headers only. Duplicate keys across shards are an error."""
    entries: dict[str, TensorEntry] = {}
    for path in files:
        with _open(path) as fh:
            for key in fh.keys():  # noqa: SIM118 - safe_open is not a mapping
                sl = fh.get_slice(key)
                entry = TensorEntry(path, key, sl.get_dtype(), tuple(sl.get_shape()))
                if key in entries:
                    raise InvalidModelFile(
                        f"tensor {key!r} appears in both {entries[key].file} and {path}", path=str(path)
                    )
                entries[key] = entry
    return entries


def read_tensors(
    entries: list[TensorEntry],
    device: torch.device,
    *,
    dtype: torch.dtype | None = None,
    progress: ProgressFn | None = None,
    check: CheckFn | None = None,
    throttle_bytes_per_s: float | None = None,
) -> dict[str, torch.Tensor]:
    """Read ``entries`` onto ``device``; floating tensors are cast to ``dtype`` when given.

    ``check`` is called between tensors and may raise (cancellation); ``throttle_bytes_per_s``
    caps the read rate (a diagnostic knob that simulates a slow disk).
    """
    total = sum(e.nbytes for e in entries)
    done = 0
    started = time.perf_counter()
    out: dict[str, torch.Tensor] = {}
    by_file: dict[Path, list[TensorEntry]] = {}
    for e in entries:
        by_file.setdefault(e.file, []).append(e)
    target = "cpu" if device.type == "cpu" else str(device)
    last_report = 0
    for path, group in by_file.items():
        with _open(path, target) as fh:
            for e in group:
                if check is not None:
                    check()
                try:
                    tensor = fh.get_tensor(e.key)
                except (SafetensorError, OSError, ValueError, RuntimeError) as exc:
                    raise InvalidModelFile(
                        f"{path}: cannot read tensor {e.key!r}: {exc}", path=str(path)
                    ) from None
                if dtype is not None and tensor.is_floating_point() and tensor.dtype != dtype:
                    tensor = tensor.to(dtype)
                out[e.key] = tensor
                done += e.nbytes
                if throttle_bytes_per_s:
                    ahead = done / throttle_bytes_per_s - (time.perf_counter() - started)
                    if ahead > 0:
                        time.sleep(ahead)
                if progress is not None and (done - last_report >= 16 * 1024 * 1024 or done == total):
                    last_report = done
                    progress(done, total)
    if progress is not None and done != last_report:
        progress(done, total)
    return out
