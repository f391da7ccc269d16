"""``modelkeeper convert FILE [-o OUT]``: a pickle checkpoint as a safetensors file, with its metadata.

The pickle (``.ckpt``, ``.pt``, ``.pth``, ``.bin``) is unpickled only in the sandbox
(``formats.pickle_sandbox``: static scan, then a restricted child process), which writes its
tensors to a temporary safetensors file. This side reads that file's header, drops the wrapper an
A1111 or Lightning checkpoint nests its weights under (``state_dict.``; what lies outside it is
training state), identifies the model as the scan does, and writes the final file: the same
tensor bytes under the inner names, with ``__metadata__`` naming the source file, its sha256, and
the type, base and variant the scan gives it (``formats.conventions``). An existing file is never
overwritten: the final file is linked into place only where no file is.
"""

from __future__ import annotations

import hashlib
import json
import os
import secrets
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Annotated

import typer

from modelkeeper.cli.common import fail, human_size, json_option
from modelkeeper.discovery.identify import identify_table
from modelkeeper.discovery.records import Identification, ModelFormat
from modelkeeper.discovery.rules.hints import hints_for
from modelkeeper.discovery.tables import TensorTable, pickle_wrapper
from modelkeeper.formats.conventions import (
    CONVERTED_FROM_KEY,
    CONVERTED_SHA256_KEY,
    MODEL_BASE_KEY,
    MODEL_TYPE_KEY,
    MODEL_VARIANT_KEY,
    SAFETENSORS_SUFFIXES,
)
from modelkeeper.formats.errors import ModelFileNotFound, UnsupportedFormat
from modelkeeper.formats.pickle_sandbox import PICKLE_SUFFIXES, convert_pickle_to_safetensors
from modelkeeper.formats.safetensors_header import SafetensorsHeader, TensorInfo, read_header
from modelkeeper.protocol.errors import ErrorCode, ProtocolError

_CHUNK = 8 << 20


@dataclass(frozen=True)
class Converted:
    """What ``convert_checkpoint`` wrote: the file, how many tensors (and how many training-state
    tensors outside the state dict it left out), its size and its metadata."""

    source: str
    dest: str
    tensors: int
    dropped: int
    bytes: int
    metadata: dict[str, str] = field(default_factory=dict)


def convert_checkpoint(source: Path, out: Path | str | None = None) -> Converted:
    """Write ``source`` (a pickle checkpoint) as safetensors at ``out`` (a safetensors file, or a
    folder: one that exists or a name ending with ``/``, made if need be; default: beside
    ``source``, its suffix ``.safetensors``). Raises a ``ProtocolError`` naming the file:
    FILE_NOT_FOUND, UNSUPPORTED_FORMAT (not a pickle), INVALID_REQUEST (the target exists),
    UNSAFE_PICKLE or INVALID_MODEL_FILE (from the sandbox)."""
    source = source.expanduser()
    if not source.is_file():
        raise ModelFileNotFound(f"{source}: no such file", path=str(source))
    suffix = source.suffix.lower()
    if suffix not in PICKLE_SUFFIXES:
        already = " (it is safetensors already)" if suffix in SAFETENSORS_SUFFIXES else ""
        raise UnsupportedFormat(
            f"{source}: not a pickle checkpoint{already}; convert reads {', '.join(PICKLE_SUFFIXES)} files",
            path=str(source),
        )
    target = _target(source, out)
    _refuse_existing(target)
    if not target.parent.is_dir():
        raise ModelFileNotFound(f"{target.parent}: no such folder", path=str(target.parent))
    digest = _sha256(source)
    unpickled = target.with_name(f".{target.name}.{secrets.token_hex(6)}.unpickled")
    try:
        convert_pickle_to_safetensors(source, unpickled)  # the only place the pickle is loaded
        header = read_header(unpickled)
        wrapper = pickle_wrapper(header.tensors)
        kept = {n[len(wrapper) :]: t for n, t in header.tensors.items() if n.startswith(wrapper)}
        ident = identify_table(TensorTable(kept), ModelFormat.PICKLE, hints=hints_for((source.parent.name,)))
        metadata = _metadata(source, digest, ident)
        size = _write(header, kept, target, metadata)
    finally:
        unpickled.unlink(missing_ok=True)
    return Converted(str(source), str(target), len(kept), len(header.tensors) - len(kept), size, metadata)


