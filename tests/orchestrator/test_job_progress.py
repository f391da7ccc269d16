"""What a job shows while it runs: each progress event carries its own component's step and
bytes (none of the previous component's left under the next), and a job that waits in a device's
queue is ``queued`` until its worker command starts."""

from __future__ import annotations

from collections import defaultdict
from pathlib import Path
from typing import Any

import pytest

from modelkeeper.orchestrator.jobs import Job, JobState
from modelkeeper.testing import DemoManifest

from .conftest import run, serving
from .test_orchestrator import CLIP_L, SD15, Gate

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


def test_a_job_waiting_in_a_devices_queue_is_queued_until_its_worker_command_starts(
    demo: DemoManifest, tmp_path: Path
) -> None:
    async def body() -> None:
        async with serving(demo, tmp_path, cache_loads=False) as orch:
            await orch.loads.load(CLIP_L)
            async with Gate(orch.pool.slot("cpu")) as gate:  # the device is busy with something else
                posted = [
                    (
                        await orch.operations.run(
                            "benchmark", CLIP_L, None, {"steps": 1, "warmup": 0}, wait=False
                        )
                    )
                    for _ in range(3)
                ]
                posted.append(await orch.loads.load(SD15, wait=False))
                await gate.until_queued(4)
                jobs = [orch.jobs.get(p["job"]["id"]) for p in posted]
                assert [j.state for j in jobs] == [JobState.QUEUED] * 4
                assert all(j.started_at is None for j in jobs)
                assert {j.id for j in orch.jobs.list(state="queued")} >= {j.id for j in jobs}
                assert orch.jobs.counts()["queued"] >= 4
            for j in jobs:
                await orch.jobs.wait(j)
                assert j.state is JobState.SUCCEEDED and j.started_at is not None
                states = [
                    e["type"] for e in orch.bus.recent if e["type"] != "job.progress" and e.get("job") == j.id
                ]
                assert states[:2] == ["job.queued", "job.running"] and states[-1] == "job.succeeded"

    run(body)
