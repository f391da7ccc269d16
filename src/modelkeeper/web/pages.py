"""Serving the dashboard: the shell at ``/``, assets under ``/ui/``, all from memory.

The files are small and fixed, so they are read once at start and answered with an ETag (a
reload costs a 304). The shell and assets carry no data, so they are served without the bearer
token; they do carry the security headers (CSP without inline scripts, no framing, no sniffing,
no referrer) and pass the same Host allowlist as the API.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from importlib import resources

from fastapi import FastAPI
from starlette.middleware.trustedhost import TrustedHostMiddleware
from starlette.types import ASGIApp, Receive, Scope, Send

from modelkeeper.discovery.records import Base, ModelFormat, ModelType
from modelkeeper.orchestrator.settings import Settings

#: Where the page may load from and talk to: itself only. No inline script or style attribute in
#: markup (scripts set styles through the CSSOM, which CSP allows).
CSP = (
    "default-src 'none'; script-src 'self'; style-src 'self'; img-src 'self' data:; "
    "connect-src 'self'; font-src 'self'; manifest-src 'self'; base-uri 'none'; form-action 'none'; "
    "frame-ancestors 'none'"
)
SECURITY_HEADERS: tuple[tuple[bytes, bytes], ...] = (
    (b"content-security-policy", CSP.encode()),
    (b"x-content-type-options", b"nosniff"),
    (b"x-frame-options", b"DENY"),
    (b"referrer-policy", b"no-referrer"),
    (b"cross-origin-opener-policy", b"same-origin"),
    (b"cache-control", b"no-cache"),  # revalidate each time: the ETag makes that a 304
)
TYPES = {
    ".html": "text/html; charset=utf-8",
    ".js": "text/javascript; charset=utf-8",
    ".css": "text/css; charset=utf-8",
    ".svg": "image/svg+xml",
    ".json": "application/json",
    ".txt": "text/plain; charset=utf-8",
}
PREFIX = "/ui/"


@dataclass(frozen=True)
class Asset:
    """One file as served: its body, content type and ETag."""

    body: bytes
    content_type: str
    etag: bytes

    @classmethod
    def of(cls, body: bytes, name: str) -> Asset:
        suffix = name[name.rfind(".") :]
        etag = b'"' + hashlib.blake2b(body, digest_size=12).hexdigest().encode() + b'"'
        return cls(body, TYPES[suffix], etag)


def vocabulary() -> bytes:
    """The filter choices of the library page, from discovery's own enums (never a copy)."""
    choices: dict[str, list[str]] = {
        "type": [t.value for t in ModelType],
        "base": [b.value for b in Base],
        "format": [f.value for f in ModelFormat],
    }
    return json.dumps(choices).encode()


def load_assets() -> dict[str, Asset]:
    """Every shipped file under ``static/`` by URL path; the shell also answers ``/``."""
    assets: dict[str, Asset] = {}

    def walk(folder: resources.abc.Traversable, rel: str) -> None:
        for entry in folder.iterdir():
            if entry.is_dir():
                walk(entry, f"{rel}{entry.name}/")
            elif entry.name[entry.name.rfind(".") :] in TYPES:
                assets[f"{PREFIX}{rel}{entry.name}"] = Asset.of(entry.read_bytes(), entry.name)

    walk(resources.files("modelkeeper.web") / "static", "")
    assets["/"] = assets.pop(f"{PREFIX}index.html")
    assets[f"{PREFIX}vocabulary.json"] = Asset.of(vocabulary(), "vocabulary.json")
    return assets


class DashboardPages:
    """An ASGI app answering GET and HEAD for the dashboard's fixed set of paths."""

    def __init__(self, assets: dict[str, Asset]) -> None:
        self.assets = assets

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        asset = self.assets.get(scope["path"])
        if asset is None:
            await self._send(send, 404, b"not found\n", b"text/plain; charset=utf-8")
        elif scope["method"] not in ("GET", "HEAD"):
            await self._send(send, 405, b"method not allowed\n", b"text/plain; charset=utf-8",
                             ((b"allow", b"GET, HEAD"),))  # fmt: skip
        elif dict(scope["headers"]).get(b"if-none-match") == asset.etag:
            await self._send(send, 304, b"", asset.content_type, ((b"etag", asset.etag),))
        else:
            body = b"" if scope["method"] == "HEAD" else asset.body
            await self._send(send, 200, body, asset.content_type, ((b"etag", asset.etag),),
                             length=len(asset.body))  # fmt: skip

    @staticmethod
    async def _send(
        send: Send,
        status: int,
        body: bytes,
        content_type: bytes | str,
        extra: tuple[tuple[bytes, bytes], ...] = (),
        length: int | None = None,
    ) -> None:
        ctype = content_type.encode() if isinstance(content_type, str) else content_type
        headers = [(b"content-type", ctype), *SECURITY_HEADERS, *extra]
        if status != 304:
            headers.append((b"content-length", str(len(body) if length is None else length).encode()))
        await send({"type": "http.response.start", "status": status, "headers": headers})
        await send({"type": "http.response.body", "body": body})


class DashboardDoor:
    """Outermost middleware: dashboard paths go to the pages (behind the Host allowlist), every
    other request to the API stack unchanged."""

    def __init__(self, app: ASGIApp, pages: ASGIApp, settings: Settings) -> None:
        self.app = app
        self.pages = pages
        if "*" not in settings.allowed_hosts:
            self.pages = TrustedHostMiddleware(pages, allowed_hosts=settings.host_allowlist())

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "http" and (scope["path"] == "/" or scope["path"].startswith(PREFIX)):
            await self.pages(scope, receive, send)
        else:
            await self.app(scope, receive, send)


def install(app: FastAPI, settings: Settings) -> None:
    """Serve the dashboard from ``app``. Call it after the API's security middleware is added, so
    that this door is outermost: the shell loads without the token, which the page then asks for."""
    app.add_middleware(DashboardDoor, pages=DashboardPages(load_assets()), settings=settings)
