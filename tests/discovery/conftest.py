"""Shared fixtures of the discovery tests: the stripped real models and the tiny demo models,
each written once per session, and helpers to scan a folder into a fresh registry."""

from __future__ import annotations

import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

# The helpers next to this file (stripped.py) import as plain modules in every pytest import mode.
sys.path.insert(0, str(Path(__file__).parent))
from stripped import StrippedSet, build

from modelkeeper.discovery.scanner import Scanner, ScanReport
from modelkeeper.registry.store import Registry
from modelkeeper.testing.demo import write_demo_models
from modelkeeper.testing.manifest import DemoManifest


@pytest.fixture(scope="session")
def stripped_set(tmp_path_factory: pytest.TempPathFactory) -> StrippedSet:
    return build(tmp_path_factory.mktemp("stripped"))


@pytest.fixture(scope="session")
def demo(tmp_path_factory: pytest.TempPathFactory) -> DemoManifest:
    return write_demo_models(tmp_path_factory.mktemp("demo"))


@pytest.fixture
def registry(tmp_path: Path) -> Iterator[Registry]:
    reg = Registry.open(tmp_path / "registry.sqlite3")
    yield reg
    reg.close()


def scan(registry: Registry, *roots: Path, **options: object) -> ScanReport:
    return Scanner(registry, list(roots), **options).scan()  # type: ignore[arg-type]
