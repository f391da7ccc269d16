"""The public API of modelkeeper.discovery: the names callers rely on (existence and leaks are checked for every package in tests/test_public_api.py)."""

from __future__ import annotations

from modelkeeper import discovery


def test_exports() -> None:
    assert {
        "Scanner",
        "ScanReport",
        "Hasher",
        "HashJob",
        "Identification",
        "examine",
        "identify_table",
    } <= set(discovery.__all__)
