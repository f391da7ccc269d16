"""Read the header of a GGUF file: metadata and tensor infos, never the weights.

Used by discovery (identification, which quant a file holds) and by the worker (which reads the
tensors' bytes as it reads a safetensors file's: :func:`as_safetensors_header`). Shapes are
returned in torch order (GGUF lists dims innermost first).
"""

from __future__ import annotations

import json
import os
import struct
from dataclasses import dataclass
from pathlib import Path
from typing import Any, BinaryIO

from modelkeeper.formats.errors import InvalidModelFile, UnsupportedFormat
from modelkeeper.formats.safetensors_header import DTYPE_BITS, SafetensorsHeader, TensorInfo

GGUF_MAGIC = b"GGUF"
_MAX_COUNT = 1_000_000
_MAX_STRING = 16 * 1024 * 1024

#: ggml tensor type id -> name (the types a diffusion GGUF uses, and the common others).
GGML_TYPES: dict[int, str] = {
    0: "F32",
    1: "F16",
    2: "Q4_0",
    3: "Q4_1",
    6: "Q5_0",
    7: "Q5_1",
    8: "Q8_0",
    9: "Q8_1",
    10: "Q2_K",
    11: "Q3_K",
    12: "Q4_K",
    13: "Q5_K",
    14: "Q6_K",
    15: "Q8_K",
    24: "I8",
    25: "I16",
    26: "I32",
    27: "I64",
    28: "F64",
    30: "BF16",
}

#: (elements per block, bytes per block) of the types a diffusion GGUF holds (ggml's table).
BLOCK_SIZES: dict[str, tuple[int, int]] = {
    "F32": (1, 4), "F16": (1, 2), "BF16": (1, 2), "Q4_0": (32, 18), "Q4_1": (32, 20), "Q5_0": (32, 22),
    "Q5_1": (32, 24), "Q8_0": (32, 34), "Q2_K": (256, 84), "Q3_K": (256, 110), "Q4_K": (256, 144),
    "Q5_K": (256, 176), "Q6_K": (256, 210),
}  # fmt: skip
#: GGUF types that are plain torch dtypes (read as such), by their safetensors dtype name.
PLAIN_TYPES = {"F32": "F32", "F16": "F16", "BF16": "BF16"}
#: Metadata key under which :func:`as_safetensors_header` lists the quantized tensors' types.
GGUF_TYPES_KEY = "modelkeeper.gguf_types"

_SCALARS: dict[int, str] = {
    0: "<B",
    1: "<b",
    2: "<H",
    3: "<h",
    4: "<I",
    5: "<i",
    6: "<f",
    7: "<?",
    10: "<Q",
    11: "<q",
    12: "<d",
}
_STRING, _ARRAY = 8, 9


@dataclass(frozen=True)
class GGUFTensor:
    name: str
    dtype: str
    shape: tuple[int, ...]
    offset: int  # from the start of the data section
    nbytes: int


@dataclass(frozen=True)
class GGUFHeader:
    version: int
    metadata: dict[str, Any]
    tensors: dict[str, GGUFTensor]
    data_offset: int


class _Reader:
    def __init__(self, f: BinaryIO, path: str) -> None:
        self.f = f
        self.path = path

    def bad(self, why: str) -> InvalidModelFile:
        return InvalidModelFile(f"{self.path}: broken GGUF header: {why}", path=self.path)

    def take(self, n: int) -> bytes:
        b = self.f.read(n)
        if len(b) != n:
            raise self.bad("truncated")
        return b

    def scalar(self, fmt: str) -> Any:
        return struct.unpack(fmt, self.take(struct.calcsize(fmt)))[0]

    def string(self) -> str:
        n = int(self.scalar("<Q"))
        if n > _MAX_STRING:
            raise self.bad(f"string of {n} bytes")
        return self.take(n).decode("utf-8", errors="replace")

    def value(self, vtype: int) -> Any:
        if vtype in _SCALARS:
            return self.scalar(_SCALARS[vtype])
        if vtype == _STRING:
            return self.string()
        if vtype == _ARRAY:
            etype = int(self.scalar("<I"))
            count = int(self.scalar("<Q"))
            if count > _MAX_COUNT * 10:
                raise self.bad(f"array of {count} items")
            return [self.value(etype) for _ in range(count)]
        raise self.bad(f"unknown value type {vtype}")


