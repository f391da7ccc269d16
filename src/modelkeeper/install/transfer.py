"""Fetching one file over http(s) into a partial file: resumable, hashed while it arrives, bounded.

- The body goes to ``<part>`` with a small ``<part>.json`` beside it saying what it is a partial
  of (URL without credentials, declared size and checksum, validator); a later fetch of the same
  thing continues it with ``Range: bytes=<size>-`` (and ``If-Range`` for plain URLs). A server
  that answers ``200`` instead of ``206`` restarts it.
- A dropped connection (or a 5xx/429 answer) is retried from where it stopped, ``retries`` times,
  after ``retry_delay_s`` times the number of failures so far.
- The body is received into a few large reusable buffers: straight from the connection's socket
  (``recv_into``, one copy, by the kernel) once the response headers are parsed, for an HTTP/1
  body of known length that httpx would pass through unchanged; through ``iter_raw`` otherwise.
  The receiving thread writes each full buffer to the partial file and hands it to a hashing
  thread (hashlib releases the GIL), which returns it for reuse: each byte is read from the socket
  once, hashing overlaps the transfer, and the bounded set of buffers keeps the hash in step with
  it. A resumed partial's existing bytes are hashed by the same thread first, while the rest arrives.
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
import ssl
import threading
import time
from collections.abc import Callable, Iterator, Mapping
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
_BUFFER = 4 * 1024 * 1024  # one receive buffer, hashed as a whole (1 MiB ones: 10-20% more CPU
# per byte here, four times the hand-overs between the threads)
# At most this much per write. Linux 6.x page caches (ext4 with large folios) size the folios
# they allocate by the write's length: 1 MiB writes cost 0.8-0.9 CPU-s per GB here, often more
# (high-order allocations on a fragmented machine), 256 KiB writes 0.2-0.3.
_WRITE_SIZE = 256 * 1024
_BUFFERS = 6  # buffers in flight between the receiving and the hashing thread (few: the hash keeps
# in step with the transfer, so little is left to hash after the last byte)
_CANCEL_POLL_S = 0.05  # how often a transfer looks at its cancel events while it waits on the network

# httpcore reads a response 64 KiB per socket read; model files are gigabytes, and at that size the
# per-read Python work costs as much as the hashing (0.84 CPU-s per GB here, 0.45 with 1 MiB reads).
# The class attribute is httpcore's own knob; only larger reads follow, for every httpx user. It
# matters for the bodies read through httpx (see _Body), and for the first chunk of the others.
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


class _Hasher:
    """Hashes, in order and on a helper thread, the buffers the receiving thread filled (and wrote),
    then hands each back for reuse. At most :data:`_BUFFERS` buffers exist: :meth:`take` waits for
    one while all are being hashed, which bounds the memory and the hash's lag. A hashing error
    surfaces on the next :meth:`take` or on :meth:`close`."""

    def __init__(self, fd: int, *, prefix: int, git_size: int | None, size: int | None) -> None:
        self._fd = fd
        self._buffer_size = _BUFFER if size is None else max(1, min(_BUFFER, size))  # small files: small
        self.sha256 = hashlib.sha256()
        self.sha1 = hashlib.sha1(f"blob {git_size}\0".encode()) if git_size is not None else None
        self._filled: queue.SimpleQueue[tuple[bytearray, int] | int | None] = queue.SimpleQueue()
        self._free: queue.SimpleQueue[bytearray] = queue.SimpleQueue()
        self._made = 0
        self._error: BaseException | None = None
        self._thread = threading.Thread(target=self._run, name="install-hasher", daemon=True)
        self._thread.start()
        if prefix:
            self._filled.put(prefix)  # hash the bytes already on disk before the new ones

    def _run(self) -> None:
        while (item := self._filled.get()) is not None:
            if isinstance(item, int):
                self._guarded(self._hash_prefix, item)
                continue
            buffer, length = item
            if length:
                self._guarded(self._update, memoryview(buffer)[:length])
            self._free.put(buffer)  # even after a failure: take() must not wait forever

    def _guarded(self, work: Callable[[Any], None], arg: Any) -> None:
        if self._error is None:
            try:
                work(arg)
            except BaseException as exc:
                self._error = exc

    def _update(self, data: memoryview) -> None:
        self.sha256.update(data)
        if self.sha1 is not None:
            self.sha1.update(data)

    def _hash_prefix(self, length: int) -> None:
        done = 0
        while done < length:
            block = os.pread(self._fd, min(_READ_SIZE, length - done), done)
            if not block:
                raise OSError(f"partial file shorter than {length} bytes")
            self.sha256.update(block)
            done += len(block)

    def take(self) -> bytearray:
        """A buffer to fill: a free one, a new one while fewer than :data:`_BUFFERS` exist, else the
        next one the hashing thread is done with."""
        if self._error is not None:
            raise self._error
        try:
            return self._free.get_nowait()
        except queue.Empty:
            if self._made < _BUFFERS:
                self._made += 1
                return bytearray(self._buffer_size)
        return self._free.get()

    def give(self, buffer: bytearray, length: int) -> None:
        """Hash ``buffer[:length]`` after everything given before; the buffer is then reused."""
        self._filled.put((buffer, length))

    def close(self) -> None:
        """Wait until everything given is hashed; raise the helper's error if it had one."""
        if self._thread.is_alive():
            self._filled.put(None)
            self._thread.join()
        if self._error is not None:
            raise self._error


