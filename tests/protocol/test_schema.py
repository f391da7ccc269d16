import json
import subprocess
import sys

import jsonschema
import pytest

from modelkeeper.protocol import COMMAND_MODELS, CommandType, ErrorCode, protocol_schema


def test_schema_covers_every_served_command_and_error_code() -> None:
    schema = protocol_schema()
    assert set(schema["commands"]) == {c.value for c in COMMAND_MODELS}
    assert set(schema["error_codes"]) == {c.value for c in ErrorCode}
    for required in ("INVALID_REQUEST", "UNKNOWN_COMMAND", "MODEL_NOT_FOUND", "FILE_NOT_FOUND", "UNSUPPORTED_FORMAT",
                     "INVALID_MODEL_FILE", "INSUFFICIENT_MEMORY", "ALREADY_LOADED", "NOT_LOADED", "BUSY", "TIMEOUT",
                     "CANCELLED", "INTERNAL"):  # fmt: skip
        assert required in schema["error_codes"]


@pytest.mark.parametrize(
    ("part", "message", "valid"),
    [
        (
            "request",
            {"type": "model.load_unet", "request_id": "r-1", "data": {"name": "u", "path": "/m"}},
            True,
        ),
        ("request", {"type": "model.load_unet", "data": {}}, False),
        ("response", {"success": True, "data": {"loaded": True}, "request_id": "r-1"}, True),
        (
            "error",
            {"success": False, "error": "no", "error_code": "FILE_NOT_FOUND", "request_id": "r-1"},
            True,
        ),
        ("error", {"success": False, "error": "no", "error_code": "NOPE", "request_id": "r-1"}, False),
        ("event", {"event": "progress", "request_id": "r-1", "data": {"done": 1}}, True),
    ],
)
def test_envelope_schemas_validate_messages(part: str, message: dict[str, object], valid: bool) -> None:
    schema = protocol_schema()["envelope"][part]
    validator = jsonschema.Draft202012Validator(schema)
    assert validator.is_valid(message) is valid


def test_command_data_schema_rejects_missing_path() -> None:
    data_schema = protocol_schema()["commands"][CommandType.LOAD_UNET.value]["data"]
    validator = jsonschema.Draft202012Validator(data_schema)
    assert validator.is_valid({"name": "u", "path": "/m", "variant": "fp16"})
    assert not validator.is_valid({"name": "u"})


def test_cli_prints_the_schema() -> None:
    out = subprocess.run(
        [sys.executable, "-m", "modelkeeper", "protocol-schema"], capture_output=True, check=True, timeout=60
    )
    schema = json.loads(out.stdout)
    assert schema["protocol_version"] == protocol_schema()["protocol_version"]
    assert "model.load_unet" in schema["commands"]
    for command, (_, result) in COMMAND_MODELS.items():
        assert schema["commands"][command.value]["result"]["title"] == result.__name__
