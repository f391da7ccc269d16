"""Every error code has exactly one HTTP status: over the whole protocol ``ErrorCode`` enum, the
HTTP layer's own codes, and every ``ProtocolError`` class the package defines (the places that
raise), so a client may branch on the status or on the code and get the same answer."""

from __future__ import annotations

import importlib
import pkgutil
from collections import defaultdict

import modelkeeper
from modelkeeper.api.errors import (
    CODE_BY_STATUS,
    HTTP_CODES,
    STATUS_BY_CODE,
    error_code,
    http_status,
    status_of,
)
from modelkeeper.cache import SegmentNotFound
from modelkeeper.protocol.errors import ErrorCode, ProtocolError


def _all_error_classes() -> set[type[ProtocolError]]:
    for info in pkgutil.walk_packages(modelkeeper.__path__, "modelkeeper."):
        if not info.name.endswith("__main__"):
            importlib.import_module(info.name)
    found: set[type[ProtocolError]] = set()
    todo = [ProtocolError]
    while todo:
        cls = todo.pop()
        found.add(cls)
        todo.extend(cls.__subclasses__())
    return found


def test_every_protocol_code_has_one_status() -> None:
    assert set(STATUS_BY_CODE) == set(ErrorCode)
    assert not set(HTTP_CODES) & set(ErrorCode.__members__), "an HTTP-layer code shadows a protocol code"
    for code in ErrorCode:
        assert status_of(code.value) == STATUS_BY_CODE[code]
        assert 400 <= status_of(code.value) < 600
    for status, code in CODE_BY_STATUS.items():
        assert status_of(code) == status
    assert status_of("HTTP_400") == 400


def test_every_error_class_answers_its_codes_status() -> None:
    classes = _all_error_classes()
    assert len(classes) > 20, sorted(c.__name__ for c in classes)  # the walk found the package's errors
    statuses: dict[str, set[int]] = defaultdict(set)
    for cls in classes:
        try:
            exc = cls("probe")
        except TypeError:  # an error class with its own constructor arguments
            continue
        statuses[error_code(exc)].add(http_status(exc))
    mixed = {code: found for code, found in statuses.items() if len(found) > 1}
    assert not mixed, mixed
    for code, found in statuses.items():
        assert found == {status_of(code)}, code
    # the classes that once disagreed: INVALID_REQUEST answered with 404 or 403, BUSY with 503
    assert statuses["INVALID_REQUEST"] == {422} and statuses["BUSY"] == {409}
    assert (
        statuses["NOT_FOUND"] == {404} and statuses["FORBIDDEN"] == {403} and statuses["NOT_READY"] == {503}
    )
    # an unknown RAM-cache segment is answered NOT_FOUND (it once said MODEL_NOT_FOUND)
    assert error_code(SegmentNotFound("no cached component 'x'")) == "NOT_FOUND"