def read_gguf_header(path: str | os.PathLike[str]) -> GGUFHeader:
    """Parse the metadata and tensor infos of ``path``; raises InvalidModelFile."""
    spath = os.fspath(path)
    with open(spath, "rb") as f:
        size = os.fstat(f.fileno()).st_size
        r = _Reader(f, spath)
        if r.take(4) != GGUF_MAGIC:
            raise r.bad("no GGUF magic")
        version = int(r.scalar("<I"))
        if version not in (2, 3):
            raise r.bad(f"version {version} not supported")
        n_tensors = int(r.scalar("<Q"))
        n_kv = int(r.scalar("<Q"))
        if n_tensors > _MAX_COUNT or n_kv > _MAX_COUNT:
            raise r.bad("implausible counts")
        metadata: dict[str, Any] = {}
        for _ in range(n_kv):
            key = r.string()
            metadata[key] = r.value(int(r.scalar("<I")))
        infos: list[tuple[str, tuple[int, ...], int, int]] = []
        for _ in range(n_tensors):
            name = r.string()
            n_dims = int(r.scalar("<I"))
            if n_dims > 8:
                raise r.bad(f"tensor {name!r} has {n_dims} dims")
            dims = tuple(int(r.scalar("<Q")) for _ in range(n_dims))
            ttype = int(r.scalar("<I"))
            offset = int(r.scalar("<Q"))
            infos.append((name, tuple(reversed(dims)), ttype, offset))
        alignment = int(metadata.get("general.alignment", 32)) or 32
        pos = f.tell()
    data_offset = (pos + alignment - 1) // alignment * alignment
    ends = [*sorted({off for *_, off in infos}), max(size - data_offset, 0)]
    next_offset = {ends[i]: ends[i + 1] for i in range(len(ends) - 1)}
    tensors: dict[str, GGUFTensor] = {}
    for name, shape, ttype, offset in infos:
        if data_offset + offset > size:
            raise InvalidModelFile(f"{spath}: tensor {name!r} lies past the end of the file", path=spath)
        dtype = GGML_TYPES.get(ttype, f"GGML_{ttype}")
        tensors[name] = GGUFTensor(name, dtype, shape, offset, next_offset.get(offset, offset) - offset)
    return GGUFHeader(version, metadata, tensors, data_offset)


def dominant_quant(header: GGUFHeader) -> str | None:
    """The type holding the most elements among the quantized tensors (``Q8_0``, ``Q4_K``...);
    for files with no quantized tensor, the dominant float type (``F16``, ``BF16``)."""
    counts: dict[str, int] = {}
    for t in header.tensors.values():
        n = 1
        for d in t.shape:
            n *= d
        counts[t.dtype] = counts.get(t.dtype, 0) + n
    quant = {k: v for k, v in counts.items() if k not in PLAIN_TYPES}
    pool = quant or counts
    return max(pool, key=lambda k: pool[k]) if pool else None


def packed_shape(name: str, dtype: str, shape: tuple[int, ...], path: str = "") -> tuple[int, ...]:
    """The byte shape a tensor of ``dtype`` is stored in: rows of blocks (``shape`` for plain types)."""
    if dtype in PLAIN_TYPES:
        return shape
    if dtype not in BLOCK_SIZES:
        raise UnsupportedFormat(
            f"{path}: tensor {name!r} is of GGML type {dtype}, which is not loadable "
            f"(loadable: {', '.join(BLOCK_SIZES)})",
            path=path,
        )
    block, size = BLOCK_SIZES[dtype]
    if not shape or shape[-1] % block:
        raise InvalidModelFile(f"{path}: tensor {name!r} of type {dtype} has rows of {shape[-1:]} elements, "
                               f"not whole blocks of {block}", path=path)  # fmt: skip
    return (*shape[:-1], shape[-1] // block * size)


def as_safetensors_header(path: str | os.PathLike[str]) -> SafetensorsHeader:
    """The tensors of a GGUF file as a safetensors header: plain types under their dtype, quantized
    ones as uint8 rows of blocks; their types listed as JSON under ``GGUF_TYPES_KEY``, beside the
    file's string metadata (where a ``modelkeeper.config`` is found as in safetensors files). Raises
    UnsupportedFormat for a type the worker cannot decode."""
    spath = os.fspath(path)
    header = read_gguf_header(spath)
    size = os.path.getsize(spath)
    tensors: dict[str, TensorInfo] = {}
    types: dict[str, str] = {}
    for t in sorted(header.tensors.values(), key=lambda t: t.offset):
        shape = packed_shape(t.name, t.dtype, t.shape, spath)
        dtype = PLAIN_TYPES.get(t.dtype, "U8")
        n = DTYPE_BITS[dtype] // 8
        for d in shape:
            n *= d
        if n > t.nbytes:
            raise InvalidModelFile(
                f"{spath}: tensor {t.name!r} needs {n} bytes, the file has {t.nbytes}", path=spath
            )
        tensors[t.name] = TensorInfo(t.name, dtype, shape, t.offset, t.offset + n)
        if t.dtype not in PLAIN_TYPES:
            types[t.name] = t.dtype
    return SafetensorsHeader(
        path=Path(spath), header_size=header.data_offset - 8, data_offset=header.data_offset,
        data_size=size - header.data_offset, file_size=size, tensors=tensors,
        metadata={k: v for k, v in header.metadata.items() if isinstance(v, str)} | {GGUF_TYPES_KEY: json.dumps(types)},
    )  # fmt: skip
