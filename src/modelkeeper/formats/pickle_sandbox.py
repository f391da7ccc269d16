"""Inspect and convert pickle-based checkpoints (``.ckpt``, ``.pt``, ``.pth``, ``.bin``) safely.

Nothing here unpickles in the calling process. A file goes through three gates:

1. **Layout** (in process, reads only): a torch zip archive must hold exactly the members
   ``torch.save`` writes, under one top-level folder, stored uncompressed, with no path tricks
   or links; a legacy (non-zip) file must be the five pickles of torch's legacy format.
2. **Static opcode scan** (in process, executes nothing): every pickle is walked with
   ``pickletools.genops``; only the opcodes torch's restricted unpickler implements are allowed,
   and every ``GLOBAL`` must be one of ``ALLOWED_GLOBALS``, the exact (module, name) pairs that
   ``torch.save`` emits for state dicts. ``STACK_GLOBAL``/``INST`` operands are resolved only to
   name them in the error. Any scan error rejects the file.
3. **Sandboxed load**: a fresh interpreter (``python -I``, see ``_pickle_child``) with CPU,
   address-space and file-size limits and a wall-clock timeout runs
   ``torch.load(weights_only=True)`` (memory-mapped for zip archives) on the very file that was
   scanned (its open descriptor is handed down), after checking with torch's own zip reader that
   it sees the same members and the same ``data.pkl`` bytes that were scanned. It answers with
   one JSON document, which this side validates strictly; converted files are re-validated with
   the safetensors header parser before they are moved into place.

Errors: ``ModelFileNotFound`` (no file), ``UnsafePickle`` (a global or opcode off the allowlist,
a pickle that cannot be scanned, an archive that deviates from what ``torch.save`` writes),
``InvalidModelFile`` (not a checkpoint, broken, timed out, over its memory limit),
``UnsupportedFormat`` (a checkpoint that is safe but holds something safetensors cannot).
"""

from __future__ import annotations

import contextlib
import hashlib
import io
import json
import os
import pickletools
import re
import secrets
import signal
import stat
import subprocess
import sys
import tarfile
import zipfile
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Any, Final, Literal

from modelkeeper.formats.errors import (
    FormatError,
    InvalidModelFile,
    ModelFileNotFound,
    UnsafePickle,
    UnsupportedFormat,
)
from modelkeeper.formats.safetensors_header import read_header

#: File suffixes of pickle-based weights, which are only ever read through this sandbox.
PICKLE_SUFFIXES: Final = (".ckpt", ".pt", ".pth", ".bin")

__all__ = [
    "ALLOWED_GLOBALS",
    "ALLOWED_OPCODES",
    "TORCH_TO_SAFETENSORS_DTYPE",
    "PickleInspection",
    "PickleScan",
    "PickleTensor",
    "convert_pickle_to_safetensors",
    "inspect_pickle",
    "scan_pickle",
]

PickleFormat = Literal["torch_zip", "legacy"]

# --- allowlists ---------------------------------------------------------------------------------

# The legacy typed storages torch.save names for the dtypes below (torch.<Name>Storage).
_STORAGE_CLASSES = [
    "Double",
    "Float",
    "Half",
    "BFloat16",
    "Long",
    "Int",
    "Short",
    "Char",
    "Byte",
    "Bool",
    "ComplexFloat",
]

#: torch dtype (as ``str(dtype)``) → safetensors dtype name, for every dtype a checkpoint may hold.
TORCH_TO_SAFETENSORS_DTYPE: Final[dict[str, str]] = {
    "torch.float64": "F64",
    "torch.float32": "F32",
    "torch.float16": "F16",
    "torch.bfloat16": "BF16",
    "torch.int64": "I64",
    "torch.int32": "I32",
    "torch.int16": "I16",
    "torch.int8": "I8",
    "torch.uint8": "U8",
    "torch.bool": "BOOL",
    "torch.uint16": "U16",
    "torch.uint32": "U32",
    "torch.uint64": "U64",
    "torch.complex64": "C64",
    "torch.float8_e4m3fn": "F8_E4M3",
    "torch.float8_e5m2": "F8_E5M2",
    "torch.float8_e4m3fnuz": "F8_E4M3FNUZ",
    "torch.float8_e5m2fnuz": "F8_E5M2FNUZ",
    "torch.float8_e8m0fnu": "F8_E8M0",
}

