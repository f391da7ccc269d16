"""Domain errors to HTTP: every error body is ``{"error", "error_code", "details"}`` with the
protocol's error code, or an HTTP-layer code for the few error classes where the protocol's code
is too coarse (an unknown job id is ``NOT_FOUND``, no ``INVALID_REQUEST``; an unknown RAM-cache
segment ``NOT_FOUND``, no ``MODEL_NOT_FOUND``). Each code has exactly
one HTTP status (``status_of``), so a client can rely on either."""

from __future__ import annotations

from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException

from modelkeeper.cache import SegmentNotFound
from modelkeeper.orchestrator.errors import (
    DeviceNotFound,
    IncompatiblePart,
    JobNotFound,
    LeaseNotFound,
    MissingPart,
    PathOutsideRoots,
    ServiceNotReady,
)
from modelkeeper.protocol.errors import ErrorCode, ProtocolError

STATUS_BY_CODE: dict[ErrorCode, int] = {
    ErrorCode.INVALID_REQUEST: 422,
    ErrorCode.UNKNOWN_COMMAND: 400,
    ErrorCode.MODEL_NOT_FOUND: 404,
    ErrorCode.FILE_NOT_FOUND: 404,
    ErrorCode.UNSUPPORTED_FORMAT: 422,
    ErrorCode.INVALID_MODEL_FILE: 422,
    ErrorCode.UNSAFE_PICKLE: 422,
    ErrorCode.INSUFFICIENT_MEMORY: 507,
    ErrorCode.ALREADY_LOADED: 409,
    ErrorCode.NOT_LOADED: 409,
    ErrorCode.BUSY: 409,
    ErrorCode.TIMEOUT: 504,
    ErrorCode.CANCELLED: 409,
    ErrorCode.WORKER_DIED: 503,
    ErrorCode.UNREACHABLE: 502,
    ErrorCode.INTERNAL: 500,
}

#: Codes of the HTTP layer, beside the protocol's: the framework's own answers (unknown route,
#: wrong method, token, body size), the API's name for an error class whose protocol code
#: would otherwise answer with two statuses (a job id that is unknown is no malformed request),
#: and names that tell a client which part of a transformer-only model is missing or refused.
HTTP_CODES: dict[str, int] = {
    "NOT_FOUND": 404,
    "METHOD_NOT_ALLOWED": 405,
    "UNAUTHORIZED": 401,
    "FORBIDDEN": 403,
    "BODY_TOO_LARGE": 413,
    "NOT_READY": 503,
    "MISSING_PART": 422,
    "INCOMPATIBLE_PART": 422,
}

#: Error classes answered with an HTTP-layer code (and so its status) instead of their protocol
#: code: ``INVALID_REQUEST`` is always 422, ``BUSY`` always 409.
CODE_BY_CLASS: tuple[tuple[type[ProtocolError], str], ...] = (
    (DeviceNotFound, "NOT_FOUND"),
    (JobNotFound, "NOT_FOUND"),
    (LeaseNotFound, "NOT_FOUND"),
    (SegmentNotFound, "NOT_FOUND"),  # an unknown RAM-cache segment is no unknown model
    (PathOutsideRoots, "FORBIDDEN"),
    (ServiceNotReady, "NOT_READY"),
    (MissingPart, "MISSING_PART"),
    (IncompatiblePart, "INCOMPATIBLE_PART"),
)

#: HTTP-layer codes of error classes only (the framework never answers with them).
CLASS_ONLY_CODES = frozenset({"FORBIDDEN", "NOT_READY", "MISSING_PART", "INCOMPATIBLE_PART"})

#: HTTP statuses raised by the framework itself and their codes (the inverse of HTTP_CODES).
CODE_BY_STATUS = {status: code for code, status in HTTP_CODES.items() if code not in CLASS_ONLY_CODES}


def status_of(code: str) -> int:
    """The one HTTP status of an error code (protocol or HTTP layer); 500 for one unknown."""
    if code in HTTP_CODES:
        return HTTP_CODES[code]
    if code in ErrorCode.__members__:
        return STATUS_BY_CODE[ErrorCode(code)]
    if code.startswith("HTTP_") and code[5:].isdigit():  # another status of the framework
        return int(code[5:])
    return 500


def error_code(exc: ProtocolError) -> str:
    """The code an error is answered with: its class's HTTP-layer code, else its protocol code."""
    for cls, code in CODE_BY_CLASS:
        if isinstance(exc, cls):
            return code
    return exc.code.value


def http_status(exc: ProtocolError) -> int:
    return status_of(error_code(exc))


def error_body(message: str, code: str, details: dict[str, Any] | None = None) -> dict[str, Any]:
    return {"error": message, "error_code": code, "details": details or {}}


def install(app: FastAPI) -> None:
    @app.exception_handler(ProtocolError)
    async def protocol_error(request: Request, exc: ProtocolError) -> JSONResponse:
        code = error_code(exc)
        return JSONResponse(error_body(exc.message, code, exc.details), status_code=status_of(code))

    @app.exception_handler(RequestValidationError)
    async def invalid(request: Request, exc: RequestValidationError) -> JSONResponse:
        problems = [
            f"{'.'.join(str(p) for p in e.get('loc', ()))}: {e.get('msg', 'invalid')}" for e in exc.errors()
        ]
        sent = request.headers.get("content-type", "")
        if any(tuple(e.get("loc", ())) == ("body",) for e in exc.errors()) and "json" not in sent.lower():
            # curl -d without -H: the body arrives as a form, which reads as "not a dictionary"
            problems.insert(
                0,
                f"send the body as JSON with Content-Type: application/json (it came as {sent or 'no type'})",
            )
        return JSONResponse(
            error_body("; ".join(problems) or "invalid request", ErrorCode.INVALID_REQUEST.value,
                       {"errors": [{"loc": list(e.get("loc", ())), "msg": e.get("msg")} for e in exc.errors()]}),
            status_code=422,
        )  # fmt: skip

    # Input no schema rules out but the stores cannot take: a lone UTF-16 surrogate in a string
    # (valid JSON, not encodable as UTF-8), a number beyond SQLite's 64-bit integers.
    @app.exception_handler(UnicodeEncodeError)
    async def unencodable(request: Request, exc: UnicodeEncodeError) -> JSONResponse:
        message = f"request text holds a character that cannot be encoded as UTF-8 ({exc.reason}, position {exc.start})"
        return JSONResponse(error_body(message, ErrorCode.INVALID_REQUEST.value), status_code=422)

    @app.exception_handler(OverflowError)
    async def overflow(request: Request, exc: OverflowError) -> JSONResponse:
        return JSONResponse(
            error_body(f"a number in the request is too large: {exc}", ErrorCode.INVALID_REQUEST.value),
            status_code=422,
        )

    @app.exception_handler(HTTPException)
    async def http_error(request: Request, exc: HTTPException) -> JSONResponse:
        code = CODE_BY_STATUS.get(exc.status_code, f"HTTP_{exc.status_code}")
        return JSONResponse(
            error_body(str(exc.detail), code), status_code=exc.status_code, headers=exc.headers
        )
