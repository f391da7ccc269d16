"""Fetching one file over http(s) into a partial file: resumable, hashed while it arrives, bounded.

- The body goes to ``<part>`` with a small ``<part>.json`` beside it saying what it is a partial
  of (URL without credentials, declared size and checksum, validator); a later fetch of the same
  thing continues it with ``Range: bytes=<size>-`` (and ``If-Range`` for plain URLs). A server
  that answers ``200`` instead of ``206`` restarts it.
- A dropped connection (or a 5xx/429 answer) is retried from where it stopped, ``retries`` times,
  after ``retry_delay_s`` times the number of failures so far.
- Writing and hashing run on a helper thread fed by the receiving thread (hashlib and file writes
  release the GIL), so each byte is read from the socket once and hashing overlaps the transfer.
  A resumed partial's existing bytes are hashed by the same thread first, while the rest arrives.
- Redirects are followed by hand: each target must be http/https, and credentials are dropped when
  the host changes.
- More bytes than declared (by the source, or by ``Content-Length`` against it) stop the fetch.
- A checksum mismatch deletes the partial; a cancel or a failed connection keeps it for resuming.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import queue
import socket
import threading
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from urllib.parse import urljoin, urlsplit

import httpcore
import httpx

from modelkeeper.install.errors import (
    AccessDenied,
    ChecksumMismatch,
    DownloadFailed,
    InstallCancelled,
    InstallError,
    InsufficientDisk,
    RemoteNotFound,
    SizeMismatch,
    UnsafeSource,
    redact_url,
)
from modelkeeper.install.plan import RemoteFile
from modelkeeper.install.sources import check_scheme

__all__ = ["MAX_REDIRECTS", "Fetched", "adopt_local", "fetch", "open_stream", "remove_partial"]

MAX_REDIRECTS = 10
_READ_SIZE = 4 * 1024 * 1024  # prefix hashing and local copies
_BATCH = 1024 * 1024  # bytes handed to the writing thread at once
_CANCEL_POLL_S = 0.05  # how often a transfer looks at its cancel events while it waits on the network
_QUEUE_DEPTH = 8  # batches in flight between the receiving and the writing thread (a short queue
# keeps the hash in step with the transfer, so little is left to hash after the last byte)

# httpcore reads a response 64 KiB per socket read; model files are gigabytes, and at that size the
# per-read Python work costs as much as the hashing (0.84 CPU-s per GB here, 0.45 with 1 MiB reads).
# The class attribute is httpcore's own knob; only larger reads follow, for every httpx user.
_READ_SIZE_NETWORK = 1024 * 1024
if getattr(httpcore.HTTP11Connection, "READ_NUM_BYTES", _READ_SIZE_NETWORK) < _READ_SIZE_NETWORK:
    httpcore.HTTP11Connection.READ_NUM_BYTES = _READ_SIZE_NETWORK

OnBytes = Callable[[int], None]
Cancelled = Callable[[], bool]


@dataclass(frozen=True)
class Fetched:
    """A complete, verified partial: its SHA-256, size and the bytes received for it this time."""

    sha256: str
    size: int
    transferred: int


def _meta_path(part: Path) -> Path:
    return part.with_name(part.name + ".json")


def remove_partial(part: Path) -> None:
    """Delete a partial file and its description (missing ones are fine)."""
    for path in (part, _meta_path(part)):
        with contextlib.suppress(FileNotFoundError):
            path.unlink()


class _WritePipeline:
    """Writes and hashes chunks on a helper thread, in order; errors surface on the next call."""

    def __init__(self, fd: int, *, prefix: int, git_size: int | None) -> None:
        self._fd = fd
        self.sha256 = hashlib.sha256()
        self.sha1 = hashlib.sha1(f"blob {git_size}\0".encode()) if git_size is not None else None
        self._queue: queue.Queue[list[bytes] | int | None] = queue.Queue(_QUEUE_DEPTH)
        self._error: BaseException | None = None
        self._thread = threading.Thread(target=self._run, name="install-writer", daemon=True)
        self._thread.start()
        if prefix:
            self._queue.put(prefix)  # hash the bytes already on disk before the new ones

    def _run(self) -> None:
        while (item := self._queue.get()) is not None:
            if self._error is not None:
                continue  # drain after a failure
            try:
                if isinstance(item, int):
                    self._hash_prefix(item)
                    continue
                self._write(item)
            except BaseException as exc:
                self._error = exc

    def _write(self, chunks: list[bytes]) -> None:
        written = os.writev(self._fd, chunks)
        total = sum(len(c) for c in chunks)
        if written < total:  # a short write: finish it piece by piece
            rest = memoryview(b"".join(chunks))[written:]
            while rest:
                rest = rest[os.write(self._fd, rest) :]
        for chunk in chunks:
            self.sha256.update(chunk)
            if self.sha1 is not None:
                self.sha1.update(chunk)

    def _hash_prefix(self, length: int) -> None:
        done = 0
        while done < length:
            block = os.pread(self._fd, min(_READ_SIZE, length - done), done)
            if not block:
                raise OSError(f"partial file shorter than {length} bytes")
            self.sha256.update(block)
            done += len(block)

    def write(self, chunks: list[bytes]) -> None:
        """Queue ``chunks`` (a batch: one hand-over per MiB or so, not per socket read)."""
        if self._error is not None:
            raise self._error
        self._queue.put(chunks)

    def close(self) -> None:
        """Wait for every chunk to be written; raise the helper's error if it had one."""
        if self._thread.is_alive():
            self._queue.put(None)
            self._thread.join()
        if self._error is not None:
            raise self._error


