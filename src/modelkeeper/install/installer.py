"""The default install service: resolve, check, fetch into a staging folder, verify, move in place.

Steps of :meth:`Installer.install`:

1. Parse the source and plan it with its resolver (:mod:`hub`, :mod:`civitai`, :mod:`urls`).
2. If the destination already holds the declared content, return it (nothing fetched); other
   content there is :class:`DestinationExists`.
3. Files whose SHA-256 is already on disk (``known_files``, the Hub cache) are linked or copied.
4. The declared bytes still to fetch (less what partial downloads already hold) must fit the free
   disk, less a reserve.
5. Each file is fetched to ``<root>/.modelkeeper-partial/<install key>/files/<name>.part``,
   verified, then renamed to its name in that staging folder.
6. The staged file (or the whole staged folder) is renamed to its destination, one ``rename`` on
   the same file system: the model appears complete or not at all.

The staging folder lives in the model root so that the final rename never crosses file systems;
discovery skips it. A cancelled or interrupted install keeps its partial files there and the next
install of the same source resumes them; every other failure deletes them.

Two installs of the same source into the same root at once are coalesced: the second waits for the
first and gets its result (its progress callback is fed too). The shared transfer stops only when
every caller waiting on it has cancelled.
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import shutil
import threading
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field, replace
from pathlib import Path

import httpx

from modelkeeper.formats.conventions import INSTALL_STAGING_DIR
from modelkeeper.install.base import ModelInstaller, ProgressCallback
from modelkeeper.install.civitai import CivitaiResolver
from modelkeeper.install.errors import (
    DestinationExists,
    DownloadFailed,
    InstallCancelled,
    InstallError,
    InsufficientDisk,
)
from modelkeeper.install.hub import HubResolver
from modelkeeper.install.partials import adopt_local
from modelkeeper.install.plan import (
    InstalledFile,
    InstallPlan,
    InstallProgress,
    InstallResult,
    RemoteFile,
)
from modelkeeper.install.sources import CivitaiSource, HubSource, Source, parse_source
from modelkeeper.install.transfer import fetch
from modelkeeper.install.urls import UrlResolver
from modelkeeper.protocol.errors import ErrorCode

__all__ = ["PARTIAL_DIR", "Installer", "KnownFiles"]

#: Folder under a model root holding staged and partial downloads (skipped by discovery).
PARTIAL_DIR = INSTALL_STAGING_DIR
_PROGRESS_STEP = 8 * 1024 * 1024  # report a file's progress every 1% of it, within these bounds
_PROGRESS_MIN_STEP = 1024 * 1024

#: SHA-256 (lowercase hex) -> a local file with that content, or None (the registry knows).
KnownFiles = Callable[[str], Path | None]


def _free_bytes(path: Path) -> int:
    return shutil.disk_usage(path).free


@dataclass
class _Flight:
    """One install in progress, shared by the callers that asked for it at once."""

    listeners: list[ProgressCallback] = field(default_factory=list)
    cancels: list[threading.Event | None] = field(default_factory=list)
    done: threading.Event = field(default_factory=threading.Event)
    result: InstallResult | None = None
    error: BaseException | None = None
    lock: threading.Lock = field(default_factory=threading.Lock)

    def cancelled(self) -> bool:
        with self.lock:
            return all(c is not None and c.is_set() for c in self.cancels)

    def report(self, event: InstallProgress) -> None:
        with self.lock:
            listeners = list(self.listeners)
        for listener in listeners:
            listener(event)


class _Progress:
    """Counts the bytes of an install and reports them, at most every few MiB per file."""

    def __init__(self, report: ProgressCallback, total: int) -> None:
        self._report = report
        self.total = total
        self.done = 0
        self._file: str | None = None
        self._file_done = 0
        self._file_total: int | None = None
        self._last = 0

    def phase(self, phase: str) -> None:
        self._report(
            InstallProgress(phase, self.done, self.total, self._file, self._file_done, self._file_total)
        )

    def start_file(self, remote: RemoteFile) -> None:
        self._file, self._file_done, self._file_total, self._last = remote.relative, 0, remote.size, 0
        self.phase("download")

    def add(self, n: int) -> None:
        self.done += n
        self._file_done += n
        step = (
            min(_PROGRESS_STEP, max(1, (self._file_total or 0) // 100))
            if self._file_total
            else _PROGRESS_STEP
        )
        if self._file_done - self._last >= step or self._file_done == self._file_total:
            self._last = self._file_done
            self.phase("download")


class Installer(ModelInstaller):
    """Installs from the Hub, CivitAI and plain URLs (see the module docstring).

    ``hub_endpoint``/``hub_token``/``hub_cache_dir``: see :class:`HubResolver` (defaults:
    ``HF_ENDPOINT``, ``HF_TOKEN`` or the saved login, ``HF_HUB_CACHE``). ``civitai_endpoint``/
    ``civitai_token``: see :class:`CivitaiResolver` (``CIVITAI_ENDPOINT``, ``CIVITAI_TOKEN``).
    ``folders`` overrides folders by type (:data:`~modelkeeper.install.plan.DEFAULT_FOLDERS`).
    ``known_files`` finds local files by SHA-256 (content already present is not fetched).
    ``retries``: reconnections per file after a dropped connection, ``retry_delay_s`` apart (growing).
    ``reserve_bytes``: free
    disk left untouched. ``free_bytes``: how free space is measured (a test seam).
    """

    def __init__(
        self,
        *,
        hub_endpoint: str | None = None,
        hub_token: str | bool | None = None,
        hub_cache_dir: Path | None = None,
        civitai_endpoint: str | None = None,
        civitai_token: str | bool | None = None,
        folders: Mapping[str, str] | None = None,
        known_files: KnownFiles | None = None,
        retries: int = 3,
        retry_delay_s: float = 1.0,
        timeout_s: float = 30.0,
        reserve_bytes: int = 64 * 1024 * 1024,
        free_bytes: Callable[[Path], int] = _free_bytes,
    ) -> None:
        self._client = httpx.Client(timeout=httpx.Timeout(timeout_s), follow_redirects=False)
        self.hub = HubResolver(
            endpoint=hub_endpoint, token=hub_token, cache_dir=hub_cache_dir, timeout_s=timeout_s
        )
        self.civitai = CivitaiResolver(self._client, endpoint=civitai_endpoint, token=civitai_token)
        self.urls = UrlResolver(self._client)
        self.folders = dict(folders or {})
        self.known_files = known_files
        self.retries = retries
        self.retry_delay_s = retry_delay_s
        self.reserve_bytes = reserve_bytes
        self._free_bytes = free_bytes
        self._flights: dict[tuple[str, ...], _Flight] = {}
        self._lock = threading.Lock()

    def close(self) -> None:
        self._client.close()

    def __enter__(self) -> Installer:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def in_flight(self) -> dict[str, int]:
        """The installs running now: canonical source -> how many callers wait on it."""
        with self._lock:
            flights = list(self._flights.items())
        return {key[0]: len(flight.cancels) for key, flight in flights}

    def discard_partials(self, root: Path) -> int:
        """Delete the partial downloads kept under ``root`` for resuming; returns the bytes freed.

        Raises :class:`InstallError` (BUSY) while an install into ``root`` runs in this installer.
        """
        real = os.path.realpath(root)
        with self._lock:
            if any(key[1] == real for key in self._flights):
                raise InstallError(
                    f"{root}: an install into it is running; try again when it ends", ErrorCode.BUSY
                )
        staging = Path(root) / PARTIAL_DIR
        if not staging.is_dir():
            return 0
        freed = sum(f.stat().st_size for f in staging.rglob("*") if f.is_file())
        shutil.rmtree(staging, ignore_errors=True)
        return freed

    # -- interface

    def parse(self, source: str) -> Source:
        """``source`` parsed, with this installer's Hub and CivitAI hosts recognised in URLs."""
        return parse_source(source, hub_hosts={self.hub.host}, civitai_hosts={self.civitai.host})

    def resolve(
        self,
        source: str,
        *,
        model_type: str | None = None,
        name: str | None = None,
        sha256: str | None = None,
    ) -> InstallPlan:
        parsed = self.parse(source)
        if isinstance(parsed, HubSource):
            return self.hub.plan(parsed, model_type=model_type, name=name)
        if isinstance(parsed, CivitaiSource):
            return self.civitai.plan(parsed, model_type=model_type, name=name)
        return self.urls.plan(parsed, model_type=model_type, name=name, sha256=sha256)

    def install(
        self,
        source: str,
        root: Path,
        *,
        model_type: str | None = None,
        name: str | None = None,
        sha256: str | None = None,
        progress: ProgressCallback | None = None,
        cancel: threading.Event | None = None,
    ) -> InstallResult:
        parsed = self.parse(source)
        key = (parsed.canonical(), os.path.realpath(root), model_type or "", name or "", sha256 or "")
        with self._lock:
            flight = self._flights.get(key)
            owner = flight is None
            if flight is None:
                flight = self._flights[key] = _Flight()
        with flight.lock:
            flight.cancels.append(cancel)
            if progress is not None:
                flight.listeners.append(progress)
        if not owner:
            return self._join(flight, cancel, parsed)
        try:
            flight.result = self._install(source, Path(root), model_type, name, sha256, flight)
            return flight.result
        except BaseException as exc:
            flight.error = exc
            raise
        finally:
            with self._lock:
                del self._flights[key]
            flight.done.set()

    # -- steps

    @staticmethod
    def _join(flight: _Flight, cancel: threading.Event | None, parsed: Source) -> InstallResult:
        while not flight.done.wait(0.05):
            if cancel is not None and cancel.is_set():
                raise InstallCancelled(
                    f"{parsed.canonical()}: cancelled (the shared install goes on for others)"
                )
        if flight.error is not None:
            raise flight.error
        assert flight.result is not None
        return flight.result

    def _install(
        self,
        source: str,
        root: Path,
        model_type: str | None,
        name: str | None,
        sha256: str | None,
        flight: _Flight,
    ) -> InstallResult:
        started = time.monotonic()
        flight.report(InstallProgress("resolve", 0, 0))
        plan = self.resolve(source, model_type=model_type, name=name, sha256=sha256)
        root.mkdir(parents=True, exist_ok=True)
        dest = plan.destination(root, self.folders)
        tracker = _Progress(flight.report, plan.declared_bytes)
        present = self._already_installed(plan, dest, tracker)
        if present is not None:
            tracker.phase("done")
            return self._result(plan, dest, present, started)
        staging = root / PARTIAL_DIR / _install_key(plan, dest, root)
        files_dir = staging / "files"
        keep_partials = False
        try:
            self._check_space(plan, root, files_dir)
            installed = [self._one(plan, remote, files_dir, source, flight, tracker) for remote in plan.files]
            tracker.phase("finalize")
            installed = self._move_in_place(plan, files_dir, dest, installed)
            tracker.phase("done")
            return self._result(plan, dest, installed, started)
        except (InstallCancelled, DownloadFailed):
            keep_partials = True
            raise
        finally:
            if not keep_partials:
                shutil.rmtree(staging, ignore_errors=True)
            with contextlib.suppress(OSError):
                (root / PARTIAL_DIR).rmdir()  # only when empty

    def _one(
        self,
        plan: InstallPlan,
        remote: RemoteFile,
        files_dir: Path,
        source: str,
        flight: _Flight,
        tracker: _Progress,
    ) -> InstalledFile:
        final = files_dir / remote.relative
        part = final.with_name(final.name + ".part")
        what = f"{plan.source}: {remote.relative}" if plan.is_folder else plan.source
        tracker.start_file(remote)
        if final.is_file():  # verified by an earlier, interrupted install
            size = final.stat().st_size
            tracker.add(size)
            return InstalledFile(final, remote.relative, size, _sha256_of(final), 0, True)
        local = self._local_copy(plan, remote)
        if (
            local is not None
            and remote.sha256
            and adopt_local(local, part, expected_sha256=remote.sha256, on_bytes=tracker.add)
        ):
            os.replace(part, final)
            return InstalledFile(final, remote.relative, final.stat().st_size, remote.sha256, 0, True)
        part.parent.mkdir(parents=True, exist_ok=True)
        fetched = fetch(
            self._client,
            remote,
            part,
            what=what,
            on_bytes=tracker.add,
            cancelled=flight.cancelled,
            retries=self.retries,
            retry_delay_s=self.retry_delay_s,
            max_size=None if remote.size is not None else self._free_bytes(part.parent) - self.reserve_bytes,
        )
        part.with_name(part.name + ".json").unlink(missing_ok=True)
        os.replace(part, final)
        return InstalledFile(final, remote.relative, fetched.size, fetched.sha256, fetched.transferred, False)

    def _local_copy(self, plan: InstallPlan, remote: RemoteFile) -> Path | None:
        if remote.sha256 is None:
            return None
        if self.known_files is not None and (known := self.known_files(remote.sha256)) is not None:
            return known
        if plan.repo_id is not None:
            return self.hub.cached_blob(plan.repo_id, remote.sha256)
        return None

    def _check_space(self, plan: InstallPlan, root: Path, files_dir: Path) -> None:
        needed = 0
        for remote in plan.files:
            final = files_dir / remote.relative
            if final.is_file():
                continue
            part = final.with_name(final.name + ".part")
            have = part.stat().st_size if part.is_file() else 0
            needed += max(0, (remote.size or 0) - have)
        free = self._free_bytes(root)
        if needed + self.reserve_bytes > free:
            raise InsufficientDisk(
                f"{plan.source}: needs {needed:,} bytes (+{self.reserve_bytes:,} reserve) in {root}, "
                f"{free:,} free; nothing was written",
                needed=needed,
                free=free,
            )

    def _already_installed(
        self, plan: InstallPlan, dest: Path, tracker: _Progress
    ) -> list[InstalledFile] | None:
        """The files at ``dest`` when they are exactly the declared ones; None when ``dest`` is free."""
        if not dest.exists() and not dest.is_symlink():
            return None
        found: list[InstalledFile] = []
        for remote in plan.files:
            path = dest / remote.relative if plan.is_folder else dest
            if not path.is_file() or (remote.size is not None and path.stat().st_size != remote.size):
                raise DestinationExists(
                    f"{plan.source}: {dest} already exists with other content; remove it or pick another name",
                    path=str(dest),
                )
            tracker.start_file(remote)
            sha256, sha1 = _digests(path, tracker.add)
            declared_ok = (remote.sha256 is not None and sha256 == remote.sha256) or (
                remote.sha256 is None and remote.git_sha1 is not None and sha1 == remote.git_sha1
            )
            if not declared_ok:
                raise DestinationExists(
                    f"{plan.source}: {path} already exists and its content is not the declared one "
                    "(or none is declared); remove it or pick another name",
                    path=str(path),
                )
            found.append(InstalledFile(path, remote.relative, path.stat().st_size, sha256, 0, True))
        return found

    def _move_in_place(
        self, plan: InstallPlan, files_dir: Path, dest: Path, installed: list[InstalledFile]
    ) -> list[InstalledFile]:
        dest.parent.mkdir(parents=True, exist_ok=True)
        source = files_dir if plan.is_folder else files_dir / plan.files[0].relative
        if dest.exists() or dest.is_symlink():
            raise DestinationExists(f"{plan.source}: {dest} appeared during the install", path=str(dest))
        os.rename(source, dest)
        return [replace(f, path=dest / f.relative if plan.is_folder else dest) for f in installed]

    @staticmethod
    def _result(plan: InstallPlan, dest: Path, files: list[InstalledFile], started: float) -> InstallResult:
        return InstallResult(
            source=plan.source,
            kind=plan.kind,
            revision=plan.revision,
            model_type=plan.model_type,
            path=dest,
            files=tuple(files),
            elapsed_s=time.monotonic() - started,
        )


def _install_key(plan: InstallPlan, dest: Path, root: Path) -> str:
    text = "\n".join((plan.source, plan.revision or "", str(dest.relative_to(root))))
    return hashlib.sha256(text.encode()).hexdigest()[:20]


def _digests(path: Path, on_bytes: Callable[[int], None]) -> tuple[str, str]:
    """SHA-256 and git blob id of a file, read once."""
    size = path.stat().st_size
    sha256, sha1 = hashlib.sha256(), hashlib.sha1(f"blob {size}\0".encode())
    with open(path, "rb") as f:
        while block := f.read(4 * 1024 * 1024):
            sha256.update(block)
            sha1.update(block)
            on_bytes(len(block))
    return sha256.hexdigest(), sha1.hexdigest()


def _sha256_of(path: Path) -> str:
    return _digests(path, lambda _n: None)[0]
