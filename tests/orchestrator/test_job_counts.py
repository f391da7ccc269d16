"""Job counts by state are kept as jobs move (the status snapshot reads them after every event):
they must equal a count over the jobs kept, through success, failure, cancel and trimming."""

from __future__ import annotations

import asyncio
from collections import Counter

from modelkeeper.orchestrator.events import EventBus
from modelkeeper.orchestrator.jobs import Job, JobManager
from modelkeeper.protocol.errors import ErrorCode, ProtocolError


def recount(jobs: JobManager) -> dict[str, int]:
    seen = Counter(j.state.value for j in jobs.list(limit=10_000))
    return {s: seen.get(s, 0) for s in ("queued", "running", "succeeded", "failed", "cancelled")}


def test_counts_follow_every_move_and_the_trim() -> None:
    async def run() -> None:
        bus = EventBus()
        bus.bind(asyncio.get_running_loop())
        jobs = JobManager(bus, keep=10)
        gate = asyncio.Event()

        async def ok(job: Job) -> str:
            return "done"

        async def bad(job: Job) -> None:
            raise ProtocolError("no", ErrorCode.INVALID_REQUEST)

        async def held(job: Job) -> None:
            await gate.wait()

        waiting = jobs.submit("load", held)
        assert jobs.counts() == recount(jobs) and jobs.counts()["queued"] == 1
        await asyncio.sleep(0)
        assert jobs.counts()["running"] == 1 == recount(jobs)["running"]
        for i in range(30):  # past `keep`: the oldest finished ones are forgotten
            jobs.submit("scan", ok if i % 3 else bad)
            await asyncio.sleep(0)
            assert jobs.counts() == recount(jobs)
        doomed = jobs.submit("load", held)
        await asyncio.sleep(0)
        jobs.cancel(doomed.id)
        await asyncio.gather(doomed.task, return_exceptions=True)  # type: ignore[arg-type]
        gate.set()
        await asyncio.wait({waiting.task})  # type: ignore[arg-type]
        counts = jobs.counts()
        assert counts == recount(jobs) and counts["cancelled"] == 1 and counts["running"] == 0
        assert sum(counts.values()) == len(jobs.list(limit=10_000)) <= 11

    asyncio.run(run())
