"""A cancelled operation on a device ends when the worker has stopped, not before: the slot tells
the worker to cancel and waits for its answer, so the device's next operation never queues behind
work the caller gave up on (an in-process worker whose benchmark steps block on an event)."""

from __future__ import annotations

import asyncio
import threading

import pytest

from modelkeeper.orchestrator.workers import Priority, WorkerSlot
from modelkeeper.protocol import CommandType
from modelkeeper.protocol.messages import (
    COMMAND_MODELS,
    BenchmarkModelRequest,
    LoadRequest,
    LoadResult,
    StatusResult,
)
from modelkeeper.testing import DemoManifest
from modelkeeper.worker import InProcessWorker, records
from modelkeeper.worker.records import Operation
from tests.worker.conftest import src


def test_a_cancelled_benchmark_ends_once_the_worker_stopped(
    demo: DemoManifest, monkeypatch: pytest.MonkeyPatch
) -> None:
    in_step, release = threading.Event(), threading.Event()
    blocked: list[Operation] = []
    plain_step = Operation.step

    def gated(op: Operation, stage: str, done: int, total: int) -> None:
        if op.type == CommandType.BENCHMARK_MODEL and done == 1:  # the second pass waits for the test
            blocked.append(op)
            in_step.set()
            release.wait(60)
        plain_step(op, stage, done, total)

    monkeypatch.setattr(records.Operation, "step", gated)

    async def scenario() -> None:
        slot = WorkerSlot("cpu", "cpu", args=[], start_timeout=60, factory=InProcessWorker.start)
        await slot.start()
        try:
            await slot.call(
                CommandType.LOAD_ENCODER, LoadRequest.model_validate({"name": "l", **src(demo, "clip-l")}),
                LoadResult, timeout=60,
            )  # fmt: skip

            async def bench() -> object:
                return await slot.call(
                    CommandType.BENCHMARK_MODEL,
                    BenchmarkModelRequest(name="l", steps=10_000, warmup=0),
                    COMMAND_MODELS[CommandType.BENCHMARK_MODEL][1],
                    timeout=120,
                )

            loop = asyncio.get_running_loop()
            job = loop.create_task(
                slot.run(bench, priority=Priority.NORMAL, deadline=loop.time() + 120, label="benchmark l")
            )
            assert await asyncio.to_thread(in_step.wait, 60)
            job.cancel()
            assert await asyncio.to_thread(blocked[0].cancelled.wait, 30)  # the worker was told
            for _ in range(20):  # every callback the cancel set off has run...
                await asyncio.sleep(0)
            assert not job.done()  # ...and the job still waits for the worker, in its step
            assert slot.running is not None
            release.set()
            with pytest.raises(asyncio.CancelledError):
                await asyncio.wait_for(job, 30)
            assert slot.running is None
            status = await slot.status(timeout=5)  # answered at once: the device thread is free
            assert isinstance(status, StatusResult)
            assert status.state == "idle" and status.running is None
        finally:
            release.set()
            await slot.stop()

    asyncio.run(scenario())
