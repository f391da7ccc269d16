"""A small threaded HTTP/1.1 server on 127.0.0.1 for tests, serving files with ``Range`` and faults.

:class:`TestServer` runs a stdlib ``ThreadingHTTPServer`` on a thread; a subclass answers requests
in :meth:`TestServer.route`. :meth:`TestServer.send_file` serves a byte range of a file as real
file hosts do (``206`` with ``Content-Range``, ``416`` past the end, ``sendfile`` when no fault
applies) and counts the body bytes it sent per name, so a test can tell how much a resume
transferred. :class:`Faults`, set per served name, inject what real servers and networks do
wrong, at a byte offset the test chooses (no timers):

- ``drop_after``: close the connection after that many body bytes (``drop_times`` times);
- ``flip_byte_at``: send that byte inverted;
- ``pause_at``: stop after that many bytes until ``resume`` is set (``paused`` tells the test);
- ``extra_bytes``: send more bytes than the file has (with a ``Content-Length`` that says so,
  or with none when ``no_length``);
- ``ignore_range``: answer ``200`` with the whole file to a ``Range`` request;
- ``redirect_to``: answer with a redirect to that URL instead;
- ``error_status``: answer with that status instead (``error_times`` times).
"""

from __future__ import annotations

import contextlib
import json
import re
import socket
import ssl
import threading
from collections import Counter
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any, Self
from urllib.parse import parse_qs, urlsplit

__all__ = ["Faults", "Request", "TestServer"]

_RANGE_RE = re.compile(r"^bytes=(\d+)-(\d*)$")
_BLOCK = 1024 * 1024
_PAUSE_LIMIT_S = 60.0  # a paused response gives up after this long (a test that forgot to resume)


@dataclass
class Faults:
    """Faults injected into the responses for one served name (see the module docstring)."""

    drop_after: int | None = None
    drop_times: int = 1
    flip_byte_at: int | None = None
    pause_at: int | None = None
    paused: threading.Event = field(default_factory=threading.Event)
    resume: threading.Event = field(default_factory=threading.Event)
    extra_bytes: int = 0
    no_length: bool = False
    ignore_range: bool = False
    redirect_to: str | None = None
    error_status: int | None = None
    error_times: int = 1


@dataclass
class Request:
    """What the server was asked: method, path, query and headers (names in lowercase), and how many
    body bytes of a file it sent in answer (``served``: bytes written to the socket, even those a
    client that went away never read)."""

    method: str
    path: str
    query: dict[str, list[str]]
    headers: dict[str, str]
    served: int = 0

    @property
    def bearer(self) -> str | None:
        value = self.headers.get("authorization", "")
        return value[len("Bearer ") :] if value.startswith("Bearer ") else None


class _Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    server: _Server

    def log_message(self, format: str, *args: Any) -> None:  # quiet
        pass

    def _dispatch(self) -> None:
        parts = urlsplit(self.path)
        request = Request(
            self.command, parts.path, parse_qs(parts.query), {k.lower(): v for k, v in self.headers.items()}
        )
        self.server.owner.requests.append(request)
        try:
            self.server.owner.route(self, request)
        except (BrokenPipeError, ConnectionResetError):
            self.close_connection = True

    do_GET = _dispatch  # noqa: N815 (the names http.server calls)
    do_HEAD = _dispatch  # noqa: N815


class _Server(ThreadingHTTPServer):
    daemon_threads = True
    owner: TestServer


