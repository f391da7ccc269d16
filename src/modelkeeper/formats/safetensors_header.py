"""Read and validate the header of a safetensors file without touching its data.

A safetensors file is an 8-byte little-endian header length ``N``, ``N`` bytes of UTF-8 JSON,
then the data section. The JSON maps tensor names to ``{"dtype", "shape", "data_offsets"}``
(offsets relative to the data section) plus an optional ``"__metadata__"`` object of strings.

``read_header`` reads exactly the 8 + ``N`` header bytes and validates everything a loader will
later trust: caps on the length, JSON shape, known dtypes, sizes that agree with shapes,
offsets that tile the data section exactly (no gap, no overlap, no trailing bytes, not
truncated) and no duplicate keys. Every rejection is an ``InvalidModelFile`` whose message
names the file, the tensor when there is one, and the problem.
"""

from __future__ import annotations

import gc
import json
import os
import stat
import struct
from collections import Counter
from collections.abc import Iterable
from dataclasses import dataclass, fields
from pathlib import Path
from typing import Any

from modelkeeper.formats.errors import InvalidModelFile, ModelFileNotFound

__all__ = [
    "DEFAULT_MAX_HEADER_BYTES",
    "DTYPE_BITS",
    "MAX_TENSOR_BYTES",
    "SafetensorsHeader",
    "StructureMemo",
    "TensorInfo",
    "parse_header",
    "read_header",
]

#: Largest header ``read_header`` accepts unless told otherwise.
DEFAULT_MAX_HEADER_BYTES = 100 * 1024 * 1024

#: Bound on one tensor's byte size (and on every intermediate product of its shape).
MAX_TENSOR_BYTES = 2**62

#: Element size in bits of every dtype safetensors 0.8 knows (its ``Dtype`` enum).
#: F4 and F6_* are sub-byte: a tensor of them must fill a whole number of bytes.
DTYPE_BITS: dict[str, int] = {
    "BOOL": 8,
    "F4": 4,
    "F6_E2M3": 6,
    "F6_E3M2": 6,
    "U8": 8,
    "I8": 8,
    "F8_E5M2": 8,
    "F8_E4M3": 8,
    "F8_E8M0": 8,
    "F8_E4M3FNUZ": 8,
    "F8_E5M2FNUZ": 8,
    "I16": 16,
    "U16": 16,
    "F16": 16,
    "BF16": 16,
    "I32": 32,
    "U32": 32,
    "F32": 32,
    "C64": 64,
    "F64": 64,
    "I64": 64,
    "U64": 64,
}

# The canonical string object of each dtype, so 200k tensors share a handful of strings.
_DTYPE_NAMES: dict[str, str] = {name: name for name in DTYPE_BITS}
_ENTRY_KEYS = frozenset({"dtype", "shape", "data_offsets"})
_METADATA_KEY = "__metadata__"
_LENGTH = struct.Struct("<Q")


@dataclass(frozen=True, slots=True)
class TensorInfo:
    """One tensor of a safetensors file; ``begin``/``end`` are relative to the data section."""

    name: str
    dtype: str
    shape: tuple[int, ...]
    begin: int
    end: int

    @property
    def nbytes(self) -> int:
        return self.end - self.begin

    @property
    def numel(self) -> int:
        n = 1
        for dim in self.shape:
            n *= dim
        return n


# A frozen dataclass's __init__ goes through object.__setattr__ per field, which is a third of
# the cost of parsing a 200k-tensor header; the parser fills the slots directly instead.
_INFO_FIELDS = ("name", "dtype", "shape", "begin", "end")
assert tuple(f.name for f in fields(TensorInfo)) == _INFO_FIELDS, "update _new_info"
_set_name, _set_dtype, _set_shape, _set_begin, _set_end = (
    TensorInfo.__dict__[field].__set__ for field in _INFO_FIELDS
)


def _new_info(name: str, dtype: str, shape: tuple[int, ...], begin: int, end: int) -> TensorInfo:
    info: TensorInfo = object.__new__(TensorInfo)
    _set_name(info, name)
    _set_dtype(info, dtype)
    _set_shape(info, shape)
    _set_begin(info, begin)
    _set_end(info, end)
    return info