#: The exact (module, name) pairs a pickle may reference: what ``torch.save`` writes for state
#: dicts and Lightning-style checkpoints of plain values. A subset of what torch's own
#: ``weights_only`` unpickler accepts (no sparse/quantized/nested/meta tensors, no tensor
#: subclasses, no ``_codecs.encode``/``set``/``complex``/``bytearray``, no ``torch.device``).
ALLOWED_GLOBALS: Final[frozenset[tuple[str, str]]] = frozenset(
    {
        ("collections", "OrderedDict"),
        ("torch._utils", "_rebuild_tensor_v2"),
        ("torch._utils", "_rebuild_tensor_v3"),
        ("torch._utils", "_rebuild_parameter"),
        ("torch.storage", "UntypedStorage"),
        ("torch", "Size"),
        *(("torch", f"{name}Storage") for name in _STORAGE_CLASSES),
        *(("torch", dtype.removeprefix("torch.")) for dtype in TORCH_TO_SAFETENSORS_DTYPE),
    }
)

#: Opcodes allowed in a pickle: exactly those torch's ``weights_only`` unpickler implements.
ALLOWED_OPCODES: Final[frozenset[str]] = frozenset(
    [
        "PROTO",
        "STOP",
        "GLOBAL",
        "REDUCE",
        "NEWOBJ",
        "BUILD",
        "MARK",
        "APPEND",
        "APPENDS",
        "SETITEM",
        "SETITEMS",
        "TUPLE",
        "TUPLE1",
        "TUPLE2",
        "TUPLE3",
        "EMPTY_TUPLE",
        "EMPTY_LIST",
        "EMPTY_DICT",
        "EMPTY_SET",
        "NONE",
        "NEWTRUE",
        "NEWFALSE",
        "BININT",
        "BININT1",
        "BININT2",
        "LONG1",
        "BINFLOAT",
        "BINUNICODE",
        "SHORT_BINSTRING",
        "BINPERSID",
        "BINGET",
        "LONG_BINGET",
        "BINPUT",
        "LONG_BINPUT",
    ]
)

#: Largest pickle stream scanned (data.pkl, or the pickles of a legacy file). The scan is pure
#: Python in the caller's thread, a few MB/s; a state dict needs ~110 bytes of pickle per tensor.
MAX_PICKLE_BYTES: Final = 64 * 1024 * 1024
#: Largest child result accepted (JSON).
MAX_RESULT_BYTES: Final = 512 * 1024 * 1024
DEFAULT_TIMEOUT: Final = 60.0
DEFAULT_MEMORY_LIMIT: Final = 4 * 1024**3

_ZIP_MAGIC = b"PK\x03\x04"
_LEGACY_MAGIC = 0x1950A86A20F9469CFC6C
_LEGACY_PROTOCOL = 1001
# Members of a torch.save archive, relative to its one top-level folder.
_ZIP_MEMBER = re.compile(
    r"data\.pkl|version|\.data/version|byteorder|\.data/serialization_id|\.format_version"
    r"|\.storage_alignment|data/[0-9]{1,12}",
    re.ASCII,
)
_SMALL_MEMBERS = frozenset(
    {
        "version",
        ".data/version",
        "byteorder",
        ".data/serialization_id",
        ".format_version",
        ".storage_alignment",
    }
)
_STRING_OPS = frozenset(
    {"SHORT_BINUNICODE", "BINUNICODE", "BINUNICODE8", "UNICODE", "STRING", "BINSTRING", "SHORT_BINSTRING"}
)
_CHILD_SCRIPT = Path(__file__).with_name("_pickle_child.py")
#: Test hook passed through to the child: seconds to sleep before loading (see ``_pickle_child``).
TEST_SLEEP_ENV: Final = "MODELKEEPER_PICKLE_CHILD_TEST_SLEEP"


@dataclass(frozen=True)
class PickleTensor:
    name: str
    dtype: str
    shape: tuple[int, ...]