def open_stream(
    client: httpx.Client, url: str, headers: Mapping[str, str], *, what: str, method: str = "GET"
) -> httpx.Response:
    """``method`` (GET) ``url`` as a stream, following redirects by hand (http/https only; credentials dropped
    when the host changes). Raises :class:`UnsafeSource` for another scheme or too many hops."""
    current = dict(headers)
    for _ in range(MAX_REDIRECTS + 1):
        check_scheme(url, what=what)
        response = client.send(client.build_request(method, url, headers=current), stream=True)
        if not response.is_redirect:
            return response
        location = response.headers.get("Location", "")
        response.close()
        target = urljoin(url, location)
        if urlsplit(target).scheme.lower() not in ("http", "https"):
            raise UnsafeSource(
                f"{what}: redirect from {redact_url(url)} to a {urlsplit(target).scheme or 'schemeless'}: "
                "URL refused (only http and https)",
                url=redact_url(url),
            )
        if urlsplit(target).netloc != urlsplit(url).netloc:
            current = {k: v for k, v in current.items() if k.lower() not in ("authorization", "cookie")}
        url = target
    raise UnsafeSource(
        f"{what}: more than {MAX_REDIRECTS} redirects from {redact_url(url)}", url=redact_url(url)
    )


def raise_for_status(response: httpx.Response, *, what: str) -> None:
    """The install error for a failed response (``what`` names the repo/file/URL)."""
    status = response.status_code
    if status < 400:
        return
    where = redact_url(str(response.request.url))
    if status in (401, 403):
        raise AccessDenied(
            f"{what}: access denied ({status}): gated or private, or the token is missing or lacks access",
            status=status,
            url=where,
        )
    if status == 404:
        raise RemoteNotFound(f"{what}: not found (404) at {where}", status=status, url=where)
    if status >= 500 or status == 429:
        raise DownloadFailed(f"{what}: server error {status} at {where}", status=status, url=where)
    raise InstallError(f"{what}: HTTP {status} at {where}", status=status, url=where)


def _describe(remote: RemoteFile) -> dict[str, Any]:
    return {"url": redact_url(remote.url), "size": remote.size, "sha256": remote.sha256, "etag": remote.etag}


def _resume_offset(part: Path, remote: RemoteFile) -> int:
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


class _CancelWatch:
    """Shuts the socket of the response in flight once the install is cancelled, so that a cancel
    takes effect while a stalled server sends nothing (the receiving thread would otherwise wait
    for the next chunk or the read timeout)."""

    def __init__(self, cancelled: Cancelled) -> None:
        self._cancelled = cancelled
        self._response: httpx.Response | None = None
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="install-cancel-watch", daemon=True)
        self._thread.start()

    def watch(self, response: httpx.Response | None) -> None:
        with self._lock:
            self._response = response

    def _run(self) -> None:
        while not self._stop.wait(_CANCEL_POLL_S):
            if self._cancelled():
                with self._lock:
                    response = self._response
                stream = response.extensions.get("network_stream") if response is not None else None
                sock = stream.get_extra_info("socket") if stream is not None else None
                if sock is not None:
                    with contextlib.suppress(OSError):
                        sock.shutdown(socket.SHUT_RDWR)
                return

    def close(self) -> None:
        self._stop.set()
        self._thread.join()