@dataclass(frozen=True)
class SafetensorsHeader:
    """The validated header of a safetensors file.

    ``header_size`` is the 8-byte length value, ``data_offset`` where the data section starts
    in the file (``8 + header_size``), ``data_size`` the data section's length. ``tensors`` is
    ordered by offset, which is the order of the bytes in the file.
    """

    path: Path
    header_size: int
    data_offset: int
    data_size: int
    file_size: int
    tensors: dict[str, TensorInfo]
    metadata: dict[str, str]
    #: With a memo: the header's text after its leading ``__metadata__`` object, with the data
    #: size. Files with an equal structure hold the same tensors at the same offsets (see
    #: :class:`StructureMemo`); None when the header does not start with its metadata.
    structure: tuple[str, int] | None = None

    def _select(self, names: Iterable[str] | None) -> Iterable[TensorInfo]:
        if names is None:
            return self.tensors.values()
        return (self.tensors[name] for name in names)

    def total_bytes(self, names: Iterable[str] | None = None) -> int:
        """Bytes of the data of all tensors, or of ``names`` only (``KeyError`` on an unknown name)."""
        return sum(info.nbytes for info in self._select(names))

    def dtypes(self, names: Iterable[str] | None = None) -> Counter[str]:
        """How many tensors there are of each dtype."""
        return Counter(info.dtype for info in self._select(names))

    def parameters(self, names: Iterable[str] | None = None) -> int:
        """Number of elements of all tensors (or of ``names``)."""
        return sum(info.numel for info in self._select(names))


def read_header(
    path: str | os.PathLike[str],
    *,
    max_header_bytes: int = DEFAULT_MAX_HEADER_BYTES,
    memo: StructureMemo | None = None,
) -> SafetensorsHeader:
    """Read and validate the header of the safetensors file at ``path``.

    Reads the 8-byte length, then the header itself with one ``pread`` of the exact size; the
    data section is never read. Raises ``ModelFileNotFound`` when there is no such file and
    ``InvalidModelFile`` for anything malformed. With ``memo``, a tensor section seen before is
    not parsed again (see :class:`StructureMemo`).
    """
    p = Path(path)
    try:
        fd = os.open(p, os.O_RDONLY | getattr(os, "O_CLOEXEC", 0))
    except FileNotFoundError:
        raise ModelFileNotFound(f"{p}: no such file", path=str(p)) from None
    except OSError as exc:
        raise InvalidModelFile(f"{p}: cannot open: {exc.strerror}", path=str(p)) from None
    try:
        st = os.fstat(fd)
        if not stat.S_ISREG(st.st_mode):
            raise InvalidModelFile(f"{p}: not a regular file", path=str(p))
        file_size = st.st_size
        if file_size < _LENGTH.size:
            raise InvalidModelFile(
                f"{p}: file of {file_size} bytes is too small to hold the 8-byte header length",
                path=str(p),
            )
        (header_size,) = _LENGTH.unpack(_pread_exact(fd, _LENGTH.size, 0, p))
        _check_header_size(p, header_size, file_size, max_header_bytes)
        raw = _pread_exact(fd, header_size, _LENGTH.size, p)
    finally:
        os.close(fd)
    return parse_header(raw, file_size=file_size, path=p, memo=memo)


class StructureMemo:
    """Tensor sections already validated, by their exact text, for a run over many files.

    safetensors writes ``__metadata__`` first. Files from one training setup (LoRAs of one rank and
    network) or of one base model (fine-tuned checkpoints) repeat the rest of the header byte for
    byte: the same names, dtypes, shapes and offsets. For such a file only its metadata is decoded
    and validated; the tensors are those of the first file with that text and data size. Bounded
    by ``max_bytes`` of remembered text; thread-safe (one dict operation per access).
    """

    def __init__(self, max_bytes: int = 64 << 20, max_text: int = 4 << 20) -> None:
        self.max_bytes = max_bytes
        self.max_text = max_text
        self.bytes = 0
        self.hits = 0
        self.misses = 0
        self._tensors: dict[tuple[str, int], dict[str, TensorInfo]] = {}

    def __len__(self) -> int:
        return len(self._tensors)

    def get(self, key: tuple[str, int]) -> dict[str, TensorInfo] | None:
        found = self._tensors.get(key)
        if found is None:
            self.misses += 1
        else:
            self.hits += 1
        return found

    def put(self, key: tuple[str, int], tensors: dict[str, TensorInfo]) -> None:
        size = len(key[0])
        if size <= self.max_text and self.bytes + size <= self.max_bytes and key not in self._tensors:
            self._tensors[key] = tensors
            self.bytes += size


