"""JSON Schema of every message, so an orchestrator in another language can drive a worker."""

from __future__ import annotations

from typing import Any

from modelkeeper.protocol.errors import ERROR_DESCRIPTIONS
from modelkeeper.protocol.messages import (
    COMMAND_MODELS,
    EVENT_MODELS,
    PROTOCOL_VERSION,
    ErrorResponse,
    Event,
    Request,
    Response,
)


def protocol_schema() -> dict[str, Any]:
    """A single JSON document: the envelope, each command's data and result, events, error codes."""
    return {
        "$schema": "https://json-schema.org/draft/2020-12/schema",
        "title": "modelkeeper worker protocol",
        "protocol_version": PROTOCOL_VERSION,
        "framing": "one JSON object per line (UTF-8, newline-terminated) on the worker's stdin and stdout",
        "envelope": {
            "request": Request.model_json_schema(),
            "response": Response.model_json_schema(),
            "error": ErrorResponse.model_json_schema(),
            "event": Event.model_json_schema(),
        },
        "commands": {
            command.value: {"data": req.model_json_schema(), "result": res.model_json_schema()}
            for command, (req, res) in COMMAND_MODELS.items()
        },
        "events": {event.value: model.model_json_schema() for event, model in EVENT_MODELS.items()},
        "error_codes": {code.value: text for code, text in ERROR_DESCRIPTIONS.items()},
    }
