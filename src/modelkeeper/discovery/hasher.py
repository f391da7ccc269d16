"""The background hashing service: hashes the catalog's pending files and records the results.

``Hasher(catalog).run(progress=...)`` hashes synchronously (``catalog``: a ``CatalogWriter``, the
registry, see ``ports.py``); ``start(...)`` runs the same in a background thread and returns a
:class:`HashJob` (``progress``, ``wait()``, ``cancel()``). Hashes are cached in the catalog by
(path, size, mtime): a file is hashed again only when it changes.
After hashing, moved files are reconciled by content hash (``CatalogWriter.reconcile_moves``).
Errors of one file (deleted meanwhile, unreadable, ``FileChanged``: truncated or rewritten while
it was hashed, as a copy over it does) are reported (``HashReport.errors``, and a warning in the
log naming the file) and skipped: the file stays pending, and is hashed when a later run finds it
as the scan recorded it. Nothing a user does to a file can crash the process (no memory map).
"""

from __future__ import annotations

import logging
import os
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path

from modelkeeper.discovery.errors import FileChanged
from modelkeeper.discovery.examine import sniff
from modelkeeper.discovery.folders import weight_files
from modelkeeper.discovery.hashing import FileHashes, HashingCancelled, TensorSpan, hash_file, hash_folder
from modelkeeper.discovery.ports import CatalogWriter, HashTask
from modelkeeper.discovery.records import ModelFormat
from modelkeeper.discovery.tables import read_gguf_table, read_safetensors_table
from modelkeeper.formats.errors import FormatError

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class HashProgress:
    files_total: int = 0
    files_done: int = 0
    bytes_total: int = 0
    bytes_done: int = 0
    current: str | None = None
    errors: int = 0


@dataclass
class HashReport:
    hashed: int = 0
    skipped: int = 0
    errors: list[tuple[str, str]] = field(default_factory=list)
    bytes: int = 0
    seconds: float = 0.0
    moved: list[tuple[str, str]] = field(default_factory=list)
    cancelled: bool = False


ProgressCallback = Callable[[HashProgress], None]


def _file_spans(path: str, components: list[tuple[int, str, str, str | None]]) -> dict[str, list[TensorSpan]]:
    """Tensor byte ranges of each component (by key prefix) of a single weights file."""
    fmt = sniff(path)
    if fmt is ModelFormat.SAFETENSORS:
        table = read_safetensors_table(path)
    elif fmt is ModelFormat.GGUF:
        table = read_gguf_table(path)
    else:
        return {}
    offset = table.data_offset or 0
    prefixes = sorted(((prefix, name) for _, name, prefix, _ in components), key=lambda p: -len(p[0]))
    spans: dict[str, list[TensorSpan]] = {name: [] for _, name in prefixes}
    for tname, meta in table.tensors.items():
        for prefix, name in prefixes:
            if tname.startswith(prefix):
                spans[name].append(TensorSpan(offset + meta.begin, offset + meta.end, meta.dtype))
                break
    return spans


def _as_scanned(task: HashTask) -> bool:
    """Whether a file still has the size and mtime the scan recorded (a folder: always)."""
    st = os.stat(task.path)
    return task.kind != "file" or (st.st_size, st.st_mtime_ns) == (task.size, task.mtime_ns)


def hash_task(
    task: HashTask, *, progress: Callable[[int], None] | None = None, cancel: threading.Event | None = None
) -> FileHashes:
    """Hash one pending file or folder (with its components' content ids)."""
    if task.kind == "file":
        return hash_file(
            task.path, spans=_file_spans(task.path, task.components), progress=progress, cancel=cancel
        )
    folder = Path(task.path)
    files: dict[str, list[Path]] = {}
    spans: dict[str, dict[Path, list[TensorSpan]]] = {}
    for _, name, _, subfolder in task.components:
        sub = folder / subfolder if subfolder else folder
        paths, _ = weight_files(sub)
        files[name] = paths
        for p in paths:
            if p.suffix == ".safetensors":
                table = read_safetensors_table(p)
                offset = table.data_offset or 0
                spans.setdefault(name, {})[p] = [
                    TensorSpan(offset + m.begin, offset + m.end, m.dtype) for m in table.tensors.values()
                ]
    return hash_folder(files, spans, folder, progress=progress, cancel=cancel)


