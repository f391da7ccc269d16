"""Fixtures of the fixture factory's own tests.

The demo set itself is the session fixture ``demo`` of ``tests/conftest.py`` (written once per test
process); everything here is small helpers around it.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
import torch
from safetensors import safe_open

from modelkeeper.testing import CONFIG_METADATA_KEY

#: Every test module here carries ``pytestmark = GROUP`` so that ``--dist loadgroup`` runs them on one
#: xdist worker and the demo set (a session fixture) is written once for them. (pytest-xdist 3.8 cannot
#: group under pytest 9, which renamed the node id it rewrites; then each worker writes its own copy.)
GROUP = pytest.mark.xdist_group("modelkeeper-testing")


@pytest.fixture(autouse=True)
def _one_torch_thread(one_torch_thread: None) -> None:
    """Tiny models: thousands of small tensor operations, fastest on one thread (and the suite runs one
    process per core); ``one_torch_thread`` of ``tests/conftest.py`` for every test here."""


def read_metadata(path: Path) -> dict[str, str]:
    with safe_open(str(path), framework="pt") as handle:
        return dict(handle.metadata() or {})


def read_config_metadata(path: Path) -> dict[str, Any] | None:
    raw = read_metadata(path).get(CONFIG_METADATA_KEY)
    return None if raw is None else dict(json.loads(raw))


def assert_bitwise_equal(actual: dict[str, torch.Tensor], expected: dict[str, torch.Tensor]) -> None:
    """Same keys, and every tensor equal in dtype, shape and every bit."""
    missing, extra = sorted(set(expected) - set(actual)), sorted(set(actual) - set(expected))
    assert not missing and not extra, f"missing {missing[:5]}, unexpected {extra[:5]}"
    for key, tensor in expected.items():
        other = actual[key]
        assert other.dtype == tensor.dtype and other.shape == tensor.shape, key
        assert torch.equal(other.contiguous().view(torch.uint8), tensor.contiguous().view(torch.uint8)), key