class _Writer:
    """The receiving side of a transfer: exposes the free part of a buffer to receive into; each
    full buffer is written to the partial file on this thread (``os.write`` releases the GIL),
    counted, and given to the :class:`_Hasher`."""

    def __init__(self, fd: int, hasher: _Hasher, on_bytes: OnBytes) -> None:
        self._fd = fd
        self._hasher = hasher
        self._on_bytes = on_bytes
        self._buffer: bytearray | None = None
        self._view = memoryview(b"")
        self._filled = 0
        self.written = 0  # bytes written to the file by this writer

    @property
    def pending(self) -> int:
        """Bytes received into the current buffer, not written yet."""
        return self._filled

    def room(self) -> memoryview:
        """The free part of the current buffer (a new buffer once the last one was written)."""
        if self._buffer is None:
            self._buffer = self._hasher.take()
            self._view = memoryview(self._buffer)
        return self._view[self._filled :]

    def commit(self, count: int) -> None:
        """``count`` bytes were received into :meth:`room`; a full buffer is written out."""
        self._filled += count
        if self._filled == len(self._view):
            self.flush()

    def flush(self) -> None:
        """Write what the current buffer holds (if anything) and pass it on to be hashed."""
        buffer, length = self._buffer, self._filled
        if buffer is None:
            return
        data = self._view[:length]
        self._buffer, self._view, self._filled = None, memoryview(b""), 0
        try:
            _write_all(self._fd, data)
        except BaseException:
            self._hasher.give(buffer, 0)  # the transfer fails: the buffer only goes back
            raise
        self._hasher.give(buffer, length)
        self.written += length
        if length:
            self._on_bytes(length)