class HashJob:
    """A hashing run in a background thread."""

    def __init__(self, hasher: Hasher, progress: ProgressCallback | None) -> None:
        self._cancel = threading.Event()
        self._report: HashReport | None = None
        self._error: BaseException | None = None
        self.progress = HashProgress()
        self._callback = progress
        self._thread = threading.Thread(
            target=self._run, args=(hasher,), name="modelkeeper-hasher", daemon=True
        )
        self._thread.start()

    def _on_progress(self, p: HashProgress) -> None:
        self.progress = p
        if self._callback is not None:
            self._callback(p)

    def _run(self, hasher: Hasher) -> None:
        try:
            self._report = hasher.run(progress=self._on_progress, cancel=self._cancel)
        except BaseException as exc:  # reported by wait()
            self._error = exc

    @property
    def done(self) -> bool:
        return not self._thread.is_alive()

    def cancel(self) -> None:
        self._cancel.set()

    def wait(self, timeout: float | None = None) -> HashReport | None:
        """The report, or None if still running after ``timeout``; re-raises the run's failure."""
        self._thread.join(timeout)
        if self._thread.is_alive():
            return None
        if self._error is not None:
            raise self._error
        return self._report


class Hasher:
    """Hashes what the catalog lists as pending; see the module docstring."""

    def __init__(
        self, catalog: CatalogWriter, *, max_bytes: int | None = None, roots: Sequence[str] = ()
    ) -> None:
        """``max_bytes``: leave larger files pending (a quick pass over small files first);
        ``roots``: hash only what lies under these folders (all the catalog's files when empty)."""
        self.catalog = catalog
        self.max_bytes = max_bytes
        self.roots = [os.path.abspath(r) for r in roots]

    def run(
        self, *, progress: ProgressCallback | None = None, cancel: threading.Event | None = None
    ) -> HashReport:
        t0 = time.perf_counter()
        tasks = [
            t
            for t in self.catalog.pending_hashes(self.roots)
            if self.max_bytes is None or t.size <= self.max_bytes
        ]
        state = HashProgress(files_total=len(tasks), bytes_total=sum(t.size for t in tasks))
        report = HashReport()
        lock = threading.Lock()

        def advance(n: int) -> None:
            nonlocal state
            with lock:
                state = replace(state, bytes_done=state.bytes_done + n)
            if progress is not None:
                progress(state)

        for task in tasks:
            state = replace(state, current=task.path)
            if progress is not None:
                progress(state)
            try:
                if not _as_scanned(task):
                    report.skipped += 1  # changed since the scan: the next scan re-identifies it
                    continue
                hashes = hash_task(task, progress=advance, cancel=cancel)
                if not _as_scanned(task):  # replaced between the check above and the hash's open
                    raise FileChanged(
                        f"{task.path}: changed while it was hashed; it is hashed again after the next scan",
                        path=task.path,
                    )
            except HashingCancelled:
                report.cancelled = True
                break
            except (OSError, FormatError) as exc:
                message = str(exc) if task.path in str(exc) else f"{task.path}: {exc}"
                log.warning("not hashed: %s", message)
                report.errors.append((task.path, message))
                state = replace(state, errors=state.errors + 1)
                continue
            by_name = {name: rid for rid, name, _, _ in task.components}
            ids = {by_name[name]: cid for name, cid in hashes.component_ids.items() if name in by_name}
            self.catalog.record_hashes(task, blake3=hashes.blake3, sha256=hashes.sha256, component_ids=ids)
            report.hashed += 1
            report.bytes += hashes.size
            state = replace(state, files_done=state.files_done + 1)
            if progress is not None:
                progress(state)
        report.moved = self.catalog.reconcile_moves()
        report.seconds = time.perf_counter() - t0
        return report

    def start(self, progress: ProgressCallback | None = None) -> HashJob:
        return HashJob(self, progress)