def _target(source: Path, out: Path | str | None) -> Path:
    """The file to write: ``out`` itself when it names a safetensors file; inside ``out`` when it
    is a folder or ends with ``/`` (a folder not there yet is made). Anything else is refused: a
    name without the suffix wrote an extension-less file where a folder was meant."""
    if out is None:
        return source.with_suffix(".safetensors")
    folder = isinstance(out, str) and out.endswith(("/", os.sep))
    out = Path(out).expanduser()
    if folder or out.is_dir():
        if out.exists() and not out.is_dir():
            raise ProtocolError(f"{out} is a file, not a folder", ErrorCode.INVALID_REQUEST, path=str(out))
        out.mkdir(parents=True, exist_ok=True)
        return out / source.with_suffix(".safetensors").name
    if out.suffix.lower() not in SAFETENSORS_SUFFIXES:
        raise ProtocolError(
            f"--out {out}: name a {' or '.join(SAFETENSORS_SUFFIXES)} file, or a folder (end it with /)",
            ErrorCode.INVALID_REQUEST,
            path=str(out),
        )
    return out


def _refuse_existing(target: Path) -> None:
    if target.exists() or target.is_symlink():
        raise ProtocolError(
            f"{target} exists: not overwritten (remove it, or name another file with --out)",
            ErrorCode.INVALID_REQUEST,
            path=str(target),
        )


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as handle:
        while chunk := handle.read(_CHUNK):
            digest.update(chunk)
    return digest.hexdigest()


def _metadata(source: Path, digest: str, ident: Identification) -> dict[str, str]:
    metadata = {
        "format": "pt",
        CONVERTED_FROM_KEY: source.name,
        CONVERTED_SHA256_KEY: digest,
        MODEL_TYPE_KEY: str(ident.type),
        MODEL_BASE_KEY: str(ident.base),
    }
    if ident.variant:
        metadata[MODEL_VARIANT_KEY] = str(ident.variant)
    return metadata


def _write(
    header: SafetensorsHeader, kept: dict[str, TensorInfo], target: Path, metadata: dict[str, str]
) -> int:
    """Copy ``kept``'s bytes from ``header``'s file under their new names into ``target``
    (written beside it, checked, then linked into place only where no file is); its size."""
    order = sorted(kept.items(), key=lambda item: item[1].begin)
    entries: dict[str, object] = {"__metadata__": metadata}
    offset = 0
    for name, info in order:
        entries[name] = {
            "dtype": info.dtype,
            "shape": list(info.shape),
            "data_offsets": [offset, offset + info.nbytes],
        }
        offset += info.nbytes
    head = json.dumps(entries, separators=(",", ":"), ensure_ascii=False).encode("utf-8")
    head += b" " * (-len(head) % 8)
    partial = target.with_name(f".{target.name}.{secrets.token_hex(6)}.partial")
    try:
        with header.path.open("rb") as src, partial.open("xb") as dst:
            dst.write(len(head).to_bytes(8, "little") + head)
            for _, info in order:
                src.seek(header.data_offset + info.begin)
                left = info.nbytes
                while left:
                    chunk = src.read(min(left, _CHUNK))
                    if not chunk:
                        raise OSError(f"{header.path}: ends before tensor {info.name!r}")
                    dst.write(chunk)
                    left -= len(chunk)
        read_header(partial)  # what was written parses as the file it claims to be
        try:
            os.link(partial, target)  # fails where a file appeared meanwhile: never overwrites
        except FileExistsError:
            _refuse_existing(target)
            raise
        return partial.stat().st_size
    finally:
        partial.unlink(missing_ok=True)


def convert_cmd(
    file: Annotated[Path, typer.Argument(help="A pickle checkpoint: .ckpt, .pt, .pth or .bin.")],
    out: Annotated[
        str | None,
        typer.Option(
            "--out",
            "-o",
            help="The .safetensors file to write, or a folder (one that exists, or a name ending with /, "
            "made if need be). Default: beside FILE.",
        ),
    ] = None,
    as_json: Annotated[bool, json_option("Print what was written as JSON.")] = False,
) -> None:
    """Convert a pickle checkpoint to safetensors, with its metadata (source name and sha256, type,
    base). The pickle is loaded only in a sandboxed process; an existing file is never overwritten."""
    from rich.console import Console

    console = Console(stderr=True)
    try:
        with console.status(f"converting {file.name} in the sandbox"):
            done = convert_checkpoint(file, out)
    except ProtocolError as exc:
        raise fail(exc) from None
    if as_json:
        typer.echo(json.dumps(asdict(done), indent=2))
        return
    meta = done.metadata
    what = ", ".join(meta[k] for k in (MODEL_TYPE_KEY, MODEL_BASE_KEY, MODEL_VARIANT_KEY) if k in meta)
    typer.echo(f"wrote {done.dest} ({done.tensors} tensors, {human_size(done.bytes)}; {what})")
    if done.dropped:
        typer.echo(f"left out {done.dropped} tensors outside the state dict (training state)")
    typer.echo(f"from {done.source} (sha256 {meta[CONVERTED_SHA256_KEY]})")