def _write_all(fd: int, data: memoryview) -> None:
    """Write ``data`` at ``fd``'s position, in pieces of at most :data:`_WRITE_SIZE` (``os.write``
    may also write less than asked)."""
    while data:
        data = data[os.write(fd, data[:_WRITE_SIZE]) :]


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
        hasher = _Hasher(fd, prefix=offset, git_size=git_size, size=remote.size)
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
                        _Writer(fd, hasher, on_bytes),
                        what,
                        cancelled,
                        watch,
                        max_size,
                    )
                    if restart:  # the server ignored the Range: start over
                        hasher.close()
                        os.ftruncate(fd, 0)
                        os.lseek(fd, 0, os.SEEK_SET)
                        hasher = _Hasher(fd, prefix=0, git_size=git_size, size=remote.size)
                        offset = 0
                        got, _ = _receive(
                            client, remote, 0, _Writer(fd, hasher, on_bytes), what, cancelled, watch, max_size
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


def _verify(remote: RemoteFile, hasher: _Hasher, result: Fetched, what: str) -> None:
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
    writer: _Writer,
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
                body = _Body(response)
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


class _Body:
    """A response body read into the caller's buffers (:meth:`readinto`, 0 at its end).

    For an HTTP/1 body of known length, without transfer or content coding, on a connection whose
    socket carries it in plain text (not TLS within TLS): the first chunk through httpx (the bytes
    that came with the headers, which h11 hands over whole), then the rest straight from the socket
    with ``recv_into``. That skips the copies of h11's receive buffer and httpcore's ``bytes()``,
    four per byte, that cost as much CPU as the hash. httpcore then sees the body unfinished and
    closes the connection when the response closes, so nothing reuses it. Otherwise: ``iter_raw``,
    copied into the buffers. Socket errors are raised as the httpx errors they would be.
    """

    def __init__(self, response: httpx.Response) -> None:
        self._chunks: Iterator[bytes] = response.iter_raw()
        self._chunk = memoryview(b"")
        self._socket = _plain_socket(response)
        self._left = 0
        if self._socket is not None:
            first = next(self._chunks, b"")
            self._chunk = memoryview(first)
            self._left = int(response.headers["Content-Length"]) - len(first)
            timeout = response.request.extensions.get("timeout", {}).get("read")
            self._socket.settimeout(timeout)

    def readinto(self, view: memoryview) -> int:
        while not self._chunk:
            if self._socket is not None:
                return self._receive(view)
            chunk = next(self._chunks, None)
            if chunk is None:
                return 0
            self._chunk = memoryview(chunk)
        count = min(len(view), len(self._chunk))
        view[:count] = self._chunk[:count]
        self._chunk = self._chunk[count:]
        return count

    def _receive(self, view: memoryview) -> int:
        assert self._socket is not None
        if self._left <= 0 or not view:
            return 0
        try:
            count = self._socket.recv_into(view, min(len(view), self._left))
        except TimeoutError as exc:
            raise httpx.ReadTimeout(str(exc)) from exc
        except OSError as exc:
            raise httpx.ReadError(str(exc) or type(exc).__name__) from exc
        if not count:
            raise httpx.RemoteProtocolError(
                f"peer closed connection without sending complete message body ({self._left} bytes missing)"
            )
        self._left -= count
        return count


def _plain_socket(response: httpx.Response) -> socket.socket | None:
    """The socket that carries the rest of ``response``'s body as it is to be stored, if there is one
    (see :class:`_Body`)."""
    headers = response.headers
    if (
        response.http_version not in ("HTTP/1.1", "HTTP/1.0")
        or "Transfer-Encoding" in headers
        or headers.get("Content-Encoding", "identity").lower() != "identity"
        or not headers.get("Content-Length", "").isdigit()
    ):
        return None
    stream = response.extensions.get("network_stream")
    if stream is None:
        return None
    sock = stream.get_extra_info("socket")
    ssl_object = stream.get_extra_info("ssl_object")
    if isinstance(sock, ssl.SSLSocket):  # TLS on the socket itself, not TLS in a TLS tunnel
        return sock if not isinstance(ssl_object, ssl.SSLObject) else None
    return sock if isinstance(sock, socket.socket) and ssl_object is None else None


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
            while block := src.read(_READ_SIZE):
                digest.update(block)
                if out is not None:
                    _write_all(out.fileno(), memoryview(block))
                on_bytes(len(block))
    except OSError:
        remove_partial(part)
        return False
    if digest.hexdigest() != expected_sha256.lower():
        remove_partial(part)
        return False
    return True
