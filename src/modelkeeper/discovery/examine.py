"""Examine one candidate: read its header (never its weights), its sidecars, and identify it.

The reader is chosen by the file's first bytes, not its name: a pickle named ``.safetensors``
is read as a pickle (in the sandbox), a GGUF as a GGUF. Every failure becomes a FormatError
with a reason; the scanner records it as a rejected entry.
"""

from __future__ import annotations

import errno
import os
import struct
from dataclasses import dataclass, field
from pathlib import Path

from modelkeeper.discovery.errors import EmptyFile, FileVanished, UnreadableFile
from modelkeeper.discovery.folders import identify_component_folder, identify_pipeline_folder
from modelkeeper.discovery.identify import IdentificationMemo, identify_table
from modelkeeper.discovery.metadata import base_from_text
from modelkeeper.discovery.records import Identification, ModelFormat
from modelkeeper.discovery.rules.hints import hints_for
from modelkeeper.discovery.sidecar import Sidecar, read_sidecars
from modelkeeper.discovery.tables import (
    TensorTable,
    read_gguf_table,
    read_pickle_table,
    read_safetensors_table,
)
from modelkeeper.discovery.walker import Candidate, CandidateKind
from modelkeeper.formats.errors import FormatError, InvalidModelFile, ModelFileNotFound
from modelkeeper.formats.gguf_header import GGUF_MAGIC
from modelkeeper.formats.safetensors_header import StructureMemo

_ZIP = b"PK\x03\x04"
_PICKLE_PROTOCOLS = (b"\x80\x02", b"\x80\x03", b"\x80\x04", b"\x80\x05")


def sniff(path: str) -> ModelFormat | None:
    """The format the first bytes show, or None when they match none."""
    with open(path, "rb") as f:
        head = f.read(16)
    if not head:
        raise EmptyFile(f"{path}: empty file (0 bytes)", path=path)
    if head.startswith(GGUF_MAGIC):
        return ModelFormat.GGUF
    if head.startswith(_ZIP) or head[:2] in _PICKLE_PROTOCOLS:
        return ModelFormat.PICKLE
    if len(head) >= 9:
        (n,) = struct.unpack("<Q", head[:8])
        if 2 <= n < (1 << 32) and head[8:9] == b"{":
            return ModelFormat.SAFETENSORS
    return None


@dataclass
class ScanMemo:
    """What one scan remembers across files: tensor sections already validated and the
    identifications of tables already seen (files that share a structure, see ``StructureMemo``)."""

    headers: StructureMemo = field(default_factory=StructureMemo)
    identifications: IdentificationMemo = field(default_factory=dict)


def read_table(
    path: str, fmt: ModelFormat, *, pickle_timeout: float = 60.0, memo: StructureMemo | None = None
) -> tuple[TensorTable, ModelFormat]:
    """The tensor table of a weights file, whatever its suffix says."""
    if fmt is ModelFormat.SAFETENSORS:
        try:  # the common case: one open, no sniffing
            return read_safetensors_table(path, memo), fmt
        except InvalidModelFile:
            actual = sniff(path)
            if actual in (None, ModelFormat.SAFETENSORS):
                raise
    else:
        actual = sniff(path) or fmt
    if actual is ModelFormat.SAFETENSORS:
        return read_safetensors_table(path), actual
    if actual is ModelFormat.GGUF:
        return read_gguf_table(path), actual
    return read_pickle_table(path, timeout=pickle_timeout), ModelFormat.PICKLE


def _as_format_error(exc: OSError, path: str) -> FormatError:
    if exc.errno == errno.ENOENT:
        return FileVanished(f"{path}: deleted during the scan", path=path)
    if exc.errno == errno.ELOOP:
        return UnreadableFile(f"{path}: symlink loop", path=path)
    return UnreadableFile(f"{path}: cannot read: {exc.strerror or exc}", path=path)


def examine(
    candidate: Candidate, *, pickle_timeout: float = 60.0, memo: ScanMemo | None = None
) -> tuple[Identification, Sidecar]:
    """Identify one candidate; raises a FormatError for anything that cannot be read. A scan
    passes one ``memo`` for all its files."""
    if candidate.error is not None:
        raise candidate.error
    hints = hints_for(candidate.folders)
    path = candidate.path
    try:
        sidecar = read_sidecars(
            path, candidate.siblings or None, is_dir=candidate.kind is not CandidateKind.FILE
        )
        civitai_base = base_from_text(str(sidecar.civitai.get("base_model", ""))) if sidecar.civitai else None
        headers = memo.headers if memo else None
        if candidate.kind is CandidateKind.PIPELINE:
            return identify_pipeline_folder(Path(path), hints, headers), sidecar
        if candidate.kind is CandidateKind.COMPONENT:
            return identify_component_folder(Path(path), set(candidate.names), hints, headers), sidecar
        if candidate.fingerprint is not None and candidate.fingerprint.size == 0:
            raise EmptyFile(f"{path}: empty file (0 bytes)", path=path)
        table, fmt = read_table(path, candidate.format, pickle_timeout=pickle_timeout, memo=headers)
        ident = identify_table(
            table,
            fmt,
            hints=hints,
            sidecar_prediction=sidecar.prediction,
            civitai_base=civitai_base,
            memo=memo.identifications if memo else None,
        )
        return ident, sidecar
    except ModelFileNotFound as exc:
        if os.path.lexists(path):
            raise
        raise FileVanished(f"{path}: deleted during the scan", path=path) from exc
    except FormatError:
        raise
    except OSError as exc:
        raise _as_format_error(exc, path) from exc
    except (ValueError, KeyError, IndexError, TypeError) as exc:
        raise InvalidModelFile(f"{path}: unexpected content: {exc}", path=path) from exc
