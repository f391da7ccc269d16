"""The public API of modelkeeper.registry: what ``__all__`` promises exists, nothing more leaks."""

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
    for name in registry.__all__:
        assert hasattr(registry, name), name
    public = {n for n in dir(registry) if not n.startswith("_") and n[0].isupper()}
    assert public <= set(registry.__all__)