@dataclass(frozen=True)
class PickleInspection:
    """What a checkpoint holds: tensors by flattened name (nested dict keys joined by ``.``) and
    the flattened names of everything else (``global_step``, ``epoch``, ...)."""

    path: Path
    tensors: dict[str, PickleTensor]
    non_tensor_keys: list[str]
    format: str


@dataclass(frozen=True)
class PickleScan:
    """The outcome of the static gates: the layout and the globals its pickles reference."""

    path: Path
    format: PickleFormat
    globals: frozenset[tuple[str, str]]
    #: torch zip only: record names relative to the archive folder, and sha256 of data.pkl.
    records: tuple[str, ...] = ()
    data_pkl_sha256: str = ""


# --- public API ---------------------------------------------------------------------------------


def scan_pickle(path: str | os.PathLike[str]) -> PickleScan:
    """Check layout and pickle opcodes of ``path`` without executing anything.

    Raises ``UnsafePickle`` for anything off the allowlists, ``InvalidModelFile`` for a file
    that is not a torch checkpoint at all, ``ModelFileNotFound`` when there is no file.
    """
    with _open_checkpoint(path) as (p, f):
        return _scan_file(p, f)


def inspect_pickle(
    path: str | os.PathLike[str],
    *,
    timeout: float = DEFAULT_TIMEOUT,
    memory_limit_bytes: int = DEFAULT_MEMORY_LIMIT,
) -> PickleInspection:
    """List the tensors of a pickle-based checkpoint: scanned here, loaded only in a sandboxed child.

    ``timeout`` is wall-clock seconds for the child (it is killed when they run out);
    ``memory_limit_bytes`` is what the load may allocate beyond the interpreter and torch
    themselves (a memory-mapped zip archive's own mapping is not counted).
    """
    with _open_checkpoint(path) as (p, f):
        scan = _scan_file(p, f)
        result = _run_child(
            scan, f, op="inspect", dest=None, timeout=timeout, memory_limit=memory_limit_bytes
        )
    return _inspection(scan, result)


def convert_pickle_to_safetensors(
    path: str | os.PathLike[str],
    dest: str | os.PathLike[str],
    *,
    timeout: float = DEFAULT_TIMEOUT,
    memory_limit_bytes: int = DEFAULT_MEMORY_LIMIT,
) -> PickleInspection:
    """Write the tensors of a pickle-based checkpoint to a safetensors file at ``dest``.

    Same gates as ``inspect_pickle``; the child writes a temporary file next to ``dest``, which
    is validated (header, names, dtypes, shapes) before it replaces ``dest`` atomically. Names are
    flattened (``{"state_dict": {"a": t}}`` → ``state_dict.a``).
    """
    target = Path(os.path.abspath(dest))
    with _open_checkpoint(path) as (p, f):
        scan = _scan_file(p, f)
        if target.is_dir():
            raise InvalidModelFile(f"{target}: destination is a directory", path=str(target))
        if not target.parent.is_dir():
            raise ModelFileNotFound(f"{target.parent}: destination folder does not exist", path=str(target))
        partial = target.with_name(f".{target.name}.{secrets.token_hex(6)}.partial")
        try:
            result = _run_child(
                scan, f, op="convert", dest=partial, timeout=timeout, memory_limit=memory_limit_bytes
            )
            inspection = _inspection(scan, result)
            _verify_converted(scan.path, partial, inspection)
            os.replace(partial, target)
        finally:
            with contextlib.suppress(FileNotFoundError):
                partial.unlink()
    return inspection


@contextlib.contextmanager
def _open_checkpoint(path: str | os.PathLike[str]) -> Iterator[tuple[Path, IO[bytes]]]:
    """Open the file once: the scan and the child both read this very file (no rename race)."""
    p = Path(os.path.abspath(path))
    try:
        f = p.open("rb")
    except FileNotFoundError:
        raise ModelFileNotFound(f"{p}: no such file", path=str(p)) from None
    except IsADirectoryError:
        raise InvalidModelFile(f"{p}: is a directory, not a checkpoint file", path=str(p)) from None
    except OSError as exc:
        raise InvalidModelFile(f"{p}: cannot open: {exc.strerror}", path=str(p)) from None
    with f:
        if not stat.S_ISREG(os.fstat(f.fileno()).st_mode):
            raise InvalidModelFile(f"{p}: not a regular file", path=str(p))
        yield p, f