_MEMO_PREFIX = '{"' + _METADATA_KEY + '":'


def _split_metadata(text: str) -> tuple[Any, str] | None:
    """(the decoded leading ``__metadata__`` value, the text after it less trailing white space),
    or None when the header does not start with it exactly as safetensors writes it."""
    if not text.startswith(_MEMO_PREFIX):
        return None
    try:
        value, end = _DECODER.raw_decode(text, len(_MEMO_PREFIX))
    except (ValueError, RecursionError):
        return None
    # Trailing white space (the padding to 8 bytes) varies with the metadata's length.
    return value, text[end:].rstrip(" \t\n\r")


def parse_header(
    raw: bytes, *, file_size: int, path: Path, memo: StructureMemo | None = None
) -> SafetensorsHeader:
    """Validate ``raw``, the JSON header bytes (without the 8-byte length), of a file of ``file_size``.

    Pure: does no I/O; ``path`` only names the file in the result and in errors.
    """
    header_size = len(raw)
    _check_header_size(path, header_size, file_size, max_header_bytes=None)
    data_size = file_size - _LENGTH.size - header_size
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise InvalidModelFile(
            f"{path}: header is not valid UTF-8 (byte {exc.start})", path=str(path)
        ) from None
    structure: tuple[str, int] | None = None
    known: dict[str, TensorInfo] | None = None
    if memo is not None and (split := _split_metadata(text)) is not None:
        value, rest = split
        structure = (rest, data_size)
        known = memo.get(structure)
    if known is not None:
        # The rest was valid after another metadata object: only this one needs checking, and
        # the strict parser would look at it first too (the same error for a bad one).
        tensors, metadata = known, _parse_metadata(path, value)
    else:
        # Cyclic GC passes over hundreds of thousands of fresh containers dominate the parse of a
        # big header; nothing here makes cycles, so pause it for the duration.
        gc_was_enabled = gc.isenabled()
        gc.disable()
        try:
            document = _decode(path, text)
            metadata, tensors = _validate(path, document, data_size)
        finally:
            if gc_was_enabled:
                gc.enable()
        if memo is not None and structure is not None:
            memo.put(structure, tensors)
    return SafetensorsHeader(
        path=path,
        header_size=header_size,
        data_offset=_LENGTH.size + header_size,
        data_size=data_size,
        file_size=file_size,
        tensors=tensors,
        metadata=metadata,
        structure=structure,
    )


# --- validation -------------------------------------------------------------------------------


def _check_header_size(path: Path, header_size: int, file_size: int, max_header_bytes: int | None) -> None:
    if header_size == 0:
        raise InvalidModelFile(f"{path}: header length is 0", path=str(path))
    if max_header_bytes is not None and header_size > max_header_bytes:
        raise InvalidModelFile(
            f"{path}: header length {header_size} exceeds the limit of {max_header_bytes} bytes",
            path=str(path),
            header_size=header_size,
        )
    if header_size > file_size - _LENGTH.size:
        raise InvalidModelFile(
            f"{path}: header length {header_size} exceeds the file size {file_size} "
            "(truncated file or not a safetensors file)",
            path=str(path),
            header_size=header_size,
            file_size=file_size,
        )


# JSON objects are decoded as tuples of (key, value) pairs (``object_pairs_hook=tuple``), which
# keeps duplicate keys visible and is cheaper than building a dict per tensor. So in a decoded
# document a tuple is a JSON object and a list a JSON array.
_Pairs = tuple[tuple[str, Any], ...]


def _reject_constant(token: str) -> Any:
    raise ValueError(f"{token} is not valid JSON")


_DECODER = json.JSONDecoder(object_pairs_hook=tuple, parse_constant=_reject_constant)


