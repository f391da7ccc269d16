"""The scanner: walk the roots, identify what is new or changed, keep the catalog in step.

Interface::

    scanner = Scanner(catalog, ["/models"])      # catalog: a CatalogWriter (the registry)
    report = scanner.scan(progress=callback)      # ScanReport: one ScanEntry per file or folder
    for report in scanner.watch(stop_event=ev):   # rescans on every change (watchfiles)
        ...

Incremental: a file whose size, mtime and inode are unchanged (and that the current rules
already identified) is not reopened. A known file found under a new path with the same device
and inode is a move (it keeps its model id and metadata); one that disappeared leaves its model
(marked missing when it was the model's last location); a new file with the content key of a
missing one, or after hashing its BLAKE3 (``Hasher``), takes over its id.
Bad input (unreadable, broken, empty, deleted meanwhile, symlink loops) becomes rejected entries;
the scan always completes. Raises RootNotFound before starting when a root is not a folder.
"""

from __future__ import annotations

import multiprocessing
import os
import threading
import time
from collections.abc import Callable, Iterator
from concurrent.futures import ProcessPoolExecutor, ThreadPoolExecutor
from concurrent.futures.process import BrokenProcessPool
from dataclasses import dataclass, field
from typing import Any

from modelkeeper.discovery.examine import ScanMemo, examine
from modelkeeper.discovery.identify import RULES_VERSION
from modelkeeper.discovery.identity import content_key
from modelkeeper.discovery.ports import CatalogWriter, FileRow
from modelkeeper.discovery.records import Identification
from modelkeeper.discovery.sidecar import Sidecar
from modelkeeper.discovery.walker import Candidate, CandidateKind, Walker, hub_model_name, hub_origin
from modelkeeper.formats.errors import FormatError
from modelkeeper.protocol.errors import ErrorCode

_BATCH = 256

#: A test hook: with this variable set to N, a scan stops for good (until it is killed) once N or
#: more identified rows are committed. A test kills the process at that point, never racing a timer.
HOLD_ENV = "MODELKEEPER_SCAN_HOLD_AFTER"


def _hold_after() -> int | None:
    value = os.environ.get(HOLD_ENV, "").strip()
    return int(value) if value.isdigit() else None


@dataclass
class ScanEntry:
    """One model file or folder as the scan saw it."""

    path: str  # relative to its root
    abs_path: str
    root: str
    status: str  # ok / rejected
    change: str  # added / updated / unchanged / moved / rejected
    format: str | None = None
    type: str | None = None
    base: str | None = None
    variant: str | None = None
    encoder: str | None = None
    quant: str | None = None  # the stored form of packed weights: Q4_K, float8_e4m3fn, ...
    components: list[str] = field(default_factory=list)
    rule: str | None = None
    confidence: float | None = None
    model_id: str | None = None
    error_code: str | None = None
    error: str | None = None

    def to_json(self) -> dict[str, Any]:
        out: dict[str, Any] = {
            "path": self.path,
            "status": self.status,
            "format": self.format,
            "type": self.type,
            "base": self.base,
            "variant": self.variant,
            "encoder": self.encoder,
            "components": self.components,
            "rule": self.rule,
            "confidence": self.confidence,
            "model_id": self.model_id,
            "change": self.change,
        }
        if self.quant is not None:
            out["quant"] = self.quant
        if self.status == "rejected":
            out["error_code"] = self.error_code
            out["error"] = self.error
        return out


@dataclass
class ScanReport:
    roots: list[str]
    entries: list[ScanEntry] = field(default_factory=list)
    missing: list[str] = field(default_factory=list)
    seconds: float = 0.0

    def count(self, change: str) -> int:
        return sum(1 for e in self.entries if e.change == change)

    @property
    def files_per_second(self) -> float:
        return len(self.entries) / self.seconds if self.seconds > 0 else 0.0

    def summary(self) -> dict[str, int]:
        keys = ("added", "updated", "unchanged", "moved", "rejected")
        return {**{k: self.count(k) for k in keys}, "missing": len(self.missing), "total": len(self.entries)}


@dataclass(frozen=True)
class ScanProgress:
    phase: str  # walk / identify / done
    found: int
    done: int
    total: int
    current: str | None = None


ProgressCallback = Callable[[ScanProgress], None]


def _fp(c: Candidate) -> tuple[int, int, int, int] | None:
    f = c.fingerprint
    return (f.size, f.mtime_ns, f.inode, f.device) if f is not None else None