def _scan_file(p: Path, f: IO[bytes]) -> PickleScan:
    start = f.read(4)
    if not start:
        raise InvalidModelFile(f"{p}: empty file", path=str(p))
    f.seek(0)
    if start == _ZIP_MAGIC:
        return _scan_zip(p, f)
    if _is_tar(f):
        raise UnsafePickle(f"{p}: legacy tar checkpoint; torch cannot load it with weights_only", path=str(p))
    f.seek(0)
    return _scan_legacy(p, f)


# --- torch zip layout ---------------------------------------------------------------------------


def _scan_zip(path: Path, f: IO[bytes]) -> PickleScan:
    try:
        archive = zipfile.ZipFile(f)
    except (zipfile.BadZipFile, zipfile.LargeZipFile, ValueError, EOFError) as exc:
        raise InvalidModelFile(f"{path}: broken zip archive: {exc}", path=str(path)) from None
    with archive:
        infos = archive.infolist()
        prefix = _check_members(path, infos)
        by_name = {info.filename: info for info in infos}
        data_pkl = by_name.get(f"{prefix}/data.pkl")
        if data_pkl is None:
            raise InvalidModelFile(f"{path}: zip archive has no {prefix}/data.pkl", path=str(path))
        if data_pkl.file_size > MAX_PICKLE_BYTES:
            raise UnsafePickle(
                f"{path}: data.pkl is {data_pkl.file_size} bytes, over the {MAX_PICKLE_BYTES}-byte limit",
                path=str(path),
            )
        for rel in sorted(_SMALL_MEMBERS):
            if (info := by_name.get(f"{prefix}/{rel}")) is not None:
                _check_small_member(path, rel, _read_member(path, archive, info, limit=64))
        data = _read_member(path, archive, data_pkl, limit=MAX_PICKLE_BYTES)
    end, found = _scan_stream(path, "data.pkl", io.BytesIO(data), first=True)
    if end != len(data):
        raise UnsafePickle(
            f"{path}: data.pkl has {len(data) - end} bytes after its STOP opcode", path=str(path)
        )
    return PickleScan(
        path=path,
        format="torch_zip",
        globals=frozenset(found),
        records=tuple(sorted(info.filename[len(prefix) + 1 :] for info in infos)),
        data_pkl_sha256=hashlib.sha256(data).hexdigest(),
    )


def _check_members(path: Path, infos: list[zipfile.ZipInfo]) -> str:
    """Check every member name and attribute; return the one top-level folder."""
    if not infos:
        raise InvalidModelFile(f"{path}: empty zip archive", path=str(path))
    prefixes: set[str] = set()
    seen: set[str] = set()
    for info in infos:
        name = info.filename
        problem = _member_problem(info) or ("appears twice" if name in seen else "")
        if problem:
            raise UnsafePickle(f"{path}: zip member {name!r} {problem}", path=str(path), member=name)
        seen.add(name)
        prefixes.add(name.split("/", 1)[0])
    if len(prefixes) != 1:
        raise UnsafePickle(
            f"{path}: zip members are spread over {len(prefixes)} top-level folders "
            f"({', '.join(sorted(map(repr, prefixes))[:5])}); torch.save writes one",
            path=str(path),
        )
    if min(info.header_offset for info in infos) != 0:
        raise UnsafePickle(f"{path}: zip archive has bytes before its first member", path=str(path))
    return prefixes.pop()


def _member_problem(info: zipfile.ZipInfo) -> str:
    name = info.filename
    if name != info.orig_filename or not name or "\\" in name or "\0" in name or name.startswith("/"):
        return "has an absolute or malformed name"
    parts = name.split("/")
    if any(part in ("", ".", "..") for part in parts):
        return "has an empty, '.' or '..' path component"
    if len(parts) < 2:
        return "is outside the archive folder"
    rel = name.split("/", 1)[1]
    if not _ZIP_MEMBER.fullmatch(rel):
        return "is not a member torch.save writes"
    mode = info.external_attr >> 16
    if stat.S_IFMT(mode) not in (0, stat.S_IFREG):
        kind = "a symlink" if stat.S_ISLNK(mode) else "not a regular file"
        return f"is {kind}"
    if info.compress_type != zipfile.ZIP_STORED:
        return "is compressed; torch.save stores members uncompressed"
    if info.flag_bits & 0x1:
        return "is encrypted"
    return ""