class _Short(Exception):
    """The body ended before the declared size: handled like a dropped connection."""


def fetch(
    client: httpx.Client,
    remote: RemoteFile,
    part: Path,
    *,
    what: str,
    on_bytes: OnBytes,
    cancelled: Cancelled,
    retries: int = 3,
    retry_delay_s: float = 1.0,
    max_size: int | None = None,
) -> Fetched:
    """Fetch ``remote`` into ``part`` (see the module docstring) and verify it.

    Raises :class:`InstallCancelled` or :class:`DownloadFailed` (partial kept),
    :class:`ChecksumMismatch`/:class:`SizeMismatch` (partial deleted), or the errors of
    :func:`raise_for_status` and :func:`open_stream`. ``max_size`` bounds a file that declares no
    size (:class:`InsufficientDisk` past it).
    """
    part.parent.mkdir(parents=True, exist_ok=True)
    offset = _resume_offset(part, remote)
    if offset:
        on_bytes(offset)  # progress counts what the partial already holds
    _meta_path(part).write_text(json.dumps(_describe(remote)))
    fd = os.open(part, os.O_RDWR | os.O_CREAT, 0o644)
    keep = False
    try:
        if os.fstat(fd).st_size != offset:
            # Only when needed: ext4 flushes a file truncated to 0 on close (its replace-by-truncate
            # heuristic), 0.6 s for 2 GB.
            os.ftruncate(fd, offset)
        os.lseek(fd, offset, os.SEEK_SET)
        git_size = remote.size if remote.git_sha1 is not None and remote.sha256 is None else None
        pipeline = _WritePipeline(fd, prefix=offset, git_size=git_size)
        watch = _CancelWatch(cancelled)
        transferred = 0
        failures = 0
        try:
            while True:
                if cancelled():
                    raise InstallCancelled(f"{what}: cancelled", file=remote.relative)
                try:
                    got, restart = _receive(
                        client, remote, offset, pipeline, what, on_bytes, cancelled, watch, max_size
                    )
                    if restart:  # the server ignored the Range: start over
                        pipeline.close()
                        os.ftruncate(fd, 0)
                        os.lseek(fd, 0, os.SEEK_SET)
                        pipeline = _WritePipeline(fd, prefix=0, git_size=git_size)
                        offset = 0
                        got, _ = _receive(
                            client, remote, 0, pipeline, what, on_bytes, cancelled, watch, max_size
                        )
                    offset += got
                    transferred += got
                    if remote.size is not None and offset < remote.size:
                        raise _Short
                    break
                except (httpx.TransportError, _Short, DownloadFailed) as exc:
                    offset += getattr(exc, "received", 0)
                    transferred += getattr(exc, "received", 0)
                    if cancelled():  # the watch cut the connection
                        raise InstallCancelled(f"{what}: cancelled", file=remote.relative) from None
                    failures += 1
                    if failures > retries:
                        raise DownloadFailed(
                            f"{what}: connection failed {failures} times at byte {offset} of "
                            f"{remote.size if remote.size is not None else '?'} "
                            f"(last: {exc.message if isinstance(exc, DownloadFailed) else type(exc).__name__})",
                            file=remote.relative,
                            url=redact_url(remote.url),
                            done_bytes=offset,
                        ) from None
                    _pause(retry_delay_s * failures, cancelled)
        finally:
            watch.close()
            pipeline.close()
        result = Fetched(pipeline.sha256.hexdigest(), offset, transferred)
        _verify(remote, pipeline, result, what)
        keep = True
        return result
    except (InstallCancelled, DownloadFailed):
        keep = True
        raise
    finally:
        os.close(fd)
        if not keep:
            remove_partial(part)


def _pause(seconds: float, cancelled: Cancelled) -> None:
    """Wait before a retry (longer after each failure), returning early on a cancel."""
    deadline = time.monotonic() + seconds
    while not cancelled() and (left := deadline - time.monotonic()) > 0:
        time.sleep(min(left, _CANCEL_POLL_S))


