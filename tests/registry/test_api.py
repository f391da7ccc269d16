"""The public API of modelkeeper.registry: the names callers rely on (existence and leaks are checked for every package in tests/test_public_api.py)."""

from __future__ import annotations

from modelkeeper import registry


def test_exports() -> None:
    assert {
        "Registry",
        "ModelRecord",
        "SearchPage",
        "ModelNotFound",
        "AmbiguousReference",
        "worker_spec",
    } <= set(registry.__all__)
