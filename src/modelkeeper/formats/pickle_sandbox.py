"""Inspect and convert pickle-based checkpoints (``.ckpt``, ``.pt``, ``.pth``, ``.bin``) safely.

Nothing here unpickles in the calling process. A file goes through three gates:

1. **Layout** (in process, reads only; ``pickle_layout``): a torch zip archive must hold exactly
   the members ``torch.save`` writes, under one top-level folder, stored uncompressed, with no path
   tricks or links; a legacy (non-zip) file must be the five pickles of torch's legacy format.
2. **Static opcode scan** (in process, executes nothing; ``pickle_opcodes``): every pickle is
   walked with ``pickletools.genops``; only the opcodes torch's restricted unpickler implements are
   allowed, and every ``GLOBAL`` must be one of ``ALLOWED_GLOBALS`` (``pickle_allowlist``), the
   exact (module, name) pairs that ``torch.save`` emits for state dicts. ``STACK_GLOBAL``/``INST``
   operands are resolved only to name them in the error. Any scan error rejects the file.
3. **Sandboxed load** (``pickle_runner``): a fresh interpreter (``python -I``, see
   ``_pickle_child``) with CPU, address-space and file-size limits and a wall-clock timeout runs
   ``torch.load(weights_only=True)`` (memory-mapped for zip archives) on the very file that was
   scanned (its open descriptor is handed down), after checking with torch's own zip reader that
   it sees the same members and the same ``data.pkl`` bytes that were scanned. It answers with
   one JSON document, which the parent validates strictly; converted files are re-validated with
   the safetensors header parser before they are moved into place.

This module is the entry point: it opens the file once and passes it through the gates.

Errors: ``ModelFileNotFound`` (no file), ``UnsafePickle`` (a global or opcode off the allowlist,
a pickle that cannot be scanned, an archive that deviates from what ``torch.save`` writes),
``InvalidModelFile`` (not a checkpoint, broken, timed out, over its memory limit),
``UnsupportedFormat`` (a checkpoint that is safe but holds something safetensors cannot).
"""

from __future__ import annotations

import contextlib
import os
import secrets
import stat
from collections.abc import Iterator
from pathlib import Path
from typing import IO, Final

from modelkeeper.formats.errors import InvalidModelFile, ModelFileNotFound
from modelkeeper.formats.pickle_allowlist import (
    ALLOWED_GLOBALS,
    ALLOWED_OPCODES,
    PICKLE_SUFFIXES,
    TORCH_TO_SAFETENSORS_DTYPE,
)
from modelkeeper.formats.pickle_layout import PickleScan, scan_layout
from modelkeeper.formats.pickle_runner import (
    TEST_SLEEP_ENV,
    PickleInspection,
    PickleTensor,
    run_child,
    to_inspection,
    verify_converted,
)

__all__ = [
    "ALLOWED_GLOBALS",
    "ALLOWED_OPCODES",
    "PICKLE_SUFFIXES",
    "TEST_SLEEP_ENV",
    "TORCH_TO_SAFETENSORS_DTYPE",
    "PickleInspection",
    "PickleScan",
    "PickleTensor",
    "convert_pickle_to_safetensors",
    "inspect_pickle",
    "scan_pickle",
]

DEFAULT_TIMEOUT: Final = 60.0
DEFAULT_MEMORY_LIMIT: Final = 4 * 1024**3


def scan_pickle(path: str | os.PathLike[str]) -> PickleScan:
    """Check layout and pickle opcodes of ``path`` without executing anything.

    Raises ``UnsafePickle`` for anything off the allowlists, ``InvalidModelFile`` for a file
    that is not a torch checkpoint at all, ``ModelFileNotFound`` when there is no file.
    """
    with _open_checkpoint(path) as (p, f):
        return scan_layout(p, f)


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
        scan = scan_layout(p, f)
        result = run_child(scan, f, op="inspect", dest=None, timeout=timeout, memory_limit=memory_limit_bytes)
    return to_inspection(scan, result)


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
        scan = scan_layout(p, f)
        if target.is_dir():
            raise InvalidModelFile(f"{target}: destination is a directory", path=str(target))
        if not target.parent.is_dir():
            raise ModelFileNotFound(f"{target.parent}: destination folder does not exist", path=str(target))
        partial = target.with_name(f".{target.name}.{secrets.token_hex(6)}.partial")
        try:
            result = run_child(
                scan, f, op="convert", dest=partial, timeout=timeout, memory_limit=memory_limit_bytes
            )
            inspection = to_inspection(scan, result)
            verify_converted(scan.path, partial, inspection)
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
