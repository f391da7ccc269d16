"""Errors of installing models.

Hierarchy::

    ProtocolError (modelkeeper.protocol)
    └── InstallError                    INTERNAL: the root; every install failure is one of these
        ├── InvalidSource               INVALID_REQUEST: the source text is not a repo id, URL or CivitAI id
        ├── UnsafeSource                INVALID_REQUEST: a scheme other than http/https, a redirect to
        │                               one, or a listing with ``..`` or an absolute file name
        ├── AccessDenied                INVALID_REQUEST: 401/403: a gated or private repo, a missing or bad token
        ├── RemoteNotFound              FILE_NOT_FOUND: 404: no such repo, revision, file or version
        ├── DestinationExists           INVALID_REQUEST: other content is already at the destination
        ├── InsufficientDisk            INSUFFICIENT_MEMORY: the declared sizes do not fit the free disk
        ├── IntegrityError              INVALID_MODEL_FILE: what arrived is not what was declared
        │   ├── ChecksumMismatch        the hash differs (names the file and both hashes)
        │   └── SizeMismatch            more (or fewer) bytes than declared
        ├── DownloadFailed              TIMEOUT: the connection failed and retries ran out (recoverable:
        │   │                           the partial download is kept, a new install resumes it)
        │   └── SourceUnreachable       UNREACHABLE: no connection could be made at all (no network,
        │                               no such host, refused): nothing was transferred
        └── InstallCancelled            CANCELLED: the caller cancelled (recoverable, resumes likewise)

Each message names the repo, file or URL and the problem. Tokens never appear in them: URLs are
passed through :func:`redact_url` before they enter a message.
"""

from __future__ import annotations

from typing import Any
from urllib.parse import parse_qsl, urlencode, urlsplit, urlunsplit

from modelkeeper.protocol.errors import ErrorCode, ProtocolError

__all__ = [
    "AccessDenied",
    "ChecksumMismatch",
    "DestinationExists",
    "DownloadFailed",
    "InstallCancelled",
    "InstallError",
    "InsufficientDisk",
    "IntegrityError",
    "InvalidSource",
    "RemoteNotFound",
    "SizeMismatch",
    "SourceUnreachable",
    "UnsafeSource",
    "redact_url",
    "unreachable",
]

#: Query parameters that carry credentials (CivitAI accepts ``?token=``; signed CDN URLs carry
#: signatures): their values are replaced before a URL is shown anywhere.
_SECRET_PARAMS = frozenset(
    {"token", "access_token", "api_key", "apikey", "key", "signature", "x-amz-signature"}
)


def redact_url(url: str) -> str:
    """``url`` without user info and with secret query values replaced by ``***``."""
    try:
        parts = urlsplit(url)
    except ValueError:
        return "<unparsable URL>"
    netloc = parts.hostname or ""
    if parts.port is not None:
        netloc = f"{netloc}:{parts.port}"
    query = urlencode(
        [
            (k, "***" if k.lower() in _SECRET_PARAMS else v)
            for k, v in parse_qsl(parts.query, keep_blank_values=True)
        ]
    )
    return urlunsplit((parts.scheme, netloc, parts.path, query, ""))


class InstallError(ProtocolError):
    """Root of the install errors; ``details`` carries the source, file and URL where known."""

    code = ErrorCode.INTERNAL

    def __init__(self, message: str, code: ErrorCode | None = None, **details: Any) -> None:
        super().__init__(message, code, **details)


class InvalidSource(InstallError):
    code = ErrorCode.INVALID_REQUEST


class UnsafeSource(InstallError):
    code = ErrorCode.INVALID_REQUEST


class AccessDenied(InstallError):
    code = ErrorCode.INVALID_REQUEST


class RemoteNotFound(InstallError):
    code = ErrorCode.FILE_NOT_FOUND


class DestinationExists(InstallError):
    code = ErrorCode.INVALID_REQUEST


class InsufficientDisk(InstallError):
    code = ErrorCode.INSUFFICIENT_MEMORY


class IntegrityError(InstallError):
    code = ErrorCode.INVALID_MODEL_FILE


class ChecksumMismatch(IntegrityError):
    pass


class SizeMismatch(IntegrityError):
    pass


class DownloadFailed(InstallError):
    code = ErrorCode.TIMEOUT


class SourceUnreachable(DownloadFailed):
    code = ErrorCode.UNREACHABLE


def unreachable(exc: BaseException) -> bool:
    """Whether a transport error means no connection was made (no network, DNS, refused): the
    host is unreachable, as opposed to a transfer that broke off or timed out midway."""
    return type(exc).__name__ in ("ConnectError", "ConnectTimeout") or isinstance(exc, OSError)


class InstallCancelled(InstallError):
    code = ErrorCode.CANCELLED
