"""What a job shows while it runs: each progress event carries its own component's step and
bytes (none of the previous component's left under the next), and a job that waits in a device's
queue is ``queued`` until its worker command starts."""

from __future__ import annotations

from collections import defaultdict
from pathlib import Path
from typing import Any

import pytest

from modelkeeper.orchestrator.jobs import Job
from modelkeeper.testing import DemoManifest

from .conftest import run, serving

SDXL_CKPT = "checkpoints/tiny-sdxl.safetensors"

pytestmark = pytest.mark.xdist_group("orchestrator-inprocess")


def test_each_progress_event_carries_its_own_components_step_and_bytes(
    demo: DemoManifest, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    seen: dict[str, list[dict[str, Any]]] = defaultdict(list)  # job id -> its progress after each report
    report = Job.progress

    def recorded(job: Job, *, force: bool = False, **values: Any) -> None:
        report(job, force=force, **values)  # the events are rate-limited: every report is looked at
        seen[job.id].append(dict(job.progress_data))

    monkeypatch.setattr(Job, "progress", recorded)

    async def body() -> None:
        async with serving(demo, tmp_path, cache_loads=False) as orch:
            placed = await orch.loads.load(SDXL_CKPT)
            progress = seen[placed["job"]["id"]]
            steps = [p["step"] for p in progress if "step" in p]
            assert set(steps) == set(placed["result"]["components"]) and len(set(steps)) == 4
            totals: dict[str, set[int]] = defaultdict(set)
            previous = None
            for p in progress:
                if p.get("step") != previous:  # a step's first event: nothing of the step before
                    assert "done" not in p and "total" not in p, p
                    previous = p.get("step")
                if "total" in p:
                    assert p["done"] <= p["total"]
                    totals[p["step"]].add(p["total"])
            # one read per component, its own bytes: every step has one total, each its own
            assert all(len(t) == 1 for t in totals.values()), totals
            assert len({next(iter(t)) for t in totals.values()}) == len(totals) >= 3

    run(body)
