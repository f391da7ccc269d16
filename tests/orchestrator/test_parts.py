"""The orchestrator's parts on their own: settings, jobs, leases, the per-device queue, devices."""

from __future__ import annotations

import asyncio
import time
from pathlib import Path

import pytest
from pydantic import ValidationError

from modelkeeper.orchestrator import JobState, Settings
from modelkeeper.orchestrator.errors import JobNotFound, LeaseNotFound
from modelkeeper.orchestrator.events import EventBus
from modelkeeper.orchestrator.jobs import JobManager
from modelkeeper.orchestrator.leases import LeaseTable
from modelkeeper.orchestrator.workers import Priority, WorkerSlot, expand_devices
from modelkeeper.protocol.errors import ErrorCode, ProtocolError


def test_settings_from_environment_and_file(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("MODELKEEPER_PORT", "9001")
    monkeypatch.setenv("MODELKEEPER_MODEL_ROOTS", '["/srv/models", "/data/loras"]')
    config = tmp_path / "modelkeeper.toml"
    config.write_text('devices = ["cpu", "cpu"]\nram_cache_bytes = 1048576\nport = 7000\n')
    monkeypatch.setenv("MODELKEEPER_CONFIG", str(config))
    s = Settings()
    assert s.port == 9001  # the environment beats the file
    assert s.model_roots == [Path("/srv/models"), Path("/data/loras")]
    assert s.devices == ["cpu", "cpu"] and s.ram_cache_bytes == 1 << 20
    assert Settings(port=1234).port == 1234  # arguments beat both
    assert s.public()["token"] is None and Settings(token="x").public()["token"] == "***"


@pytest.mark.parametrize(
    ("field", "value"), [("devices", ["tpu"]), ("devices", []), ("port", 70000), ("colour", "blue")]
)
def test_settings_reject_bad_values(field: str, value: object) -> None:
    with pytest.raises(ValidationError) as err:
        Settings(**{field: value})
    assert field in str(err.value)


def test_expand_devices_names_duplicates() -> None:
    assert expand_devices(["cpu"]) == [("cpu", "cpu")]
    assert expand_devices(["cpu", "cpu"]) == [("cpu:0", "cpu"), ("cpu:1", "cpu")]
    assert expand_devices(["cuda:1", "cpu"]) == [("cuda:1", "cuda:1"), ("cpu", "cpu")]


def test_jobs_progress_result_error_cancel() -> None:
    async def run() -> None:
        bus = EventBus()
        bus.bind(asyncio.get_running_loop())
        jobs = JobManager(bus, keep=10)
        seen: list[str] = []

        async def listen() -> None:
            async for ev in bus.subscribe():
                seen.append(ev["type"])

        listener = asyncio.create_task(listen())
        await asyncio.sleep(0)

        async def work(job):  # type: ignore[no-untyped-def]
            job.progress(done=1, total=2, force=True)
            await asyncio.sleep(0.01)
            return {"answer": 42}

        ok = jobs.submit("demo", work)
        assert await jobs.wait(ok) == {"answer": 42}
        assert ok.state is JobState.SUCCEEDED and ok.progress_data == {"done": 1, "total": 2}

        async def fail(job):  # type: ignore[no-untyped-def]
            raise ProtocolError("no room", ErrorCode.INSUFFICIENT_MEMORY, device="cpu")

        bad = jobs.submit("demo", fail)
        with pytest.raises(ProtocolError) as err:
            await jobs.wait(bad)
        assert err.value.code is ErrorCode.INSUFFICIENT_MEMORY
        assert bad.error == {
            "error_code": "INSUFFICIENT_MEMORY",
            "error": "no room",
            "details": {"device": "cpu"},
        }

        hooked: list[bool] = []

        async def slow(job):  # type: ignore[no-untyped-def]
            job.on_cancel(lambda: hooked.append(True))
            await asyncio.sleep(30)

        long = jobs.submit("demo", slow)
        await asyncio.sleep(0.01)
        jobs.cancel(long.id)
        with pytest.raises(ProtocolError) as cancelled:
            await jobs.wait(long)
        assert cancelled.value.code is ErrorCode.CANCELLED and hooked == [True]
        assert long.state is JobState.CANCELLED
        assert jobs.counts() == {"queued": 0, "running": 0, "succeeded": 1, "failed": 1, "cancelled": 1}
        assert [j.id for j in jobs.list()] == [long.id, bad.id, ok.id]
        with pytest.raises(JobNotFound):
            jobs.get("j-none")
        await asyncio.sleep(0.01)
        listener.cancel()
        assert {
            "job.queued",
            "job.running",
            "job.progress",
            "job.succeeded",
            "job.failed",
            "job.cancelled",
        } <= set(seen)

    asyncio.run(run())


def test_finished_jobs_are_trimmed() -> None:
    async def run() -> None:
        jobs = JobManager(EventBus(), keep=10)

        async def noop(job):  # type: ignore[no-untyped-def]
            return None

        for _ in range(25):
            await jobs.wait(jobs.submit("demo", noop))
        assert len(jobs.list(limit=100)) <= 11

    asyncio.run(run())


def test_leases_expire_renew_release() -> None:
    table = LeaseTable()
    # a long first term: however slow this machine, nothing expires before the renewal shortens it
    a = table.grant("m-1", None, "pipeline", ttl=60)
    b = table.grant("m-1", "cuda:1", "other", ttl=60)
    assert {x.id for x in table.holding("m-1", "cuda:0")} == {a.id}
    assert {x.id for x in table.holding("m-1", "cuda:1")} == {a.id, b.id}
    table.renew(a.id, ttl=0.01)
    time.sleep(0.05)  # past a's new term, whatever else happens meanwhile
    assert [x.id for x in table.list()] == [b.id]
    with pytest.raises(LeaseNotFound):
        table.renew(a.id)
    assert table.release(b.id).id == b.id and table.list() == []


def test_device_queue_runs_by_priority_and_times_out_in_queue() -> None:
    async def run() -> None:
        slot = WorkerSlot(
            "cpu", "cpu", args=[], start_timeout=1, on_event=lambda s, e: None, on_exit=lambda s, c: None
        )
        slot._runner = asyncio.create_task(slot._run_queue())
        order: list[str] = []

        def op(name: str, seconds: float = 0.05):  # type: ignore[no-untyped-def]
            async def go() -> str:
                order.append(name)
                await asyncio.sleep(seconds)
                return name

            return go

        far = time.monotonic() + 30
        first = asyncio.create_task(
            slot.run(op("first", 0.2), priority=Priority.NORMAL, deadline=far, label="a")
        )
        await asyncio.sleep(0.01)
        low = asyncio.create_task(slot.run(op("low"), priority=Priority.LOW, deadline=far, label="b"))
        normal = asyncio.create_task(
            slot.run(op("normal"), priority=Priority.NORMAL, deadline=far, label="c")
        )
        high = asyncio.create_task(slot.run(op("high"), priority=Priority.CRITICAL, deadline=far, label="d"))
        late = asyncio.create_task(
            slot.run(op("late"), priority=Priority.LOW, deadline=time.monotonic() + 0.05, label="e")
        )
        await asyncio.gather(first, low, normal, high)
        with pytest.raises(ProtocolError) as err:
            await late
        assert err.value.code is ErrorCode.TIMEOUT
        assert order == ["first", "high", "normal", "low"]
        slot._runner.cancel()

    asyncio.run(run())


def test_which_folder_file_a_segment_is_filled_from(tmp_path: Path) -> None:
    """The orchestrator picks the weight file a worker would load (formats.folders): the variant
    when asked, none for a sharded folder or one without safetensors weights."""
    from modelkeeper.orchestrator.loading import _folder_weight_file

    plain = tmp_path / "plain"
    plain.mkdir()
    (plain / "diffusion_pytorch_model.safetensors").write_bytes(b"x")
    (plain / "diffusion_pytorch_model.fp16.safetensors").write_bytes(b"x")
    assert _folder_weight_file(plain, None) == plain / "diffusion_pytorch_model.safetensors"
    assert _folder_weight_file(plain, "fp16") == plain / "diffusion_pytorch_model.fp16.safetensors"
    assert _folder_weight_file(plain, "bf16") is None
    sharded = tmp_path / "sharded"
    sharded.mkdir()
    for i in (1, 2):
        (sharded / f"model-0000{i}-of-00002.safetensors").write_bytes(b"x")
    (sharded / "model.safetensors.index.json").write_text(
        '{"weight_map": {"a": "model-00001-of-00002.safetensors", "b": "model-00002-of-00002.safetensors"}}'
    )
    assert _folder_weight_file(sharded, None) is None
    pickles = tmp_path / "pickles"
    pickles.mkdir()
    (pickles / "pytorch_model.bin").write_bytes(b"x")
    assert _folder_weight_file(pickles, None) is None
