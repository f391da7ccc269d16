"""Tensor tables: the names, dtypes and shapes of a file's tensors, read from its header only.

One reader per format, all returning a :class:`TensorTable`: safetensors (the JSON header),
GGUF (the tensor infos), pickle (the structure, read in the sandboxed subprocess of
``modelkeeper.formats.pickle_sandbox``; nothing is ever unpickled in this process).
"""

from __future__ import annotations

import math
import os
from collections import Counter
from collections.abc import Collection, Mapping
from dataclasses import dataclass, field
from operator import attrgetter
from typing import Protocol

from modelkeeper.formats.errors import InvalidModelFile
from modelkeeper.formats.gguf_header import BLOCK_SIZES, PLAIN_TYPES, read_gguf_header
from modelkeeper.formats.pickle_sandbox import inspect_pickle
from modelkeeper.formats.safetensors_header import StructureMemo, read_header

#: Bytes per element of the safetensors dtypes (quantized GGUF types use the file's offsets).
DTYPE_SIZES: dict[str, float] = {
    "F64": 8,
    "I64": 8,
    "U64": 8,
    "F32": 4,
    "I32": 4,
    "U32": 4,
    "F16": 2,
    "BF16": 2,
    "I16": 2,
    "U16": 2,
    "F8_E4M3": 1,
    "F8_E5M2": 1,
    "F8_E4M3FN": 1,
    "F8_E8M0": 1,
    "I8": 1,
    "U8": 1,
    "BOOL": 1,
    "F4": 0.5,
}

#: torch / numpy dtype names -> safetensors names, for tables read from pickles.
_DTYPE_ALIASES: dict[str, str] = {
    "float64": "F64",
    "double": "F64",
    "float32": "F32",
    "float": "F32",
    "float16": "F16",
    "half": "F16",
    "bfloat16": "BF16",
    "int64": "I64",
    "long": "I64",
    "int32": "I32",
    "int": "I32",
    "int16": "I16",
    "short": "I16",
    "int8": "I8",
    "uint8": "U8",
    "bool": "BOOL",
    "float8_e4m3fn": "F8_E4M3",
    "float8_e5m2": "F8_E5M2",
    "doublestorage": "F64",
    "floatstorage": "F32",
    "halfstorage": "F16",
    "bfloat16storage": "BF16",
    "longstorage": "I64",
    "intstorage": "I32",
    "bytestorage": "U8",
    "boolstorage": "BOOL",
}


#: Keys under which pickled checkpoints nest their state dict.
PICKLE_WRAPPERS: tuple[str, ...] = ("state_dict.", "model.state_dict.", "module.")


def normalize_dtype(dtype: str) -> str:
    """``torch.float16`` / ``float16`` / ``HalfStorage`` / ``F16`` -> ``F16``."""
    d = dtype.rsplit(".", 1)[-1]
    if d.upper() in DTYPE_SIZES:
        return d.upper()
    return _DTYPE_ALIASES.get(d.lower(), d.upper())


class TensorLike(Protocol):
    """What a table needs of a tensor: ``TensorMeta`` or the safetensors parser's ``TensorInfo``."""

    @property
    def dtype(self) -> str: ...
    @property
    def shape(self) -> tuple[int, ...]: ...
    @property
    def begin(self) -> int: ...
    @property
    def end(self) -> int: ...
    @property
    def numel(self) -> int: ...
    @property
    def nbytes(self) -> int: ...


@dataclass(frozen=True, slots=True)
class TensorMeta:
    dtype: str
    shape: tuple[int, ...]
    begin: int = -1  # byte offsets inside the data section; -1 when unknown (pickles)
    end: int = -1

    @property
    def numel(self) -> int:
        return math.prod(self.shape)

    @property
    def nbytes(self) -> int:
        if self.end >= 0:
            return self.end - self.begin
        return int(self.numel * DTYPE_SIZES.get(self.dtype, 0))


@dataclass
class TensorTable:
    """Header view of a weights file."""

    tensors: Mapping[str, TensorLike]
    metadata: dict[str, str] = field(default_factory=dict)
    data_offset: int | None = None  # absolute offset of the data section, when known
    #: The tensor section's identity when read with a memo (``SafetensorsHeader.structure``):
    #: tables with an equal structure have the same tensors.
    structure: tuple[str, int] | None = None
    _totals: tuple[int, int, int, dict[str, int]] | None = field(default=None, repr=False, compare=False)

    def stats(self, names: list[str] | None = None) -> tuple[int, int, int, dict[str, int]]:
        """(tensor count, parameters, bytes, dtype -> count) of ``names`` (all when None)."""
        if names is None or len(names) == len(self.tensors):
            if self._totals is None:
                self._totals = _stats(list(self.tensors.values()))
            return self._totals[0], self._totals[1], self._totals[2], dict(self._totals[3])
        return _stats([self.tensors[n] for n in names])