def _verify(remote: RemoteFile, pipeline: _WritePipeline, result: Fetched, what: str) -> None:
    if remote.size is not None and result.size != remote.size:
        raise SizeMismatch(
            f"{what}: {result.size} bytes received, {remote.size} declared", file=remote.relative
        )
    if remote.sha256 is not None and result.sha256 != remote.sha256.lower():
        raise ChecksumMismatch(
            f"{what}: SHA-256 mismatch: expected {remote.sha256.lower()}, got {result.sha256}; download deleted",
            file=remote.relative,
            expected=remote.sha256.lower(),
            actual=result.sha256,
        )
    if remote.git_sha1 is not None and remote.sha256 is None and pipeline.sha1 is not None:
        actual = pipeline.sha1.hexdigest()
        if actual != remote.git_sha1.lower():
            raise ChecksumMismatch(
                f"{what}: git blob id mismatch: expected {remote.git_sha1.lower()}, got {actual}; download deleted",
                file=remote.relative,
                expected=remote.git_sha1.lower(),
                actual=actual,
            )


class _Dropped(httpx.TransportError):
    """A transport error that remembers how many bytes of the body had arrived."""

    def __init__(self, cause: Exception, received: int) -> None:
        super().__init__(str(cause))
        self.received = received


def _receive(
    client: httpx.Client,
    remote: RemoteFile,
    offset: int,
    pipeline: _WritePipeline,
    what: str,
    on_bytes: OnBytes,
    cancelled: Cancelled,
    watch: _CancelWatch,
    max_size: int | None,
) -> tuple[int, bool]:
    """One request for the bytes from ``offset``: (bytes received, whether to restart from 0)."""
    headers = {**remote.headers.reveal(), "Accept-Encoding": "identity"}
    if offset:
        headers["Range"] = f"bytes={offset}-"
        if remote.sha256 is None and remote.etag:
            headers["If-Range"] = remote.etag
    response = open_stream(client, remote.url, headers, what=what)
    watch.watch(response)
    with contextlib.closing(response):
        if offset and response.status_code == 416 and remote.size == offset:
            return 0, False
        raise_for_status(response, what=what)
        if offset and response.status_code == 200:
            return 0, True
        if offset and not response.headers.get("Content-Range", "").startswith(f"bytes {offset}-"):
            raise DownloadFailed(f"{what}: the server answered a range other than bytes {offset}-")
        length = response.headers.get("Content-Length")
        if (
            remote.size is not None
            and length is not None
            and length.isdigit()
            and offset + int(length) > remote.size
        ):
            raise SizeMismatch(
                f"{what}: the server announces {offset + int(length)} bytes, {remote.size} declared; refused",
                file=remote.relative,
            )
        received = 0
        batch: list[bytes] = []
        batched = 0
        cap = remote.size if remote.size is not None else max_size
        limit = None if cap is None else cap - offset
        try:
            for chunk in response.iter_raw():
                if cancelled():
                    raise InstallCancelled(f"{what}: cancelled", file=remote.relative)
                if limit is not None and received + len(chunk) > limit:
                    if remote.size is None:
                        raise InsufficientDisk(
                            f"{what}: no size declared and more than the {cap:,} bytes the disk can take "
                            "arrived; refused",
                            file=remote.relative,
                        )
                    raise SizeMismatch(
                        f"{what}: the server sent more than the {remote.size} bytes declared; refused",
                        file=remote.relative,
                    )
                batch.append(chunk)
                batched += len(chunk)
                received += len(chunk)
                if batched >= _BATCH or len(batch) >= 256:  # writev takes at most IOV_MAX pieces
                    pipeline.write(batch)
                    on_bytes(batched)
                    batch, batched = [], 0
        except httpx.TransportError as exc:
            raise _Dropped(exc, received) from exc
        finally:
            if batch:  # what arrived is kept (a resume continues after it)
                pipeline.write(batch)
                on_bytes(batched)
    return received, False


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
            out = None if linked else stack.enter_context(open(part, "wb"))
            while block := src.read(_READ_SIZE):
                digest.update(block)
                if out is not None:
                    out.write(block)
                on_bytes(len(block))
    except OSError:
        remove_partial(part)
        return False
    if digest.hexdigest() != expected_sha256.lower():
        remove_partial(part)
        return False
    return True
