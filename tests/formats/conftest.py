"""Fixtures of the format tests: a folder that payloads would write into, and a guard on the sandbox."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from modelkeeper.formats import pickle_runner


@pytest.fixture
def marker_dir(tmp_path: Path) -> Iterator[Path]:
    """Where every hostile payload would create its marker file; it must stay empty."""
    markers = tmp_path / "markers"
    markers.mkdir()
    yield markers
    assert sorted(p.name for p in markers.iterdir()) == [], "a payload was executed"


@pytest.fixture
def no_child(monkeypatch: pytest.MonkeyPatch) -> None:
    """Fail the test if the sandbox would start a child: the static gates must have refused."""

    def refuse(*args: object, **kwargs: object) -> None:
        raise AssertionError("a sandbox child was started for a file the static scan should refuse")

    monkeypatch.setattr(pickle_runner, "_spawn_child", refuse)
