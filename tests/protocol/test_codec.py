import json

import pytest

from modelkeeper.protocol import (
    CommandType,
    ErrorCode,
    ProtocolError,
    encode,
    parse_message,
    parse_request,
    validate_data,
)
from modelkeeper.protocol.codec import command_of
from modelkeeper.protocol.messages import ErrorResponse, Event, LoadRequest, Response


def test_encode_is_one_compact_line() -> None:
    line = encode({"type": "model.get_status", "request_id": "r-1", "data": {"é": 1}})
    assert line.endswith(b"\n")
    assert line.count(b"\n") == 1
    assert json.loads(line) == {"type": "model.get_status", "request_id": "r-1", "data": {"é": 1}}


def test_parse_request_roundtrip() -> None:
    req = parse_request(
        b'{"type": "model.load_unet", "request_id": "r-7", "data": {"name": "u", "path": "/x"}}'
    )
    assert req.request_id == "r-7"
    assert command_of(req) is CommandType.LOAD_UNET
    data = validate_data(CommandType.LOAD_UNET, req.data)
    assert isinstance(data, LoadRequest)
    assert data.path == "/x"


@pytest.mark.parametrize(
    ("line", "needle"),
    [
        (b"not json at all", "not valid JSON"),
        (b"[1, 2]", "must be a JSON object"),
        (b'{"type": "model.get_status"}', "request.request_id"),
        (b'{"request_id": "r", "data": {}}', "request.type"),
        (b'{"type": "model.get_status", "request_id": "r", "data": [] }', "request.data"),
        (b'{"type": "model.get_status", "request_id": "r", "extra": 1}', "request.extra"),
    ],
)
def test_bad_lines_name_the_problem(line: bytes, needle: str) -> None:
    with pytest.raises(ProtocolError) as info:
        parse_request(line)
    assert info.value.code is ErrorCode.INVALID_REQUEST
    assert needle in info.value.message


def test_request_id_is_kept_for_correlation_when_data_is_bad() -> None:
    with pytest.raises(ProtocolError) as info:
        parse_request(b'{"type": 5, "request_id": "r-9"}')
    assert info.value.details["request_id"] == "r-9"


def test_unknown_command() -> None:
    req = parse_request(b'{"type": "model.fly", "request_id": "r"}')
    with pytest.raises(ProtocolError) as info:
        command_of(req)
    assert info.value.code is ErrorCode.UNKNOWN_COMMAND
    assert "model.fly" in info.value.message


@pytest.mark.parametrize(
    ("data", "needle"),
    [
        ({"path": "/x"}, "data.name: Field required"),
        ({"name": "u", "path": "/x", "typo": 1}, "data.typo"),
        ({"name": "u", "path": "/x", "type": "rocket"}, "data.type"),
        ({"name": "u", "path": "/x", "dtype": "float8"}, "data.dtype"),
        ({"name": "", "path": "/x"}, "data.name"),
    ],
)
def test_validate_data_names_the_field(data: dict[str, object], needle: str) -> None:
    with pytest.raises(ProtocolError) as info:
        validate_data(CommandType.LOAD_MODEL, data)
    assert info.value.code is ErrorCode.INVALID_REQUEST
    assert needle in info.value.message


def test_parse_message_kinds() -> None:
    assert isinstance(parse_message(b'{"success": true, "data": {}, "request_id": "a"}'), Response)
    err = parse_message(b'{"success": false, "error": "x", "error_code": "BUSY", "request_id": null}')
    assert isinstance(err, ErrorResponse)
    assert err.error_code is ErrorCode.BUSY
    assert isinstance(parse_message(b'{"event": "progress", "request_id": "a", "data": {}}'), Event)


def test_non_finite_floats_are_encoded_as_strict_json() -> None:
    line = encode({"data": {"mean": float("nan"), "max": float("inf"), "min": -float("inf"), "ok": 1.5}})
    assert b"NaN," not in line
    assert json.loads(line, parse_constant=lambda c: pytest.fail(f"bare {c}")) == {
        "data": {"mean": "NaN", "max": "Infinity", "min": "-Infinity", "ok": 1.5}
    }