def _check_small_member(path: Path, rel: str, content: bytes) -> None:
    if rel == "byteorder":
        ok = content in (b"little", b"big")
    elif rel == ".data/serialization_id":
        ok = content.isascii() and content.isalnum()
    else:
        ok = content.strip().isdigit()
    if not ok:
        raise UnsafePickle(
            f"{path}: zip member {rel} has unexpected content {content[:32]!r}", path=str(path)
        )


def _read_member(path: Path, archive: zipfile.ZipFile, info: zipfile.ZipInfo, *, limit: int) -> bytes:
    if info.file_size > limit:
        raise UnsafePickle(
            f"{path}: zip member {info.filename!r} is larger than {limit} bytes", path=str(path)
        )
    try:
        with archive.open(info) as member:
            data = member.read(limit + 1)
    except (zipfile.BadZipFile, OSError, EOFError, ValueError) as exc:
        raise InvalidModelFile(
            f"{path}: cannot read zip member {info.filename!r}: {exc}", path=str(path)
        ) from None
    if len(data) != info.file_size:
        raise InvalidModelFile(f"{path}: zip member {info.filename!r} has the wrong size", path=str(path))
    return data


# --- legacy layout ------------------------------------------------------------------------------


def _is_tar(f: IO[bytes]) -> bool:
    # The same test torch's legacy loader makes before anything else; only headers are read.
    try:
        with tarfile.open(fileobj=f, mode="r:"):
            return True
    except (tarfile.TarError, OSError, ValueError, EOFError):
        return False


def _scan_legacy(path: Path, f: IO[bytes]) -> PickleScan:
    """torch's legacy format: magic, protocol, sys_info, the object, storage keys, raw storages."""
    reader = _LimitedReader(f, MAX_PICKLE_BYTES)
    found: set[tuple[str, str]] = set()
    values: list[list[tuple[str, Any]]] = []
    for index, what in enumerate(
        ("magic number", "protocol version", "system info", "object", "storage keys")
    ):
        _, globals_here = _scan_stream(
            path, what, reader, first=index == 0, collect=values if index != 3 else None
        )
        found |= globals_here
        if index == 0 and values[0] != [("PROTO", 2), ("LONG1", _LEGACY_MAGIC), ("STOP", None)]:
            raise InvalidModelFile(
                f"{path}: not a torch checkpoint (no zip archive, no legacy magic number)", path=str(path)
            )
        if index == 1 and values[1] != [("PROTO", 2), ("BININT2", _LEGACY_PROTOCOL), ("STOP", None)]:
            raise InvalidModelFile(f"{path}: unknown torch legacy protocol version", path=str(path))
        if index == 2 and found:
            raise UnsafePickle(f"{path}: legacy system info references globals", path=str(path))
    keys_ops = values[-1]
    structural = {"PROTO", "EMPTY_LIST", "MARK", "BINPUT", "LONG_BINPUT", "APPEND", "APPENDS", "STOP"}
    keys = [arg for op, arg in keys_ops if op in ("BINUNICODE", "SHORT_BINSTRING")]
    if any(op not in structural and op not in ("BINUNICODE", "SHORT_BINSTRING") for op, _ in keys_ops):
        raise InvalidModelFile(f"{path}: legacy storage keys are not a list of strings", path=str(path))
    size = os.fstat(f.fileno()).st_size
    if size - reader.position < 8 * len(keys):
        raise InvalidModelFile(
            f"{path}: truncated: {len(keys)} storages but {size - reader.position} data bytes", path=str(path)
        )
    return PickleScan(path=path, format="legacy", globals=frozenset(found))


class _LimitedReader:
    """A read-only view of a file that refuses to hand out more than ``limit`` bytes."""

    def __init__(self, f: IO[bytes], limit: int) -> None:
        self._f = f
        self._left = limit
        self.position = 0

    def _take(self, data: bytes) -> bytes:
        self._left -= len(data)
        self.position += len(data)
        return data

    def read(self, n: int) -> bytes:
        if n > self._left:
            raise _ScanLimitError
        return self._take(self._f.read(n))

    def tell(self) -> int:
        return self.position

    def readline(self) -> bytes:
        line = self._f.readline(self._left + 1)
        if len(line) > self._left:
            raise _ScanLimitError
        return self._take(line)


