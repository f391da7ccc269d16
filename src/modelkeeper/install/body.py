"""Reading a response body into the caller's buffers: straight from the connection's socket where it
can (``recv_into``, one copy, by the kernel), through httpx's ``iter_raw`` otherwise.

Importing it raises httpcore's read size for every httpx user (see below): the bodies read through
httpx, and the first chunk of the others, are read 1 MiB at a time.
"""

from __future__ import annotations

import socket
import ssl
from collections.abc import Iterator

import httpcore
import httpx

__all__ = ["Body"]

# httpcore reads a response 64 KiB per socket read; model files are gigabytes, and at that size the
# per-read Python work costs as much as the hashing (0.84 CPU-s per GB here, 0.45 with 1 MiB reads).
# The class attribute is httpcore's own knob; only larger reads follow, for every httpx user. It
# matters for the bodies read through httpx (see Body), and for the first chunk of the others.
_READ_SIZE_NETWORK = 1024 * 1024
if getattr(httpcore.HTTP11Connection, "READ_NUM_BYTES", _READ_SIZE_NETWORK) < _READ_SIZE_NETWORK:
    httpcore.HTTP11Connection.READ_NUM_BYTES = _READ_SIZE_NETWORK


class Body:
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
    (see :class:`Body`)."""
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
