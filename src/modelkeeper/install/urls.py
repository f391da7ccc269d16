"""Plain http(s) URLs: one file, named by the server or by the URL's last segment.

A ``HEAD`` request (redirects checked like the download's) gives the declared size
(``Content-Length``) for the free-space check and a validator (``ETag``, else ``Last-Modified``)
for resuming with ``If-Range``. A URL declares no checksum; a caller that knows one passes it
(``sha256``) and the install is verified against it. A server that refuses ``HEAD`` leaves the
size unknown; the download then runs without the space check.
"""

from __future__ import annotations

import contextlib
import posixpath
import re
from urllib.parse import unquote, urlsplit

import httpx

from modelkeeper.install.errors import (
    DownloadFailed,
    InstallError,
    SourceUnreachable,
    redact_url,
    unreachable,
)
from modelkeeper.install.plan import InstallPlan, RemoteFile, guess_type
from modelkeeper.install.sources import UrlSource, safe_relative
from modelkeeper.install.streams import open_stream, raise_for_status

__all__ = ["UrlResolver"]

_FILENAME_RE = re.compile(r"""filename\*?=(?:UTF-8'')?"?([^";]+)"?""", re.IGNORECASE)


class UrlResolver:
    """Plans installs from plain URLs (see the module docstring)."""

    def __init__(self, client: httpx.Client) -> None:
        self._client = client

    def plan(
        self,
        source: UrlSource,
        *,
        model_type: str | None = None,
        name: str | None = None,
        sha256: str | None = None,
    ) -> InstallPlan:
        what = redact_url(source.url)
        size: int | None = None
        etag: str | None = None
        server_name: str | None = None
        try:
            response = open_stream(
                self._client, source.url, {"Accept-Encoding": "identity"}, what=what, method="HEAD"
            )
            with contextlib.closing(response):
                if response.status_code not in (405, 501):
                    raise_for_status(response, what=what)
                    length = response.headers.get("Content-Length", "")
                    size = int(length) if length.isdigit() else None
                    etag = response.headers.get("ETag") or response.headers.get("Last-Modified")
                    if match := _FILENAME_RE.search(response.headers.get("Content-Disposition", "")):
                        server_name = posixpath.basename(unquote(match.group(1)).replace("\\", "/"))
        except httpx.TransportError as exc:
            raise (SourceUnreachable if unreachable(exc) else DownloadFailed)(
                f"{what}: cannot connect: {type(exc).__name__}", url=what
            ) from None
        file_name = server_name or posixpath.basename(unquote(urlsplit(source.url).path))
        if not file_name:
            raise InstallError(f"{what}: the URL names no file; pass a name", url=what)
        file_name = safe_relative(name or file_name, what=what)
        return InstallPlan(
            source=source.canonical(),
            kind="url",
            revision=None,
            name=file_name,
            model_type=model_type or guess_type(file_name),
            is_folder=False,
            files=(RemoteFile(file_name, source.url, size, sha256.lower() if sha256 else None, etag=etag),),
        )