class _ScanLimitError(Exception):
    pass


# --- the opcode scanner ---------------------------------------------------------------------------


_UNKNOWN: Final = object()
# How an opcode moves the scanner's view of the stack (everything else pushes an unknown value).
_PUSH, _PUSH_STRING, _PUT, _MEMOIZE, _GET, _GLOBAL, _STOP, _NEUTRAL = (object() for _ in range(8))
_OP_KINDS: Final[dict[str, object]] = {
    **dict.fromkeys(_STRING_OPS, _PUSH_STRING),
    **dict.fromkeys(("PUT", "BINPUT", "LONG_BINPUT"), _PUT),
    "MEMOIZE": _MEMOIZE,
    **dict.fromkeys(("GET", "BINGET", "LONG_BINGET"), _GET),
    **dict.fromkeys(("GLOBAL", "INST", "STACK_GLOBAL"), _GLOBAL),
    "STOP": _STOP,
    "FRAME": _NEUTRAL,
    "PROTO": _NEUTRAL,
}


def _scan_stream(
    path: Path,
    where: str,
    stream: Any,
    *,
    first: bool,
    collect: list[list[tuple[str, Any]]] | None = None,
) -> tuple[int, set[tuple[str, str]]]:
    """Walk one pickle up to its STOP; return its end offset and the globals it references.

    Raises ``UnsafePickle`` at the first global off the allowlist, and after the walk for an
    opcode off the allowlist (so that a protocol-4 payload is still named by its global).
    ``collect`` receives the (opcode, argument) list of the pickle, for small ones.
    """
    found: set[tuple[str, str]] = set()
    ops: list[tuple[str, Any]] = []
    bad_opcode: tuple[str, int] | None = None
    # Just enough of the stack to resolve STACK_GLOBAL operands for the error message: the last
    # two values pushed (``second``, ``last``) when they are string literals, and the memo
    # slots holding strings. Every other opcode pushes an unknown value as far as this cares.
    second: Any = _UNKNOWN
    last: Any = _UNKNOWN
    memo: dict[int, Any] = {}
    end = -1
    first_op = ""
    allowed = ALLOWED_OPCODES
    kinds = _OP_KINDS
    try:
        for opcode, arg, at in pickletools.genops(stream):
            name = opcode.name
            if name not in allowed and bad_opcode is None:
                bad_opcode = (name, -1 if at is None else at)
            if collect is not None:
                ops.append((name, arg))
            kind = kinds.get(name, _PUSH)
            if kind is _PUSH:
                second, last = last, _UNKNOWN
            elif kind is _PUSH_STRING:
                second, last = last, (arg if isinstance(arg, str) else _UNKNOWN)
            elif kind is _PUT:
                memo[int(arg or 0)] = last
            elif kind is _MEMOIZE:
                memo[len(memo)] = last
            elif kind is _GET:
                second, last = last, memo.get(int(arg or 0), _UNKNOWN)
            elif kind is _GLOBAL:
                pair = _split_global(arg) if name != "STACK_GLOBAL" else _pair(second, last)
                _check_global(path, where, name, pair, at)
                found.add(pair)  # type: ignore[arg-type]  # _check_global refused None
                second, last = last, _UNKNOWN
            elif kind is _STOP:
                end = (at or 0) + 1
            first_op = first_op or name
    except _ScanLimitError:
        raise UnsafePickle(
            f"{path}: {where} pickle is larger than the {MAX_PICKLE_BYTES}-byte scan limit", path=str(path)
        ) from None
    except (ValueError, EOFError, OverflowError) as exc:
        if first and first_op != "PROTO":
            # torch writes PROTO first; garbage that merely decodes as a few opcodes is not a pickle.
            raise InvalidModelFile(
                f"{path}: neither a torch zip archive nor a pickle", path=str(path)
            ) from None
        raise UnsafePickle(f"{path}: {where} pickle cannot be scanned: {exc}", path=str(path)) from None
    if bad_opcode is not None:
        raise UnsafePickle(
            f"{path}: {where} pickle uses opcode {bad_opcode[0]} at offset {bad_opcode[1]}, "
            "which the restricted loader does not allow",
            path=str(path),
            opcode=bad_opcode[0],
        )
    if collect is not None:
        collect.append(ops)
    return end, found