def _unchanged(c: Candidate, row: FileRow) -> bool:
    f = c.fingerprint
    return (
        f is not None
        and row.status in ("ok", "rejected")
        and row.rules_version == RULES_VERSION
        and (row.size, row.mtime_ns, row.inode) == (f.size, f.mtime_ns, f.inode)
    )


def _default_name(c: Candidate) -> str:
    if (hub_name := hub_model_name(c)) is not None:
        return hub_name
    name = os.path.basename(c.path.rstrip(os.sep))
    return name if c.kind is not CandidateKind.FILE else os.path.splitext(name)[0]


#: From this many candidates to identify, a scan uses processes rather than threads.
PROCESS_THRESHOLD = 256


@dataclass(frozen=True)
class _Failure:
    """A rejection as it crosses a process boundary (exceptions lose their details when pickled)."""

    code: str
    message: str


Result = tuple[Identification, Sidecar] | BaseException | _Failure


_PROCESS_MEMO: ScanMemo | None = None


def examine_safely(candidate: Candidate, pickle_timeout: float) -> tuple[Identification, Sidecar] | _Failure:
    """``examine`` for a worker process: every failure of one file becomes that file's rejection.
    The process keeps one memo for its life (the pool lives for one scan)."""
    global _PROCESS_MEMO
    if _PROCESS_MEMO is None:
        _PROCESS_MEMO = ScanMemo()
    try:
        return examine(candidate, pickle_timeout=pickle_timeout, memo=_PROCESS_MEMO)
    except FormatError as exc:
        return _Failure(exc.code.value, exc.message)
    except Exception as exc:
        return _Failure(ErrorCode.INTERNAL.value, f"{type(exc).__name__}: {exc}")


def _examine_here(
    candidate: Candidate, pickle_timeout: float, memo: ScanMemo | None = None
) -> tuple[Identification, Sidecar] | BaseException:
    try:
        return examine(candidate, pickle_timeout=pickle_timeout, memo=memo)
    except Exception as exc:  # every failure of one file is that file's rejection
        return exc


