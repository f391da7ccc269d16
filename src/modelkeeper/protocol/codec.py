"""Encoding and decoding of protocol lines, and validation of command data."""

from __future__ import annotations

import json
import math
from typing import Any

from pydantic import BaseModel, ValidationError

from modelkeeper.protocol.commands import CommandType
from modelkeeper.protocol.errors import ErrorCode, ProtocolError
from modelkeeper.protocol.messages import (
    COMMAND_MODELS,
    ErrorResponse,
    Event,
    EventType,
    Request,
    Response,
)

MAX_LINE_BYTES = 16 * 1024 * 1024


def encode(message: BaseModel | dict[str, Any]) -> bytes:
    """One message as one line of strict JSON, newline included. Non-finite floats (a NaN in a
    validation statistic, say) become the strings "NaN", "Infinity" and "-Infinity", since bare NaN
    is not JSON and other languages' parsers refuse it."""
    obj = message.model_dump(mode="json") if isinstance(message, BaseModel) else message
    try:
        text = json.dumps(obj, separators=(",", ":"), ensure_ascii=False, allow_nan=False)
    except ValueError:
        text = json.dumps(_finite(obj), separators=(",", ":"), ensure_ascii=False, allow_nan=False)
    return text.encode() + b"\n"


def _finite(value: Any) -> Any:
    if isinstance(value, float) and not math.isfinite(value):
        return "NaN" if math.isnan(value) else ("Infinity" if value > 0 else "-Infinity")
    if isinstance(value, dict):
        return {k: _finite(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_finite(v) for v in value]
    return value


def describe_validation_error(exc: ValidationError, where: str) -> str:
    """``data.path: Field required; data.type: Input should be 'unet', ...`` — names each field."""
    parts = []
    for err in exc.errors(include_url=False):
        loc = ".".join(str(p) for p in err["loc"])
        parts.append(f"{where}.{loc}: {err['msg']}" if loc else f"{where}: {err['msg']}")
    return "; ".join(parts)


def parse_request(line: bytes | str) -> Request:
    """Parse one request line. Raises ProtocolError(INVALID_REQUEST) with ``request_id`` in details
    when the line is JSON with an id, so the error can still be correlated."""
    if len(line) > MAX_LINE_BYTES:
        raise ProtocolError(
            f"line of {len(line)} bytes exceeds the limit of {MAX_LINE_BYTES}", ErrorCode.INVALID_REQUEST
        )
    try:
        obj = json.loads(line)
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise ProtocolError(f"line is not valid JSON: {exc}", ErrorCode.INVALID_REQUEST) from None
    if not isinstance(obj, dict):
        raise ProtocolError(
            f"a request must be a JSON object, got {type(obj).__name__}", ErrorCode.INVALID_REQUEST
        )
    rid = obj.get("request_id")
    try:
        return Request.model_validate(obj)
    except ValidationError as exc:
        raise ProtocolError(
            describe_validation_error(exc, "request"),
            ErrorCode.INVALID_REQUEST,
            request_id=rid if isinstance(rid, str) else None,
        ) from None


def command_of(request: Request) -> CommandType:
    try:
        return CommandType(request.type)
    except ValueError:
        raise ProtocolError(
            f"unknown command type {request.type!r}; known: {', '.join(c.value for c in CommandType)}",
            ErrorCode.UNKNOWN_COMMAND,
        ) from None


def validate_data(command: CommandType, data: dict[str, Any]) -> BaseModel:
    """The typed ``data`` of a request; errors name each bad field as ``data.<field>``."""
    models = COMMAND_MODELS.get(command)
    if models is None:
        raise ProtocolError(f"command {command} has no data model", ErrorCode.UNKNOWN_COMMAND)
    try:
        return models[0].model_validate(data)
    except ValidationError as exc:
        raise ProtocolError(describe_validation_error(exc, "data"), ErrorCode.INVALID_REQUEST) from None


def parse_message(line: bytes | str) -> Response | ErrorResponse | Event:
    """Parse a line a worker wrote (client side)."""
    obj = json.loads(line)
    if not isinstance(obj, dict):
        raise ValueError(f"worker wrote a non-object line: {line!r:.200}")
    if "event" in obj:
        return Event.model_validate(obj)
    if obj.get("success") is True:
        return Response.model_validate(obj)
    return ErrorResponse.model_validate(obj)


def make_error(exc: ProtocolError, request_id: str | None) -> ErrorResponse:
    return ErrorResponse(
        error=exc.message, error_code=exc.code, request_id=request_id, data=dict(exc.details)
    )


def make_event(event: EventType, request_id: str | None, data: BaseModel | dict[str, Any]) -> Event:
    payload = data.model_dump(mode="json") if isinstance(data, BaseModel) else data
    return Event(event=event, request_id=request_id, data=payload)