def _pair(module: Any, name: Any) -> tuple[str, str] | None:
    return (module, name) if isinstance(module, str) and isinstance(name, str) else None


def _split_global(arg: Any) -> tuple[str, str] | None:
    # genops joins module and name with a space; only an unambiguous split can be allowlisted.
    if not isinstance(arg, str) or arg.count(" ") != 1:
        return None
    module, name = arg.split(" ")
    return module, name


def _check_global(path: Path, where: str, opcode: str, pair: tuple[str, str] | None, pos: int | None) -> None:
    if pair is not None and pair in ALLOWED_GLOBALS and opcode == "GLOBAL":
        return
    if pair is None:
        named = "?"
        problem = f"{opcode} with operands that cannot be resolved statically"
    elif pair in ALLOWED_GLOBALS:
        named = f"{pair[0]}.{pair[1]}"
        problem = f"{named} through {opcode}, which the restricted loader does not allow"
    else:
        named = f"{pair[0]}.{pair[1]}"
        problem = f"{opcode} {named}, which is not on the allowlist"
    raise UnsafePickle(
        f"{path}: {where} pickle references {problem} (offset {pos})", path=str(path), global_name=named
    )


# --- the child ----------------------------------------------------------------------------------


def _run_child(
    scan: PickleScan, f: IO[bytes], *, op: str, dest: Path | None, timeout: float, memory_limit: int
) -> dict[str, Any]:
    if timeout <= 0 or memory_limit <= 0:
        raise ValueError("timeout and memory_limit_bytes must be positive")
    fd = f.fileno()
    file_size = os.fstat(fd).st_size
    request = {
        "op": op,
        "fd": fd,
        "dest": str(dest) if dest is not None else None,
        "format": scan.format,
        "records": list(scan.records),
        "data_pkl_sha256": scan.data_pkl_sha256,
        "memory_limit": int(memory_limit),
        "cpu_seconds": int(timeout) + 10,
        # A stride-0 tensor can claim terabytes from a few bytes of storage: cap the output.
        "max_output_bytes": 2 * file_size + 64 * 1024 * 1024,
        "dtype_names": TORCH_TO_SAFETENSORS_DTYPE,
    }
    env = {
        "PATH": os.environ.get("PATH", "/usr/bin:/bin"),
        "LC_ALL": "C.UTF-8",
        "OMP_NUM_THREADS": "1",
        "MALLOC_ARENA_MAX": "2",
    }
    if TEST_SLEEP_ENV in os.environ:
        env[TEST_SLEEP_ENV] = os.environ[TEST_SLEEP_ENV]
    with _spawn_child(env, fd) as child:
        try:
            stdout, stderr = child.communicate(json.dumps(request).encode(), timeout=timeout)
        except subprocess.TimeoutExpired:
            _kill(child)
            raise InvalidModelFile(
                f"{scan.path}: loading timed out after {timeout:g} s; the sandbox process was killed",
                path=str(scan.path),
                timeout=timeout,
            ) from None
    return _parse_result(scan.path, child.returncode, stdout, stderr)


@contextlib.contextmanager
def _spawn_child(env: dict[str, str], fd: int) -> Iterator[subprocess.Popen[bytes]]:
    child = subprocess.Popen(
        [sys.executable, "-I", "-X", "utf8", str(_CHILD_SCRIPT)],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        cwd="/",
        env=env,
        start_new_session=True,
        close_fds=True,
        pass_fds=(fd,),
    )
    try:
        yield child
    finally:
        if child.poll() is None:
            _kill(child)


def _kill(child: subprocess.Popen[bytes]) -> None:
    # The child leads its own session: kill the group so nothing it started outlives it.
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(child.pid, signal.SIGKILL)
    with contextlib.suppress(ProcessLookupError):
        child.kill()
    child.communicate()