class Scanner:
    def __init__(
        self,
        catalog: CatalogWriter,
        roots: list[str] | list[os.PathLike[str]],
        *,
        follow_symlinks: bool = True,
        allow_outside_roots: bool = False,
        pickle_timeout: float = 60.0,
        workers: int = 1,
        processes: int | None = None,
        memo: bool = True,
    ) -> None:
        """``workers``: threads reading and identifying headers. One is fastest on local disks (the
        parsing holds the interpreter; a second thread only adds contention: 1,450 against 1,100
        files/s warm, 1,130-1,270 against 1,010-1,090 cold on this project's 2-core machine); more
        help where each read waits on the network (NFS, SMB)."""
        self.catalog = catalog
        self.roots = [os.path.abspath(os.fspath(r)) for r in roots]
        self.follow_symlinks = follow_symlinks
        self.allow_outside_roots = allow_outside_roots
        self.pickle_timeout = pickle_timeout
        self.workers = max(1, workers)
        # Remember validated tensor sections and identifications across the files of one scan.
        self.memo = memo
        self.last_memo: ScanMemo | None = None
        cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
        # Worker processes pay off from 4 cores: below that the registry writes and the workers
        # share too few cores (measured on 2 vCPUs: slower than one process).
        self.processes = (cores - 1 if cores >= 4 else 0) if processes is None else processes
        self._written = 0
        self._hold = _hold_after()

    def scan(self, progress: ProgressCallback | None = None) -> ScanReport:
        t0 = time.perf_counter()
        now = time.time()
        walker = Walker(
            self.roots, follow_symlinks=self.follow_symlinks, allow_outside_roots=self.allow_outside_roots
        )
        known = self.catalog.file_rows(self.roots)
        candidates: list[Candidate] = []
        for c in walker:
            candidates.append(c)
            if progress is not None and len(candidates) % 500 == 0:
                progress(ScanProgress("walk", len(candidates), 0, 0, c.rel))
        seen = {c.path for c in candidates}
        gone = {p: r for p, r in known.items() if p not in seen and r.status != "missing"}
        by_inode = {(r.device, r.inode, r.size, r.mtime_ns): r for r in gone.values() if r.inode is not None}

        report = ScanReport(self.roots)
        entries: dict[str, ScanEntry] = {}
        unchanged: list[tuple[Candidate, FileRow]] = []
        todo: list[tuple[Candidate, FileRow | None]] = []
        for c in candidates:
            row = known.get(c.path)
            if c.error is None and row is not None and _unchanged(c, row):
                unchanged.append((c, row))
                continue
            f = c.fingerprint
            moved = by_inode.pop((f.device, f.inode, f.size, f.mtime_ns), None) if f and row is None else None
            if moved is not None:
                fp = _fp(c)
                assert fp is not None
                self.catalog.move_file(moved, path=c.path, root=c.root, rel=c.rel, fingerprint=fp, now=now)
                gone.pop(moved.path, None)
                row = moved._replace(path=c.path)
                if moved.rules_version == RULES_VERSION and moved.status == "ok":
                    unchanged.append((c, row))
                    entries[c.path] = ScanEntry(c.rel, c.path, c.root, "ok", "moved")
                    continue
            todo.append((c, row))

        rerooted = [(row.id, c.root, c.rel) for c, row in unchanged if row.root != c.root]
        if rerooted:
            self.catalog.set_roots(rerooted)
        stored = self.catalog.scan_summaries([row.id for _, row in unchanged])
        for c, row in unchanged:
            entry = entries.get(c.path) or ScanEntry(c.rel, c.path, c.root, row.status, "unchanged")
            _fill_from_store(entry, stored.get(row.id, {}))
            entries[c.path] = entry

        # What went is written before what changed is identified: a changed file then sees which
        # other locations of its model are still there (a copy deleted in the same scan is not).
        if gone:
            self.catalog.mark_missing(list(gone.values()), now)
        self._identify(todo, entries, now, progress)
        report.missing = sorted(gone)
        report.entries = [entries[c.path] for c in candidates if c.path in entries]
        report.seconds = time.perf_counter() - t0
        if progress is not None:
            progress(ScanProgress("done", len(candidates), len(todo), len(todo)))
        return report

    def _identify(
        self,
        todo: list[tuple[Candidate, FileRow | None]],
        entries: dict[str, ScanEntry],
        now: float,
        progress: ProgressCallback | None,
    ) -> None:
        batch: list[tuple[Candidate, FileRow | None, Result]] = []
        done = 0

        def take(result: Result) -> None:
            nonlocal done, batch
            c, row = todo[done]
            batch.append((c, row, result))
            done += 1
            if len(batch) >= _BATCH:
                self._write(batch, entries, now)
                batch = []
            if progress is not None and (done % 50 == 0 or done == len(todo)):
                progress(ScanProgress("identify", len(todo), done, len(todo), c.rel))

        candidates = [c for c, _ in todo]
        timeouts = [self.pickle_timeout] * len(todo)
        memo = ScanMemo() if self.memo else None
        memos = [memo] * len(todo)
        try:
            with self._executor(len(todo)) as pool:
                if isinstance(pool, ProcessPoolExecutor):
                    results: Iterator[Result] = pool.map(examine_safely, candidates, timeouts, chunksize=32)
                elif self.workers > 1 and len(todo) > 1:
                    results = pool.map(_examine_here, candidates, timeouts, memos)
                else:
                    results = map(_examine_here, candidates, timeouts, memos)
                for result in results:
                    take(result)
        except BrokenProcessPool:
            # A worker process died (killed, out of memory): finish here, one file at a time.
            for c in candidates[done:]:
                take(_examine_here(c, self.pickle_timeout, memo))
        self.last_memo = memo
        self._write(batch, entries, now)

    def _executor(self, count: int) -> ThreadPoolExecutor | ProcessPoolExecutor:
        """Processes for big scans (headers are parsed in Python: threads would share one core),
        threads for small ones. The processes come from a fork server, so, as with any
        multiprocessing, a script that scans must guard its top level with ``if __name__ == "__main__"``."""
        if self.processes > 1 and count >= PROCESS_THRESHOLD:
            context = multiprocessing.get_context("forkserver")
            context.set_forkserver_preload(["modelkeeper.discovery.examine"])
            return ProcessPoolExecutor(self.processes, mp_context=context)
        return ThreadPoolExecutor(self.workers)

    def _write(
        self,
        batch: list[tuple[Candidate, FileRow | None, Result]],
        entries: dict[str, ScanEntry],
        now: float,
    ) -> None:
        with self.catalog.transaction():
            for c, row, result in batch:
                if isinstance(result, _Failure):
                    failure = FormatError(result.message, code=ErrorCode(result.code))
                    entries[c.path] = self._record_error(c, row, failure, now)
                elif isinstance(result, BaseException):
                    entries[c.path] = self._record_error(c, row, result, now)
                else:
                    prior = entries.get(c.path)
                    entries[c.path] = self._record_ok(c, row, *result, now, moved=prior is not None)
        self._written += len(batch)
        if self._hold is not None and self._written >= self._hold:
            threading.Event().wait()  # HOLD_ENV: committed; wait here to be killed

    def _record_error(self, c: Candidate, row: FileRow | None, exc: BaseException, now: float) -> ScanEntry:
        if isinstance(exc, FormatError):
            code, message = exc.code, exc.message
        else:
            code, message = ErrorCode.INTERNAL, f"{type(exc).__name__}: {exc}"
        entry = ScanEntry(
            c.rel,
            c.path,
            c.root,
            "rejected",
            "rejected",
            format=c.format.value,
            error_code=code.value,
            error=message,
        )
        if row is not None and (row.status, row.error_code, row.error) == ("rejected", code.value, message):
            entry.change = "unchanged"  # a link problem found again
            return entry
        self.catalog.record_rejected(
            path=c.path,
            root=c.root,
            rel=c.rel,
            kind=c.kind.value,
            fmt=c.format.value,
            fingerprint=_fp(c),
            error_code=code.value,
            error=message,
            existing=row,
            rules_version=RULES_VERSION,
            now=now,
        )
        return entry

    def _record_ok(
        self,
        c: Candidate,
        row: FileRow | None,
        ident: Identification,
        sidecar: Sidecar,
        now: float,
        *,
        moved: bool,
    ) -> ScanEntry:
        fp = _fp(c)
        assert fp is not None
        # What the file says is in the identification; "found" keeps what its sidecars say.
        found: dict[str, Any] = {} if sidecar.empty else {"sidecar": sidecar.model_dump(exclude={"user"})}
        if (origin := hub_origin(c.rel)) is not None:
            found["hub"] = {"repo": origin.repo_id, "revision": origin.revision}
        model_id, created = self.catalog.record_model(
            path=c.path,
            root=c.root,
            rel=c.rel,
            kind=c.kind.value,
            fingerprint=fp,
            identification=ident,
            rules_version=RULES_VERSION,
            existing=row,
            default_name=_default_name(c),
            user_defaults=sidecar.user,
            found=found,
            now=now,
            content_key=content_key(c.path) if c.kind is CandidateKind.FILE else None,
        )
        return ScanEntry(
            c.rel,
            c.path,
            c.root,
            "ok",
            "moved" if moved else ("added" if created or row is None else "updated"),
            format=ident.format.value,
            type=ident.type.value,
            base=ident.base.value,
            variant=ident.variant,
            encoder=ident.encoder.value if ident.encoder else None,
            quant=ident.quant,
            components=[comp.kind.value for comp in ident.components],
            rule=ident.rule,
            confidence=ident.confidence,
            model_id=model_id,
        )

    def watch(
        self,
        *,
        stop_event: threading.Event | None = None,
        debounce_ms: int = 1600,
        progress: ProgressCallback | None = None,
    ) -> Iterator[ScanReport]:
        """Scan now, then again after every batch of changes under the roots, until ``stop_event``.

        The roots are watched before the first scan: a change made while it runs, or just after it
        is reported, gives one more scan (watching only after it, such a change was missed)."""
        from watchfiles import watch as watch_changes

        changes = watch_changes(
            *self.roots,
            stop_event=stop_event,
            debounce=debounce_ms,
            recursive=True,
            rust_timeout=100,
            yield_on_timeout=True,  # an empty batch every 100 ms: the first one says it is watching
        )
        if next(changes, None) is None:  # stopped already
            return
        yield self.scan(progress)
        for batch in changes:
            if batch:
                yield self.scan(progress)


def _fill_from_store(entry: ScanEntry, row: dict[str, Any]) -> None:
    if not row:
        return
    entry.status = row["status"] if row["status"] in ("ok", "rejected") else "ok"
    if entry.status == "rejected":
        entry.format = row["file_format"]
        entry.error_code = row["error_code"]
        entry.error = row["error"]
        return
    entry.format = row["format"]
    entry.type = row["type"]
    entry.base = row["base"]
    entry.variant = row["variant"]
    entry.encoder = row["encoder"]
    entry.quant = row.get("quant")
    entry.rule = row["rule"]
    entry.confidence = row["confidence"]
    entry.model_id = row["model_id"]
    entry.components = row["kinds"].split(",") if row["kinds"] else []
