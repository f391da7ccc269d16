"""Domain errors to HTTP: every error body is ``{"error", "error_code", "details"}`` with the
protocol's error code; the status follows the code, or the class where a code is too coarse."""

from __future__ import annotations

from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException

from modelkeeper.cache import SegmentNotFound
from modelkeeper.orchestrator.errors import (
    DeviceNotFound,
    JobNotFound,
    LeaseNotFound,
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
    ErrorCode.INTERNAL: 500,
}

STATUS_BY_CLASS: tuple[tuple[type[ProtocolError], int], ...] = (
    (DeviceNotFound, 404),
    (JobNotFound, 404),
    (LeaseNotFound, 404),
    (SegmentNotFound, 404),
    (PathOutsideRoots, 403),
    (ServiceNotReady, 503),
)

#: HTTP statuses raised by the framework itself (unknown route, wrong method...) and their codes.
CODE_BY_STATUS = {404: "NOT_FOUND", 405: "METHOD_NOT_ALLOWED", 401: "UNAUTHORIZED", 413: "BODY_TOO_LARGE"}


def http_status(exc: ProtocolError) -> int:
    for cls, status in STATUS_BY_CLASS:
        if isinstance(exc, cls):
            return status
    return STATUS_BY_CODE.get(exc.code, 500)


def error_body(message: str, code: str, details: dict[str, Any] | None = None) -> dict[str, Any]:
    return {"error": message, "error_code": code, "details": details or {}}


def install(app: FastAPI) -> None:
    @app.exception_handler(ProtocolError)
    async def protocol_error(request: Request, exc: ProtocolError) -> JSONResponse:
        return JSONResponse(
            error_body(exc.message, exc.code.value, exc.details), status_code=http_status(exc)
        )

    @app.exception_handler(RequestValidationError)
    async def invalid(request: Request, exc: RequestValidationError) -> JSONResponse:
        problems = [
            f"{'.'.join(str(p) for p in e.get('loc', ()))}: {e.get('msg', 'invalid')}" for e in exc.errors()
        ]
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