def _parse_result(path: Path, returncode: int, stdout: bytes, stderr: bytes) -> dict[str, Any]:
    tail = stderr[-600:].decode("utf-8", "replace").strip()
    if returncode < 0:
        sig = -returncode
        reason = {
            int(signal.SIGXCPU): "ran out of its CPU time limit",
            int(signal.SIGXFSZ): "exceeded its output size limit",
            int(signal.SIGKILL): "was killed (CPU or memory limit)",
            int(signal.SIGSEGV): "crashed",
        }.get(sig, f"died of signal {sig}")
        raise InvalidModelFile(f"{path}: the sandbox process {reason}", path=str(path), signal=sig)
    if len(stdout) > MAX_RESULT_BYTES:
        raise InvalidModelFile(f"{path}: the sandbox process answered too much", path=str(path))
    try:
        result = json.loads(stdout.decode("utf-8"), parse_constant=_no_constant)
    except (UnicodeDecodeError, ValueError):
        raise InvalidModelFile(
            f"{path}: the sandbox process exited {returncode} without a result: {tail[-300:]}", path=str(path)
        ) from None
    if not isinstance(result, dict) or not isinstance(result.get("ok"), bool):
        raise InvalidModelFile(f"{path}: malformed result from the sandbox process", path=str(path))
    if result["ok"]:
        return result
    kind, message = result.get("kind"), result.get("message")
    if not isinstance(kind, str) or not isinstance(message, str):
        raise InvalidModelFile(f"{path}: malformed error from the sandbox process", path=str(path))
    message = message[:1000]
    error: type[FormatError] = {
        "unsafe": UnsafePickle,
        "unsupported": UnsupportedFormat,
    }.get(kind, InvalidModelFile)
    prefix = "ran out of memory: " if kind == "memory" else ""
    raise error(f"{path}: {prefix}{message}", path=str(path))


def _no_constant(token: str) -> Any:
    raise ValueError(token)


def _inspection(scan: PickleScan, result: dict[str, Any]) -> PickleInspection:
    path = scan.path
    raw_tensors, raw_others = result.get("tensors"), result.get("non_tensor_keys")
    if not isinstance(raw_tensors, list) or not isinstance(raw_others, list):
        raise InvalidModelFile(f"{path}: malformed result from the sandbox process", path=str(path))
    tensors: dict[str, PickleTensor] = {}
    for item in raw_tensors:
        if not (
            isinstance(item, list)
            and len(item) == 3
            and isinstance(item[0], str)
            and isinstance(item[1], str)
            and isinstance(item[2], list)
            and all(type(d) is int and d >= 0 for d in item[2])
            and _is_text(item[0])
        ):
            raise InvalidModelFile(f"{path}: malformed tensor entry from the sandbox process", path=str(path))
        name, torch_dtype, shape = item
        if name in tensors:
            raise InvalidModelFile(
                f"{path}: tensor name {name!r} appears twice after flattening", path=str(path)
            )
        dtype = TORCH_TO_SAFETENSORS_DTYPE.get(torch_dtype)
        if dtype is None:
            raise UnsupportedFormat(
                f"{path}: tensor {name!r} has dtype {torch_dtype[:40]}, which safetensors cannot store",
                path=str(path),
                tensor=name,
            )
        tensors[name] = PickleTensor(name=name, dtype=dtype, shape=tuple(shape))
    if not all(isinstance(key, str) and _is_text(key) for key in raw_others):
        raise InvalidModelFile(f"{path}: malformed key list from the sandbox process", path=str(path))
    return PickleInspection(path=path, tensors=tensors, non_tensor_keys=list(raw_others), format=scan.format)


def _is_text(value: str) -> bool:
    """False for strings holding lone surrogates (JSON escapes can carry them), which no file can hold."""
    try:
        value.encode("utf-8")
    except UnicodeEncodeError:
        return False
    return True


def _verify_converted(source: Path, written: Path, inspection: PickleInspection) -> None:
    header = read_header(written)
    expected = {(t.name, t.dtype, t.shape) for t in inspection.tensors.values()}
    actual = {(i.name, i.dtype, i.shape) for i in header.tensors.values()}
    if expected != actual:
        raise InvalidModelFile(
            f"{source}: the converted file does not match the inspected tensors", path=str(source)
        )
