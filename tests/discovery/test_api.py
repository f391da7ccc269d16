"""The public API of modelkeeper.discovery: what ``__all__`` promises exists, nothing more leaks."""

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
    for name in discovery.__all__:
        assert hasattr(discovery, name), name
    public = {n for n in dir(discovery) if not n.startswith("_") and n[0].isupper()}
    assert public <= set(discovery.__all__)