def _decode(path: Path, text: str) -> Any:
    try:
        return _DECODER.decode(text)
    except (ValueError, RecursionError) as exc:
        raise InvalidModelFile(f"{path}: header is not valid JSON: {exc}", path=str(path)) from None


def _validate(path: Path, document: Any, data_size: int) -> tuple[dict[str, str], dict[str, TensorInfo]]:
    if type(document) is not tuple:
        raise InvalidModelFile(
            f"{path}: header is a JSON {_json_type(document)}, not an object", path=str(path)
        )
    metadata: dict[str, str] | None = None
    infos: list[TensorInfo] = []
    append = infos.append
    dtype_bits = DTYPE_BITS
    dtype_names = _DTYPE_NAMES
    max_elements = MAX_TENSOR_BYTES
    for name, entry in document:
        if name == _METADATA_KEY:
            if metadata is not None:
                raise _duplicate(path, name)
            metadata = _parse_metadata(path, entry)
            continue
        if type(entry) is not tuple:
            raise _tensor_error(path, name, f"entry is a JSON {_json_type(entry)}, not an object")
        try:
            (k0, dtype), (k1, shape), (k2, offsets) = entry
        except ValueError:
            k0 = k1 = k2 = None
        if k0 != "dtype" or k1 != "shape" or k2 != "data_offsets":
            dtype, shape, offsets = _entry_fields(path, name, entry)
        bits = dtype_bits.get(dtype, 0) if type(dtype) is str else 0
        if not bits:
            raise _tensor_error(path, name, f"unknown dtype {dtype!r}")
        dtype = dtype_names[dtype]
        if type(shape) is not list:
            raise _tensor_error(path, name, f"shape is a JSON {_json_type(shape)}, not a list")
        numel = 1
        for dim in shape:
            if type(dim) is not int or dim < 0:
                raise _tensor_error(
                    path, name, f"shape {_short(shape)} has a dimension that is not an integer >= 0"
                )
            numel *= dim
            if numel > max_elements:
                raise _tensor_error(path, name, f"shape {_short(shape)} overflows (more than 2**62 elements)")
        if type(offsets) is not list or len(offsets) != 2:
            raise _tensor_error(path, name, f"data_offsets {_short(offsets)} is not a list [begin, end]")
        begin, end = offsets
        if type(begin) is not int or type(end) is not int or begin < 0 or end < begin:
            raise _tensor_error(
                path, name, f"data_offsets {_short(offsets)} are not integers with 0 <= begin <= end"
            )
        total_bits = numel * bits
        if total_bits & 7:
            raise _tensor_error(
                path, name, f"{numel} elements of {dtype} do not fill a whole number of bytes"
            )
        if end - begin != total_bits >> 3:
            if total_bits >> 3 > MAX_TENSOR_BYTES:
                raise _tensor_error(path, name, f"shape {_short(shape)} overflows (more than 2**62 bytes)")
            raise _tensor_error(
                path,
                name,
                f"size mismatch: data_offsets [{begin}, {end}] span {end - begin} bytes but {dtype} "
                f"shape {_short(shape)} needs {total_bits >> 3}",
            )
        append(_new_info(name, dtype, tuple(shape), begin, end))

    infos.sort(key=_offset_key)
    tensors = {info.name: info for info in infos}
    if len(tensors) != len(infos):
        raise _duplicate(path, _first_duplicate(info.name for info in infos))
    cursor = 0
    for info in infos:
        if info.begin != cursor:
            problem = "overlaps the previous tensor" if info.begin < cursor else "leaves a gap before it"
            raise _tensor_error(
                path,
                info.name,
                f"data_offsets [{info.begin}, {info.end}] {problem} (expected begin {cursor})",
            )
        cursor = info.end
    if cursor != data_size:
        if cursor > data_size:
            problem = f"file truncated: tensors need {cursor} data bytes but the data section has {data_size}"
        else:
            problem = f"{data_size - cursor} trailing bytes after the last tensor (data section {data_size})"
        raise InvalidModelFile(f"{path}: {problem}", path=str(path), data_size=data_size, used=cursor)

    for name in tensors:
        if not name.isascii():
            _check_text(path, name, "tensor name")
    return metadata or {}, tensors


