"""Cancellation reaches the worker's long operations: a benchmark, a validation and an optimisation
stop at their next step, an optimisation cancelled half-way leaves the module as it was, and the
worker answers the next command at once."""

from __future__ import annotations

import pytest
import torch

from modelkeeper.protocol import CommandType, ErrorCode, EventType, ProtocolError
from modelkeeper.testing import DemoManifest, make_unet
from modelkeeper.worker import InProcessWorker
from modelkeeper.worker.errors import Cancelled
from modelkeeper.worker.fingerprint import fingerprint
from modelkeeper.worker.optimize import optimize
from modelkeeper.worker.validate import validate

from .conftest import src

pytestmark = pytest.mark.usefixtures("one_torch_thread")


class StopAt:
    """A :data:`~modelkeeper.worker.validate.Step` that records each step and cancels at step ``at``."""

    def __init__(self, at: int) -> None:
        self.at = at
        self.seen: list[tuple[str, int, int]] = []

    def __call__(self, name: str, done: int, total: int) -> None:
        self.seen.append((name, done, total))
        if len(self.seen) > self.at:
            raise Cancelled("cancelled")


def test_validation_stops_between_checks() -> None:
    stop = StopAt(3)
    with pytest.raises(Cancelled):
        validate(make_unet("sd1"), "functional", step=stop)
    names = [name for name, _, _ in stop.seen]
    assert names == ["structure", "dtypes", "device", "finite"]  # the fourth check never ran
    assert {total for _, _, total in stop.seen} == {6}  # 3 header, 2 weights, 1 forward probe


def test_a_cancelled_optimisation_reverts_what_it_applied() -> None:
    module = make_unet("sd1")
    before = fingerprint(module)
    stop = StopAt(10)  # past the options, in the passes that measure the latency after them
    with pytest.raises(Cancelled):
        optimize(module, {"dtype": "float16", "channels_last": True}, step=stop)
    assert ("dtype", 0, 2) in stop.seen and ("channels_last", 1, 2) in stop.seen
    assert {p.dtype for p in module.parameters()} == {torch.float32}
    assert fingerprint(module) == before


def test_a_cancelled_benchmark_stops_at_its_next_pass_and_the_worker_serves_on(demo: DemoManifest) -> None:
    with InProcessWorker("cpu") as w:
        w.call(CommandType.LOAD_ENCODER, {"name": "l", **src(demo, "clip-l")})
        events = w.subscribe()
        pending = w.submit(
            CommandType.BENCHMARK_MODEL, {"name": "l", "steps": 10_000, "warmup": 0}, request_id="bench"
        )
        first = events.get(timeout=60)
        while first.event is not EventType.PROGRESS or first.request_id != "bench":
            first = events.get(timeout=60)
        assert first.data == {"stage": "forward", "done": 0, "total": 10_000, "unit": "steps"}
        assert w.call(CommandType.CONTROL_CANCEL, {"target_request_id": "bench"})["state"] == "running"
        with pytest.raises(ProtocolError) as info:
            pending.result(60)
        assert info.value.code is ErrorCode.CANCELLED
        status = w.call(CommandType.GET_STATUS, timeout=5)  # the device thread is free again
        assert status["state"] == "idle" and status["running"] is None
        assert w.call(CommandType.VALIDATE_MODEL, {"name": "l"}, timeout=60)["passed"] is True
