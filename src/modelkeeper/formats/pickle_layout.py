"""Gate 1 of the pickle sandbox: the layout of a torch checkpoint, read without executing anything.

A torch zip archive must hold exactly the members ``torch.save`` writes, under one top-level
folder, stored uncompressed, with no path tricks or links; a legacy (non-zip) file must be the five
pickles of torch's legacy format; a legacy tar checkpoint is refused. Each pickle found is handed
to the opcode scan (``pickle_opcodes``). The outcome, a ``PickleScan``, tells the sandboxed load
(``pickle_runner``) what was scanned, so that it can check torch sees the same.
"""

from __future__ import annotations

import hashlib
import io
import os
import re
import stat
import tarfile
import zipfile
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Any, Literal

from modelkeeper.formats.errors import InvalidModelFile, UnsafePickle
from modelkeeper.formats.pickle_allowlist import MAX_PICKLE_BYTES
from modelkeeper.formats.pickle_opcodes import LimitedReader, scan_stream

__all__ = ["PickleFormat", "PickleScan", "scan_layout"]

PickleFormat = Literal["torch_zip", "legacy"]

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


@dataclass(frozen=True)
class PickleScan:
    """The outcome of the static gates: the layout and the globals its pickles reference."""

    path: Path
    format: PickleFormat
    globals: frozenset[tuple[str, str]]
    #: torch zip only: record names relative to the archive folder, and sha256 of data.pkl.
    records: tuple[str, ...] = ()
    data_pkl_sha256: str = ""


def scan_layout(p: Path, f: IO[bytes]) -> PickleScan:
    """Gates 1 and 2 on the open file ``f`` (named ``p`` in errors): its layout, then every pickle in it."""
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
    end, found = scan_stream(path, "data.pkl", io.BytesIO(data), first=True)
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
    reader = LimitedReader(f, MAX_PICKLE_BYTES)
    found: set[tuple[str, str]] = set()
    values: list[list[tuple[str, Any]]] = []
    for index, what in enumerate(
        ("magic number", "protocol version", "system info", "object", "storage keys")
    ):
        _, globals_here = scan_stream(
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