class TestServer:
    """A test HTTP server on 127.0.0.1 (a free port) run by a thread; use as a context manager.
    With ``tls`` (a server-side context), it speaks HTTPS."""

    def __init__(self, *, tls: ssl.SSLContext | None = None) -> None:
        self._httpd = _Server(("127.0.0.1", 0), _Handler)
        self._httpd.owner = self
        self._scheme = "http"
        if tls is not None:
            self._httpd.socket = tls.wrap_socket(self._httpd.socket, server_side=True)
            self._scheme = "https"
        self._thread = threading.Thread(
            target=self._httpd.serve_forever, name=type(self).__name__, daemon=True
        )
        self.requests: list[Request] = []
        self.served_bytes: Counter[str] = Counter()  # body bytes sent, per served name
        self.faults: dict[str, Faults] = {}

    @property
    def url(self) -> str:
        host, port = self._httpd.server_address[:2]
        return f"{self._scheme}://{host!s}:{port}"

    def start(self) -> Self:
        self._thread.start()
        return self

    def stop(self) -> None:
        for faults in self.faults.values():
            faults.resume.set()
        self._httpd.shutdown()
        self._httpd.server_close()
        self._thread.join()

    def __enter__(self) -> Self:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    # -- for subclasses

    def route(self, handler: BaseHTTPRequestHandler, request: Request) -> None:
        self.send_json(handler, {"error": "not found"}, status=404)

    @staticmethod
    def send_json(
        handler: BaseHTTPRequestHandler,
        body: Any,
        *,
        status: int = 200,
        headers: dict[str, str] | None = None,
    ) -> None:
        data = json.dumps(body).encode()
        handler.send_response(status)
        for key, value in {"Content-Type": "application/json", **(headers or {})}.items():
            handler.send_header(key, value)
        handler.send_header("Content-Length", str(len(data)))
        handler.end_headers()
        if handler.command != "HEAD":
            handler.wfile.write(data)

    @staticmethod
    def send_redirect(
        handler: BaseHTTPRequestHandler, location: str, headers: dict[str, str] | None = None
    ) -> None:
        handler.send_response(302)
        handler.send_header("Location", location)
        for key, value in (headers or {}).items():
            handler.send_header(key, value)
        handler.send_header("Content-Length", "0")
        handler.end_headers()

    def send_file(
        self,
        handler: BaseHTTPRequestHandler,
        request: Request,
        name: str,
        path: Path,
        *,
        headers: dict[str, str] | None = None,
    ) -> None:
        """Serve ``path`` (counted and faulted as ``name``), honouring ``Range``."""
        faults = self.faults.get(name, Faults())
        if faults.error_status is not None and faults.error_times > 0:
            faults.error_times -= 1
            self.send_json(handler, {"error": "injected"}, status=faults.error_status)
            return
        if faults.redirect_to is not None:
            self.send_redirect(handler, faults.redirect_to)
            return
        size = path.stat().st_size
        total = size + faults.extra_bytes
        start, end, status = 0, total, 200
        match = _RANGE_RE.match(request.headers.get("range", ""))
        if match and not faults.ignore_range:
            start = int(match[1])
            end = min(int(match[2]) + 1, total) if match[2] else total
            if start >= total:
                handler.send_response(416)
                handler.send_header("Content-Range", f"bytes */{total}")
                handler.send_header("Content-Length", "0")
                handler.end_headers()
                return
            status = 206
        handler.send_response(status)
        for key, value in (headers or {}).items():
            handler.send_header(key, value)
        handler.send_header("Accept-Ranges", "bytes")
        if status == 206:
            handler.send_header("Content-Range", f"bytes {start}-{end - 1}/{total}")
        if faults.no_length:
            handler.send_header("Connection", "close")
            handler.close_connection = True
        else:
            handler.send_header("Content-Length", str(end - start))
        handler.end_headers()
        if request.method == "HEAD":
            return
        self._send_body(handler, request, name, path, start, end, size, faults)

    def _send_body(
        self,
        handler: BaseHTTPRequestHandler,
        request: Request,
        name: str,
        path: Path,
        start: int,
        end: int,
        size: int,
        faults: Faults,
    ) -> None:
        stop = end
        dropping = faults.drop_after is not None and faults.drop_times > 0 and faults.drop_after < end
        if dropping:
            assert faults.drop_after is not None
            stop = max(start, faults.drop_after)
        plain = faults.flip_byte_at is None and faults.pause_at is None and faults.extra_bytes == 0
        with open(path, "rb") as f:
            if plain:
                sent = handler.connection.sendfile(f, start, stop - start)
                self.served_bytes[name] += sent
                request.served += sent
            else:
                self._send_slowly(handler, request, name, f, start, stop, size, faults)
        if dropping:
            faults.drop_times -= 1
            handler.close_connection = True
            with contextlib.suppress(OSError):
                handler.connection.shutdown(socket.SHUT_RDWR)
        elif faults.no_length:
            with contextlib.suppress(OSError):
                handler.connection.shutdown(socket.SHUT_WR)

    def _send_slowly(
        self,
        handler: BaseHTTPRequestHandler,
        request: Request,
        name: str,
        f: Any,
        start: int,
        stop: int,
        size: int,
        faults: Faults,
    ) -> None:
        position = start
        while position < stop:
            limit = stop
            if faults.pause_at is not None and position < faults.pause_at < stop:
                limit = faults.pause_at
            f.seek(position)
            block = bytearray(f.read(min(_BLOCK, limit - position, max(0, size - position))))
            if position + len(block) < limit and position + len(block) >= size:
                block += b"\0" * min(_BLOCK - len(block), limit - position - len(block))  # extra bytes
            if faults.flip_byte_at is not None and position <= faults.flip_byte_at < position + len(block):
                block[faults.flip_byte_at - position] ^= 0xFF
            handler.wfile.write(block)
            self.served_bytes[name] += len(block)
            request.served += len(block)
            position += len(block)
            if faults.pause_at is not None and position == faults.pause_at:
                faults.paused.set()
                faults.resume.wait(_PAUSE_LIMIT_S)
                faults.pause_at = None