def _stats(metas: Collection[TensorLike]) -> tuple[int, int, int, dict[str, int]]:
    # map() over attrgetters runs in C: this is on the path of every scanned file.
    params = sum(map(math.prod, map(_SHAPE, metas)))
    dtypes = dict(Counter(map(_DTYPE, metas)))
    if min(map(_END, metas), default=0) >= 0:
        nbytes = sum(map(_END, metas)) - sum(map(_BEGIN, metas))
    else:
        nbytes = sum(m.nbytes for m in metas)
    return len(metas), params, nbytes, dtypes


_SHAPE, _DTYPE, _BEGIN, _END = (attrgetter(a) for a in ("shape", "dtype", "begin", "end"))


def read_safetensors_table(path: str | os.PathLike[str], memo: StructureMemo | None = None) -> TensorTable:
    header = read_header(path, memo=memo)
    return TensorTable(header.tensors, dict(header.metadata), header.data_offset, header.structure)


def read_gguf_table(path: str | os.PathLike[str]) -> TensorTable:
    header = read_gguf_header(path)
    tensors = {
        n: TensorMeta(t.dtype, t.shape, t.offset, t.offset + t.nbytes) for n, t in header.tensors.items()
    }
    metadata = {k: str(v) for k, v in header.metadata.items() if isinstance(v, str | int | float)}
    return TensorTable(tensors, metadata, header.data_offset)


def read_pickle_table(
    path: str | os.PathLike[str], *, timeout: float = 60.0, memory_limit_bytes: int = 2 << 30
) -> TensorTable:
    """Read a pickle's structure in the sandbox; raises UnsafePickle / InvalidModelFile."""
    inspection = inspect_pickle(path, timeout=timeout, memory_limit_bytes=memory_limit_bytes)
    tensors: dict[str, TensorLike] = {
        name: TensorMeta(normalize_dtype(str(t.dtype)), tuple(int(d) for d in t.shape))
        for name, t in inspection.tensors.items()
    }
    if not tensors:
        raise InvalidModelFile(f"{path}: the pickle holds no tensors", path=os.fspath(path))
    wrapper = pickle_wrapper(tensors)
    if wrapper:
        tensors = {n[len(wrapper) :]: m for n, m in tensors.items() if n.startswith(wrapper)}
    return TensorTable(tensors, {"pickle.format": str(inspection.format)})


def pickle_wrapper(names: Collection[str]) -> str:
    """The key under which a pickled checkpoint nests its state dict (``state_dict.``: A1111 and
    Lightning checkpoints keep the weights there, next to ``global_step``...), as a name prefix
    that most tensor names start with; "" when none."""
    for wrapper in PICKLE_WRAPPERS:
        if sum(1 for n in names if n.startswith(wrapper)) * 2 > len(names):
            return wrapper
    return ""


#: safetensors dtypes of fp8 weights, by the torch name the worker reports.
FLOAT8_NAMES = {"F8_E4M3": "float8_e4m3fn", "F8_E5M2": "float8_e5m2"}


def storage_form(table: TensorTable, *, gguf: bool = False) -> str | None:
    """How the file stores its weights when not as plain floats: the dominant GGUF type of a GGUF
    file (``Q8_0``, ``Q4_K``, ``F16``...), ``float8_e4m3fn`` / ``float8_e5m2`` for fp8 weights, with
    ``scaled_`` before it for ComfyUI's scaled fp8 files (``scale_weight`` tensors). None otherwise."""
    elements: Counter[str] = Counter()
    for meta in table.tensors.values():
        elements[meta.dtype] += math.prod(meta.shape)
    if not elements:
        return None
    if gguf:
        quant = Counter({d: n for d, n in elements.items() if d not in PLAIN_TYPES}) or elements
        return quant.most_common(1)[0][0]
    fp8 = Counter({FLOAT8_NAMES[d]: n for d, n in elements.items() if d in FLOAT8_NAMES})
    if not fp8:
        return None
    name = fp8.most_common(1)[0][0]
    scaled = any(k.endswith(".scale_weight") or k.rpartition(".")[2] == "scaled_fp8" for k in table.tensors)
    return f"scaled_{name}" if scaled else name


def gguf_loadable(table: TensorTable) -> bool:
    """Whether the worker can decode every tensor type of a GGUF file."""
    return all(m.dtype in BLOCK_SIZES for m in table.tensors.values())
