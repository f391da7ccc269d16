"""Partial files of the staging folder: what each one is a partial of, whether a fetch can resume
it, and a local file with the expected content adopted as one (linked or copied, hashed).

A partial ``<part>`` has a small ``<part>.json`` beside it saying what it is a partial of (URL
without credentials, declared size and checksum, validator); a later fetch of the same thing
keeps its bytes.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
from pathlib import Path
from typing import Any

from modelkeeper.install.buffers import READ_SIZE, OnBytes, write_all
from modelkeeper.install.errors import redact_url
from modelkeeper.install.plan import RemoteFile

__all__ = ["adopt_local", "remove_partial", "resume_offset", "write_description"]


def _meta_path(part: Path) -> Path:
    return part.with_name(part.name + ".json")


def remove_partial(part: Path) -> None:
    """Delete a partial file and its description (missing ones are fine)."""
    for path in (part, _meta_path(part)):
        with contextlib.suppress(FileNotFoundError):
            path.unlink()


def _describe(remote: RemoteFile) -> dict[str, Any]:
    return {"url": redact_url(remote.url), "size": remote.size, "sha256": remote.sha256, "etag": remote.etag}


def resume_offset(part: Path, remote: RemoteFile) -> int:
    """Bytes of ``part`` that can be kept: all of them if it is a partial of this very file."""
    try:
        size = part.stat().st_size
        recorded = json.loads(_meta_path(part).read_text())
    except (OSError, ValueError):
        return 0
    resumable = remote.sha256 is not None or remote.etag is not None  # small git files restart
    if not resumable or recorded != _describe(remote) or (remote.size is not None and size > remote.size):
        return 0
    return size


def write_description(part: Path, remote: RemoteFile) -> None:
    """Say beside ``part`` what it is a partial of, so that a later fetch of ``remote`` resumes it."""
    _meta_path(part).write_text(json.dumps(_describe(remote)))


def adopt_local(source: Path, part: Path, *, expected_sha256: str, on_bytes: OnBytes) -> bool:
    """Put the content of a local file with ``expected_sha256`` at ``part`` (a hard link when the
    file system allows, else a copy), hashing it on the way; False (nothing left) if it differs."""
    part.parent.mkdir(parents=True, exist_ok=True)
    remove_partial(part)
    try:
        os.link(source, part)
        linked = True
    except OSError:
        linked = False
    digest = hashlib.sha256()
    try:
        with open(part if linked else source, "rb") as src, contextlib.ExitStack() as stack:
            out = None if linked else stack.enter_context(open(part, "wb", buffering=0))
            while block := src.read(READ_SIZE):
                digest.update(block)
                if out is not None:
                    write_all(out.fileno(), memoryview(block))
                on_bytes(len(block))
    except OSError:
        remove_partial(part)
        return False
    if digest.hexdigest() != expected_sha256.lower():
        remove_partial(part)
        return False
    return True