def _parse_metadata(path: Path, value: Any) -> dict[str, str]:
    # safetensors accepts JSON null for "no metadata"; treat it as absent.
    if value is None:
        return {}
    if type(value) is not tuple:
        raise InvalidModelFile(
            f"{path}: __metadata__ is a JSON {_json_type(value)}, not an object of strings", path=str(path)
        )
    metadata = dict(value)
    if len(metadata) != len(value):
        raise _duplicate(path, _first_duplicate(key for key, _ in value), where="__metadata__ ")
    for key, item in value:
        if type(item) is not str:
            raise InvalidModelFile(
                f"{path}: __metadata__ value of {key!r} is a JSON {_json_type(item)}, not a string",
                path=str(path),
                key=key,
            )
        _check_text(path, key, "metadata key")
        _check_text(path, item, f"metadata value of {key!r}")
    return metadata


def _entry_fields(path: Path, name: str, entry: _Pairs) -> tuple[Any, Any, Any]:
    """The slow path for entries whose keys are not exactly dtype, shape, data_offsets in order."""
    fields = dict(entry)
    if len(fields) != len(entry):
        raise _duplicate(path, _first_duplicate(key for key, _ in entry), where=f"tensor {name!r} ")
    missing = sorted(_ENTRY_KEYS - fields.keys())
    extra = sorted(fields.keys() - _ENTRY_KEYS)
    if missing or extra:
        parts = []
        if missing:
            parts.append(f"missing {', '.join(missing)}")
        if extra:
            parts.append(f"unexpected {', '.join(repr(k) for k in extra)}")
        raise _tensor_error(
            path, name, f"entry must have exactly dtype, shape, data_offsets ({'; '.join(parts)})"
        )
    return fields["dtype"], fields["shape"], fields["data_offsets"]


def _offset_key(info: TensorInfo) -> tuple[int, int]:
    return (info.begin, info.end)


def _first_duplicate(keys: Iterable[str]) -> str:
    seen: set[str] = set()
    for key in keys:
        if key in seen:
            return key
        seen.add(key)
    raise AssertionError("no duplicate")  # pragma: no cover - callers checked that there is one


def _duplicate(path: Path, key: str, where: str = "") -> InvalidModelFile:
    return InvalidModelFile(f"{path}: {where}header has duplicate key {key!r}", path=str(path), key=key)


def _tensor_error(path: Path, name: str, problem: str) -> InvalidModelFile:
    return InvalidModelFile(f"{path}: tensor {name!r}: {problem}", path=str(path), tensor=name)


def _short(value: Any, limit: int = 80) -> str:
    """A JSON rendering of ``value`` cut to ``limit`` characters, for messages."""
    text = json.dumps(_plain(value))
    return text if len(text) <= limit else text[: limit - 3] + "..."


def _plain(value: Any) -> Any:
    if type(value) is tuple:
        return {key: _plain(item) for key, item in value}
    if type(value) is list:
        return [_plain(item) for item in value]
    return value


def _check_text(path: Path, text: str, what: str) -> None:
    # JSON escapes can smuggle lone surrogates into a str; safetensors rejects them too.
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        raise InvalidModelFile(
            f"{path}: {what} {text!r} contains a lone surrogate escape", path=str(path)
        ) from None


def _json_type(value: Any) -> str:
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "boolean"
    if isinstance(value, int | float):
        return "number"
    if isinstance(value, str):
        return "string"
    if isinstance(value, list):
        return "array"
    return "object"


# --- I/O ----------------------------------------------------------------------------------------


def _pread_exact(fd: int, size: int, offset: int, path: Path) -> bytes:
    data = os.pread(fd, size, offset)
    if len(data) == size:
        return data
    # A short read is legal (signals, some filesystems); keep reading until size or EOF.
    chunks = [data]
    done = len(data)
    while done < size:
        chunk = os.pread(fd, size - done, offset + done)
        if not chunk:
            raise InvalidModelFile(
                f"{path}: file ended after {offset + done} bytes while reading the header", path=str(path)
            )
        chunks.append(chunk)
        done += len(chunk)
    return b"".join(chunks)
