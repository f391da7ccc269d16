"""Error codes of the protocol and the exception that carries one.

Hierarchy::

    ProtocolError                 any failure that becomes an error response
    └── (worker.errors.WorkerError and its subclasses reuse this class)

``ErrorCode`` is the table both sides share. ``RECOVERABLE`` lists the codes a caller may
retry or work around without a change to its input (free memory, wait, try again).
"""

from __future__ import annotations

from enum import StrEnum
from typing import Any


class ErrorCode(StrEnum):
    """Error codes carried in ``error_code`` of an error response."""

    INVALID_REQUEST = "INVALID_REQUEST"
    UNKNOWN_COMMAND = "UNKNOWN_COMMAND"
    MODEL_NOT_FOUND = "MODEL_NOT_FOUND"
    FILE_NOT_FOUND = "FILE_NOT_FOUND"
    UNSUPPORTED_FORMAT = "UNSUPPORTED_FORMAT"
    INVALID_MODEL_FILE = "INVALID_MODEL_FILE"
    UNSAFE_PICKLE = "UNSAFE_PICKLE"
    INSUFFICIENT_MEMORY = "INSUFFICIENT_MEMORY"
    ALREADY_LOADED = "ALREADY_LOADED"
    NOT_LOADED = "NOT_LOADED"
    BUSY = "BUSY"
    TIMEOUT = "TIMEOUT"
    CANCELLED = "CANCELLED"
    WORKER_DIED = "WORKER_DIED"
    UNREACHABLE = "UNREACHABLE"
    INTERNAL = "INTERNAL"


#: One line per code, for documentation and the JSON Schema.
ERROR_DESCRIPTIONS: dict[ErrorCode, str] = {
    ErrorCode.INVALID_REQUEST: "The message or one of its fields is malformed; the error names the field.",
    ErrorCode.UNKNOWN_COMMAND: "The request type is not one the worker knows.",
    ErrorCode.MODEL_NOT_FOUND: "No loaded model has that name.",
    ErrorCode.FILE_NOT_FOUND: "The path given does not exist or misses a required file.",
    ErrorCode.UNSUPPORTED_FORMAT: "The file or folder is of a format or type this worker cannot load.",
    ErrorCode.INVALID_MODEL_FILE: "The file exists but is broken: truncated, bad header, wrong keys or shapes.",
    ErrorCode.UNSAFE_PICKLE: "A pickle-based file references globals outside the allowlist.",
    ErrorCode.INSUFFICIENT_MEMORY: "The load does not fit the device budget (and eviction was not allowed).",
    ErrorCode.ALREADY_LOADED: "A model of that name is already loaded.",
    ErrorCode.NOT_LOADED: "The operation needs a loaded model and there is none of that name.",
    ErrorCode.BUSY: "The worker is shutting down or the resource is in use.",
    ErrorCode.TIMEOUT: "The operation ran past its time limit.",
    ErrorCode.CANCELLED: "The operation was cancelled by control.cancel.",
    ErrorCode.WORKER_DIED: "The worker process exited while the request was in flight.",
    ErrorCode.UNREACHABLE: "A remote source (the Hub, CivitAI, a URL's host) cannot be reached: no network, "
    "no such host, connection refused. Never sent by a worker.",
    ErrorCode.INTERNAL: "An unexpected failure inside the worker; the message carries the exception.",
}

RECOVERABLE: frozenset[ErrorCode] = frozenset(
    {
        ErrorCode.INSUFFICIENT_MEMORY,
        ErrorCode.BUSY,
        ErrorCode.TIMEOUT,
        ErrorCode.CANCELLED,
        ErrorCode.WORKER_DIED,
        ErrorCode.UNREACHABLE,
    }
)


class ProtocolError(Exception):
    """A failure that is reported as an error response with ``code``.

    ``details`` is extra JSON-serialisable context (the field, the path, sizes) sent as the
    response's ``data``.
    """

    code: ErrorCode = ErrorCode.INTERNAL

    def __init__(self, message: str, code: ErrorCode | None = None, **details: Any) -> None:
        super().__init__(message)
        if code is not None:
            self.code = code
        self.message = message
        self.details = details

    @property
    def recoverable(self) -> bool:
        return self.code in RECOVERABLE

    def __str__(self) -> str:
        return f"[{self.code}] {self.message}"
