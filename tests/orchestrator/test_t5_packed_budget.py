"""The budget an orchestrator counts for a packed T5 (its stored bytes, from the registry's record)
against what the worker holds once it is loaded: within 5%, now that T5's ``wo`` stays packed too
(decoded at load, the tiny T5 held 10-13% more than the estimate; a T5-XXL at Q8_0 about 1 GB)."""

from __future__ import annotations

from pathlib import Path

import pytest

from modelkeeper.orchestrator.options import LoadOptions
from modelkeeper.testing import DemoManifest
from modelkeeper.testing.demo import write_demo_models
from tests.orchestrator.conftest import run, serving

FORMS = ["t5-fp8-e4m3fn", "t5-fp8-scaled", "t5-q8_0"]


@pytest.fixture(scope="module")
def demo(tmp_path_factory: pytest.TempPathFactory) -> DemoManifest:
    return write_demo_models(tmp_path_factory.mktemp("t5-budget"), only=FORMS)


def test_the_estimate_matches_the_loaded_bytes(demo: DemoManifest, tmp_path: Path) -> None:
    async def body() -> None:
        async with serving(demo, tmp_path) as orch:
            for entry in FORMS:
                record = await orch.catalog.resolve(demo[entry].path)
                estimate = await orch.loads.stored_bytes(record, LoadOptions())
                placed = (await orch.loads.load(record.id))["result"]
                assert abs(placed["bytes"] - estimate) <= 0.05 * estimate, (entry, placed["bytes"], estimate)

    run(body)
