"""The worker protocol: JSON lines of requests, responses and events.

See ``docs/PROTOCOL.md`` and ``modelkeeper protocol-schema``.
"""

from modelkeeper.protocol.client import WorkerConnection, WorkerProcess
from modelkeeper.protocol.codec import encode, parse_message, parse_request, validate_data
from modelkeeper.protocol.commands import IMMEDIATE_COMMANDS, CommandType
from modelkeeper.protocol.errors import ERROR_DESCRIPTIONS, RECOVERABLE, ErrorCode, ProtocolError
from modelkeeper.protocol.messages import (
    COMMAND_MODELS,
    LORA_ROLES,
    PROTOCOL_VERSION,
    ErrorResponse,
    Event,
    EventType,
    KeyLayout,
    LoadRequest,
    LoraRole,
    ModelKind,
    Request,
    Response,
)
from modelkeeper.protocol.schema import protocol_schema

__all__ = [
    "COMMAND_MODELS",
    "ERROR_DESCRIPTIONS",
    "IMMEDIATE_COMMANDS",
    "LORA_ROLES",
    "PROTOCOL_VERSION",
    "RECOVERABLE",
    "CommandType",
    "ErrorCode",
    "ErrorResponse",
    "Event",
    "EventType",
    "KeyLayout",
    "LoadRequest",
    "LoraRole",
    "ModelKind",
    "ProtocolError",
    "Request",
    "Response",
    "WorkerConnection",
    "WorkerProcess",
    "encode",
    "parse_message",
    "parse_request",
    "protocol_schema",
    "validate_data",
]
