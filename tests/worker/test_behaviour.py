"""Budget and eviction, queries during a load, cancellation, memory optimisation, shutdown."""

from __future__ import annotations

import time

import pytest

from modelkeeper.protocol import CommandType, ErrorCode, EventType, ProtocolError, WorkerProcess
from modelkeeper.testing import DemoManifest

from .conftest import src

MiB = 1024 * 1024


def _unet(demo: DemoManifest, name: str) -> dict[str, object]:
    return {"name": name, **src(demo, "sdxl-unet")}


def test_budget_refuses_then_evicts_least_recently_used(demo: DemoManifest, worker_device: str) -> None:
    size = demo["sdxl-unet"].size_bytes
    budget_mb = 2.5 * size / MiB  # room for two UNets, not three
    with WorkerProcess(worker_device, args=["--budget-mb", str(budget_mb)]) as w:
        events = w.subscribe()
        w.call(CommandType.LOAD_UNET, _unet(demo, "a"))
        w.call(CommandType.LOAD_UNET, _unet(demo, "b"))
        w.call(CommandType.GET_MODEL_INFO, {"name": "a"})  # info does not count as use
        with pytest.raises(ProtocolError) as info:
            w.call(CommandType.LOAD_UNET, _unet(demo, "c"))
        assert info.value.code is ErrorCode.INSUFFICIENT_MEMORY
        assert "allow_evict" in info.value.message
        assert info.value.details["required_bytes"] > info.value.details["free_budget_bytes"]
        assert {m["name"] for m in w.call(CommandType.GET_MODEL_INFO)["models"]} == {"a", "b"}
        result = w.call(CommandType.LOAD_UNET, {**_unet(demo, "c"), "allow_evict": True})
        assert result["evicted"] == ["a"]
        assert {m["name"] for m in w.call(CommandType.GET_MODEL_INFO)["models"]} == {"b", "c"}
        seen = []
        while not events.empty():
            seen.append(events.get_nowait())
        assert any(e.event is EventType.STATE and e.data == {"name": "a", "state": "unloaded", "reason": "evicted"}
                   for e in seen)  # fmt: skip
        assert any(e.event is EventType.PROGRESS for e in seen)


def test_too_big_for_the_whole_budget_evicts_nothing(demo: DemoManifest, worker_device: str) -> None:
    budget_mb = 1.5 * demo["sd15-vae"].size_bytes / MiB  # one VAE fits, a UNet never does
    assert demo["sdxl-unet"].size_bytes > budget_mb * MiB
    with WorkerProcess(worker_device, args=["--budget-mb", str(budget_mb)]) as w:
        w.call(CommandType.LOAD_VAE, {"name": "v", **src(demo, "sd15-vae")})
        with pytest.raises(ProtocolError) as info:
            w.call(CommandType.LOAD_UNET, {**_unet(demo, "big"), "allow_evict": True})
        assert info.value.code is ErrorCode.INSUFFICIENT_MEMORY
        assert w.call(CommandType.GET_MODEL_INFO)["model_count"] == 1


