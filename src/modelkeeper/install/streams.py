"""Opening a remote file's response over http(s), and what a failed answer means.

Redirects are followed by hand: each target must be http/https, and credentials are dropped when
the host changes. A failed status becomes the install error that says why (access denied, not
found, a server error worth retrying). Used by the fetch of a file (``transfer``) and by the
resolvers that ask CivitAI or a URL what they hold (``civitai``, ``urls``).
"""

from __future__ import annotations

from collections.abc import Mapping
from urllib.parse import urljoin, urlsplit

import httpx

from modelkeeper.install.errors import (
    AccessDenied,
    DownloadFailed,
    InstallError,
    RemoteNotFound,
    UnsafeSource,
    redact_url,
)
from modelkeeper.install.sources import check_scheme

__all__ = ["MAX_REDIRECTS", "open_stream", "raise_for_status"]

MAX_REDIRECTS = 10


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
