"""Fetching one file over http(s) into a partial file: resumable, hashed while it arrives, bounded.

- The body goes to ``<part>``, described beside it (``partials``); a later fetch of the same
  thing continues it with ``Range: bytes=<size>-`` (and ``If-Range`` for plain URLs). A server
  that answers ``200`` instead of ``206`` restarts it.
- A dropped connection (or a 5xx/429 answer) is retried from where it stopped, ``retries`` times,
  after ``retry_delay_s`` times the number of failures so far.
- The body is received into a few large reusable buffers: straight from the connection's socket
  (``recv_into``, one copy, by the kernel) once the response headers are parsed, for an HTTP/1
  body of known length that httpx would pass through unchanged; through ``iter_raw`` otherwise
  (``body``). The receiving thread writes each full buffer to the partial file and hands it to a
  hashing thread (``buffers``), which returns it for reuse: each byte is read from the socket
  once, hashing overlaps the transfer, and the bounded set of buffers keeps the hash in step with
  it. A resumed partial's existing bytes are hashed by the same thread first, while the rest arrives.
- Redirects are followed by hand (``streams``): each target must be http/https, and credentials
  are dropped when the host changes.
- More bytes than declared (by the source, or by ``Content-Length`` against it) stop the fetch.
- A checksum mismatch deletes the partial; a cancel or a failed connection keeps it for resuming.
  A cancel shuts the connection in flight, so that it takes effect while a stalled server sends
  nothing.
"""

from __future__ import annotations

import contextlib
import os
import socket
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import httpx

from modelkeeper.install.body import Body
from modelkeeper.install.buffers import Hasher, OnBytes, Writer
from modelkeeper.install.errors import (
    ChecksumMismatch,
    DownloadFailed,
    InstallCancelled,
    InsufficientDisk,
    SizeMismatch,
    redact_url,
)
from modelkeeper.install.partials import remove_partial, resume_offset, write_description
from modelkeeper.install.plan import RemoteFile
from modelkeeper.install.streams import open_stream, raise_for_status

__all__ = ["Fetched", "fetch"]

_CANCEL_POLL_S = 0.05  # how often a transfer looks at its cancel events while it waits on the network

Cancelled = Callable[[], bool]


@dataclass(frozen=True)
class Fetched:
    """A complete, verified partial: its SHA-256, size and the bytes received for it this time."""

    sha256: str
    size: int
    transferred: int


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
    offset = resume_offset(part, remote)
    if offset:
        on_bytes(offset)  # progress counts what the partial already holds
    write_description(part, remote)
    fd = os.open(part, os.O_RDWR | os.O_CREAT, 0o644)
    keep = False
    try:
        if os.fstat(fd).st_size != offset:
            # Only when needed: ext4 flushes a file truncated to 0 on close (its replace-by-truncate
            # heuristic), 0.6 s for 2 GB.
            os.ftruncate(fd, offset)
        os.lseek(fd, offset, os.SEEK_SET)
        git_size = remote.size if remote.git_sha1 is not None and remote.sha256 is None else None
        hasher = Hasher(fd, prefix=offset, git_size=git_size, size=remote.size)
        watch = _CancelWatch(cancelled)
        transferred = 0
        failures = 0
        try:
            while True:
                if cancelled():
                    raise InstallCancelled(f"{what}: cancelled", file=remote.relative)
                try:
                    got, restart = _receive(
                        client,
                        remote,
                        offset,
                        Writer(fd, hasher, on_bytes),
                        what,
                        cancelled,
                        watch,
                        max_size,
                    )
                    if restart:  # the server ignored the Range: start over
                        hasher.close()
                        os.ftruncate(fd, 0)
                        os.lseek(fd, 0, os.SEEK_SET)
                        hasher = Hasher(fd, prefix=0, git_size=git_size, size=remote.size)
                        offset = 0
                        got, _ = _receive(
                            client, remote, 0, Writer(fd, hasher, on_bytes), what, cancelled, watch, max_size
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
            hasher.close()
        result = Fetched(hasher.sha256.hexdigest(), offset, transferred)
        _verify(remote, hasher, result, what)
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


def _verify(remote: RemoteFile, hasher: Hasher, result: Fetched, what: str) -> None:
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
    if remote.git_sha1 is not None and remote.sha256 is None and hasher.sha1 is not None:
        actual = hasher.sha1.hexdigest()
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
    writer: Writer,
    what: str,
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
        cap = remote.size if remote.size is not None else max_size
        limit = None if cap is None else cap - offset
        try:
            try:
                body = Body(response)
                while True:
                    if cancelled():
                        raise InstallCancelled(f"{what}: cancelled", file=remote.relative)
                    room = writer.room()
                    if limit is not None:  # one byte past the limit tells a body that is too long
                        room = room[: max(0, limit - writer.written - writer.pending) + 1]
                    count = body.readinto(room)
                    if not count:
                        break
                    if limit is not None and writer.written + writer.pending + count > limit:
                        if remote.size is None:
                            raise InsufficientDisk(
                                f"{what}: no size declared and more than the {cap:,} bytes the disk can "
                                "take arrived; refused",
                                file=remote.relative,
                            )
                        raise SizeMismatch(
                            f"{what}: the server sent more than the {remote.size} bytes declared; refused",
                            file=remote.relative,
                        )
                    writer.commit(count)
            finally:
                writer.flush()  # what arrived is kept (a resume continues after it)
        except httpx.TransportError as exc:
            raise _Dropped(exc, writer.written) from exc
    return writer.written, False