def test_queries_are_answered_while_a_load_runs_and_cancel_stops_it(
    demo: DemoManifest, worker_device: str
) -> None:
    size_mb = demo["clip-g"].size_bytes / MiB
    rate = size_mb / 5  # the read takes about 5 s
    with WorkerProcess(worker_device, args=["--throttle-mb-s", str(rate)]) as w:
        pending = w.submit(CommandType.LOAD_ENCODER, {"name": "g", **src(demo, "clip-g")}, request_id="slow")
        deadline = time.monotonic() + 90
        status = w.call(CommandType.GET_STATUS)
        while status["state"] != "busy" or not status["running"]["progress"]:
            assert time.monotonic() < deadline, status
            time.sleep(0.05)
            status = w.call(CommandType.GET_STATUS)
        assert status["running"]["request_id"] == "slow"
        assert status["running"]["progress"]["total"] > 0
        info = w.call(CommandType.GET_MODEL_INFO)
        assert info["model_count"] == 0
        # answered while the load still ran (a state, not a stopwatch: a busy machine is slow)
        assert w.call(CommandType.GET_STATUS)["running"]["request_id"] == "slow"
        queued = w.submit(CommandType.LOAD_VAE, {"name": "v", **src(demo, "sd15-vae")}, request_id="queued")
        assert w.call(CommandType.GET_STATUS)["queued"] == 1
        assert w.call(CommandType.CONTROL_CANCEL, {"target_request_id": "queued"})["state"] == "queued"
        assert w.call(CommandType.CONTROL_CANCEL, {"target_request_id": "slow"})["state"] == "running"
        for fut in (pending, queued):
            with pytest.raises(ProtocolError) as err:
                fut.result(10)
            assert err.value.code is ErrorCode.CANCELLED
        assert not pending.done() or w.call(CommandType.GET_MODEL_INFO)["model_count"] == 0
        assert w.call(CommandType.CONTROL_CANCEL, {"target_request_id": "nope"})["found"] is False
        # the worker keeps serving after a cancellation
        w.call(CommandType.LOAD_VAE, {"name": "v", **src(demo, "sd15-vae")})
        assert w.call(CommandType.GET_STATUS)["state"] == "idle"


def test_optimize_memory_unloads_lru_down_to_target_and_cleanup_unloads_all(
    worker: WorkerProcess, demo: DemoManifest
) -> None:
    worker.call(CommandType.LOAD_VAE, {"name": "v1", **src(demo, "sd15-vae")})
    worker.call(CommandType.LOAD_VAE, {"name": "v2", **src(demo, "sdxl-vae")})
    worker.call(CommandType.LOAD_UNET, {"name": "u", **src(demo, "sd15-unet")})
    plain = worker.call(CommandType.OPTIMIZE_MEMORY)
    assert plain["unloaded"] == []
    assert plain["target_met"] is True
    budget_free = plain["memory_after"]["budget_bytes"] - plain["memory_after"]["models_bytes"]
    want = (budget_free + 1) / MiB  # one byte more than is free: the oldest model must go
    result = worker.call(CommandType.OPTIMIZE_MEMORY, {"target_free_mb": want, "keep": ["v1"]})
    assert result["unloaded"] == ["v2"]
    assert result["freed_bytes"] > 0
    assert (
        result["memory_before"]["models_bytes"] - result["memory_after"]["models_bytes"]
        == result["freed_bytes"]
    )
    cleaned = worker.call(CommandType.CLEANUP)
    assert sorted(cleaned["unloaded"]) == ["u", "v1"]
    assert cleaned["memory_after"]["models_bytes"] == 0


def test_already_loaded_and_replace(worker: WorkerProcess, demo: DemoManifest) -> None:
    worker.call(CommandType.LOAD_VAE, {"name": "x", **src(demo, "sd15-vae")})
    with pytest.raises(ProtocolError) as info:
        worker.call(CommandType.LOAD_VAE, {"name": "x", **src(demo, "sdxl-vae")})
    assert info.value.code is ErrorCode.ALREADY_LOADED
    worker.call(CommandType.LOAD_VAE, {"name": "x", **src(demo, "flux-vae"), "replace": True})
    models = worker.call(CommandType.GET_MODEL_INFO)["models"]
    assert [m["source"]["path"] for m in models] == [str(demo.path("flux-vae"))]
    worker.call(CommandType.CLEANUP)


def test_shutdown_exits_cleanly(worker_device: str) -> None:
    w = WorkerProcess(worker_device)
    assert w.call(CommandType.WORKER_SHUTDOWN) == {"stopping": True}
    assert w.process.wait(30) == 0
    w.close()


def test_end_of_input_finishes_queued_work_then_stops(worker_device: str, demo: DemoManifest) -> None:
    w = WorkerProcess(worker_device)
    first = w.submit(CommandType.LOAD_VAE, {"name": "v", **src(demo, "sdxl-vae")})
    second = w.submit(CommandType.GET_MODEL_INFO)
    assert w.process.stdin is not None
    w.process.stdin.close()
    assert first.result(60)["name"] == "v"
    assert second.result(60)["model_count"] in (0, 1)
    assert w.process.wait(30) == 0
    w.close()
