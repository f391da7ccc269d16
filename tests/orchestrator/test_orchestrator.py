"""The orchestrator's parts together, without HTTP: in-process workers (the same server and
protocol as the subprocess ones), a real SQLite registry, the demo models. Moments of contention
are made by the test, not by timing: a gate holds a device's queue until the test opens it."""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from modelkeeper.orchestrator import LoadOptions, Orchestrator, Priority
from modelkeeper.orchestrator.errors import NotPlaceable
from modelkeeper.orchestrator.state import PlacementState
from modelkeeper.orchestrator.workers import WorkerSlot
from modelkeeper.protocol.commands import CommandType
from modelkeeper.protocol.errors import ErrorCode, ProtocolError
from modelkeeper.protocol.messages import DType, UnloadRequest, UnloadResult
from modelkeeper.testing import DemoManifest

from .conftest import MiB, run, serving

SD15 = "diffusers/tiny-sd15"
CKPT = "checkpoints/tiny-sd15.safetensors"
CLIP_L = "clip/tiny-clip-l.safetensors"
UNET = "diffusers/tiny-sd15-unet"  # a UNet alone, ~6 MB

pytestmark = pytest.mark.xdist_group("orchestrator-inprocess")


class Gate:
    """Holds a device's queue: an operation that runs until the test opens the gate."""

    def __init__(self, slot: WorkerSlot) -> None:
        self.slot = slot
        self.open = asyncio.Event()
        self.task: asyncio.Task[None] | None = None

    async def __aenter__(self) -> Gate:
        deadline = asyncio.get_running_loop().time() + 3600
        self.task = asyncio.ensure_future(
            self.slot.run(self.open.wait, priority=Priority.CRITICAL, deadline=deadline, label="gate")  # type: ignore[arg-type]
        )
        while self.slot.running is None:
            await asyncio.sleep(0)
        return self

    async def until_queued(self, n: int) -> None:
        while self.slot.queue_depth < n:
            await asyncio.sleep(0.005)

    async def __aexit__(self, *exc: object) -> None:
        self.open.set()
        assert self.task is not None
        await self.task


def events(orch: Orchestrator, type: str) -> list[dict[str, Any]]:
    return [e for e in orch.bus.recent if e["type"] == type]


async def until(predicate: Callable[[], bool]) -> None:
    while not predicate():
        await asyncio.sleep(0.01)


def test_placement_coalescing_and_already_loaded(demo: DemoManifest, tmp_path: Path) -> None:
    async def body() -> None:
        async with serving(demo, tmp_path, devices=["cpu", "cpu"]) as orch:
            a = (await orch.loads.load(SD15))["result"]
            # the second device is emptier now: a new model goes there, the same model stays put
            b = (await orch.loads.load(CLIP_L))["result"]
            assert {a["device"], b["device"]} == {"cpu:0", "cpu:1"}
            again = (await orch.loads.load(SD15))["result"]
            assert again["device"] == a["device"] and again["already_loaded"]
            # six loads of one model on a held device: one worker load, five joined
            slot = orch.pool.slot("cpu:1" if a["device"] == "cpu:0" else "cpu:0")
            async with Gate(slot):
                jobs = [asyncio.ensure_future(orch.loads.load(CKPT, slot.id)) for _ in range(6)]
                await until(lambda: any(k[1] == slot.id for k in orch.loads.inflight))
            results = [r["result"] for r in await asyncio.gather(*jobs)]
            assert sum(1 for r in results if r.get("coalesced")) == 5
            ckpt = results[0]["model_id"]
            assert len([e for e in events(orch, "model.loading") if e["model_id"] == ckpt]) == 1
            assert orch.view.get(ckpt, slot.id).state is PlacementState.LOADED

    run(body)


def test_priorities_order_the_queue(demo: DemoManifest, tmp_path: Path) -> None:
    async def body() -> None:
        async with serving(demo, tmp_path) as orch:
            slot = orch.pool.slot("cpu")
            ids = {ref: (await orch.catalog.resolve(ref)).id for ref in (SD15, CKPT, CLIP_L)}
            async with Gate(slot) as gate:
                for ref, prio in ((SD15, Priority.LOW), (CKPT, Priority.NORMAL), (CLIP_L, Priority.HIGH)):
                    await orch.loads.load(ref, "cpu", options=LoadOptions(priority=prio), wait=False)
                    await gate.until_queued(len(orch.loads.inflight))
            await until(lambda: len(events(orch, "model.loaded")) == 3)
            order = [e["model_id"] for e in events(orch, "model.loading")]
            assert order == [ids[CLIP_L], ids[CKPT], ids[SD15]]

    run(body)


def test_timeout_in_the_queue(demo: DemoManifest, tmp_path: Path) -> None:
    async def body() -> None:
        async with serving(demo, tmp_path) as orch:
            async with Gate(orch.pool.slot("cpu")):
                with pytest.raises(ProtocolError) as err:
                    await orch.loads.load(CLIP_L, options=LoadOptions(timeout=0.2))
            assert err.value.code is ErrorCode.TIMEOUT
            assert orch.view.placements == {} and not orch.loads.inflight
            assert (await orch.loads.load(CLIP_L))["result"]["state"] == "loaded"  # the device serves again

    run(body)


def test_eviction_respects_leases_unless_forced(demo: DemoManifest, tmp_path: Path) -> None:
    async def body() -> None:
        async with serving(demo, tmp_path, worker_budget_mb=13) as orch:
            sd15 = await orch.catalog.resolve(SD15)
            clip = await orch.catalog.resolve(CLIP_L)
            sizes = [sum(c.bytes for c in m.components) for m in (sd15, clip)]
            assert max(sizes) < 13 * MiB < sum(sizes)  # each fits alone, not both
            await orch.loads.load(SD15)
            lease = await orch.loads.grant_lease(SD15, None, "pipeline", 60)
            with pytest.raises(
                NotPlaceable,
                match=rf"tiny-clip-l needs [\d.]+ MB; no device has room .*held by {sd15.handle}\)",
            ) as err:
                await orch.loads.load(CLIP_L)
            assert err.value.details["held"] == [sd15.id]
            assert orch.view.get(sd15.id, "cpu") is not None  # untouched
            placed = (await orch.loads.load(CLIP_L, options=LoadOptions(force=True)))["result"]
            assert placed["evicted"] == [sd15.id]
            assert orch.view.get(sd15.id, "cpu") is None and orch.leases.list() == []
            assert lease["id"] not in [x.id for x in orch.leases.list()]
            # without a lease the least recently used model just goes
            again = (await orch.loads.load(SD15))["result"]
            assert again["evicted"] == [clip.id]

    run(body)


def test_worker_killed_restarted_reconciled_kept_model_reloaded(demo: DemoManifest, tmp_path: Path) -> None:
    async def body() -> None:
        async with serving(demo, tmp_path) as orch:
            slot = orch.pool.slot("cpu")
            fp8 = LoadOptions(keep_loaded=True, storage_dtype=DType.FLOAT8_E4M3FN)
            kept = (await orch.loads.load(SD15, options=fp8))["result"]
            await orch.loads.load(CLIP_L)
            first = slot.proc
            assert first is not None
            first.kill()  # as a crash: its output ends
            await until(lambda: bool(events(orch, "worker.restarted")))
            assert slot.proc is not first and slot.restarts
            lost = {e["model_id"] for e in events(orch, "model.lost")}
            assert kept["model_id"] in lost and len(lost) == 2
            await until(
                lambda: (p := orch.view.get(kept["model_id"], "cpu")) is not None and p.state == "loaded"
            )
            assert [p.model_id for p in orch.view.on_device("cpu")] == [kept["model_id"]]  # only the kept one
            again = orch.view.get(kept["model_id"], "cpu")
            assert again is not None and again.form.storage_dtype == "float8_e4m3fn"  # in the form it had

    run(body)


def test_reconcile_drops_what_the_worker_no_longer_holds(demo: DemoManifest, tmp_path: Path) -> None:
    async def body() -> None:
        async with serving(demo, tmp_path) as orch:
            placed = (await orch.loads.load(CLIP_L))["result"]
            slot = orch.pool.slot("cpu")
            name = next(iter(placed["components"].values()))
            await slot.call(
                CommandType.UNLOAD_MODEL, UnloadRequest(name=name), UnloadResult
            )  # behind its back
            report = await orch.recovery.reconcile("cpu")
            assert report == {"lost": [placed["model_id"]], "adopted": [], "unmanaged": []}
            assert orch.view.placements == {}

    run(body)


def test_keep_alive_unloads_idle_models_and_keeps_their_segments(demo: DemoManifest, tmp_path: Path) -> None:
    async def body() -> None:
        async with serving(demo, tmp_path) as orch:
            clip = await orch.catalog.resolve(CLIP_L)
            # 0: gone as soon as nothing holds it; a lease holds it
            lease = await orch.loads.grant_lease(CLIP_L, None, "pipeline", 60)
            placed = (await orch.loads.load(CLIP_L, options=LoadOptions(keep_alive=0)))["result"]
            assert placed["keep_alive"] == 0 and placed["expires_at"] is not None
            assert orch.idle._expiring() == []  # leased: not due
            await orch.feed.wait_for_fills()
            orch.loads.release_lease(lease["id"])
            await until(lambda: any(e["reason"] == "expired" for e in events(orch, "model.unloaded")))
            assert orch.view.get(clip.id, "cpu") is None
            # its segment stayed in the RAM cache: the next load comes from RAM
            again = (await orch.loads.load(CLIP_L, options=LoadOptions(keep_alive=-1)))["result"]
            assert set(again["sources"].values()) == {"ram"} and again["expires_at"] is None

    run(body)


def test_keep_alive_waits_for_operations(demo: DemoManifest, tmp_path: Path) -> None:
    async def body() -> None:
        async with serving(demo, tmp_path, keep_alive=3600) as orch:
            placed = (await orch.loads.load(CLIP_L))["result"]
            p = orch.view.get(placed["model_id"], "cpu")
            assert p is not None and p.keep_alive == 3600
            with p.in_use():
                assert p.expires_at is None  # never due while an operation runs
            assert p.expires_at is not None and p.expires_at >= p.last_used + 3600 - 1e-6

    run(body)


def test_preload_at_start(demo: DemoManifest, tmp_path: Path) -> None:
    async def body() -> None:
        async with serving(
            demo, tmp_path, preload=[CLIP_L, {"model": SD15, "device": "cpu"}, "nope"]
        ) as orch:
            await until(lambda: orch.preload["pending"] == 0)
            assert [e["model"] for e in orch.preload["loaded"]] == [CLIP_L, SD15]
            assert [e["model"] for e in orch.preload["failed"]] == ["nope"] and not orch.preloaded
            assert all(p.keep_loaded for p in orch.view.on_device("cpu")) and len(orch.view.placements) == 2

    run(body)


def test_storage_dtype_keeps_fewer_bytes_and_placement_counts_them(
    demo: DemoManifest, tmp_path: Path
) -> None:
    async def body() -> None:
        async with serving(demo, tmp_path, cache_loads=False) as orch:
            record = await orch.catalog.resolve(SD15)
            full = (await orch.loads.load(SD15))["result"]
            await orch.loads.unload(SD15)
            fp8 = LoadOptions(storage_dtype=DType.FLOAT8_E4M3FN)
            assert fp8.stored_bytes(record) < 0.6 * LoadOptions().stored_bytes(record)
            packed = (await orch.loads.load(SD15, options=fp8))["result"]
            assert packed["bytes"] <= 0.6 * full["bytes"]

    run(body)


def test_offload_auto_places_a_model_larger_than_the_budget(demo: DemoManifest, tmp_path: Path) -> None:
    async def body() -> None:
        async with serving(demo, tmp_path, worker_budget_mb=3, cache_loads=False) as orch:
            record = await orch.catalog.resolve(UNET)
            assert LoadOptions().stored_bytes(record) > 3 * MiB  # too big for the device as a whole
            with pytest.raises(NotPlaceable):
                await orch.loads.load(UNET)
            placed = (await orch.loads.load(UNET, options=LoadOptions(offload="auto")))["result"]
            assert placed["streamed_bytes"] > 0 and placed["bytes"] <= 3 * MiB
            assert placed["bytes"] + placed["streamed_bytes"] >= LoadOptions().stored_bytes(record) * 0.9

    run(body)


def test_offload_of_a_packed_model_places_and_counts_packed_bytes(demo: DemoManifest, tmp_path: Path) -> None:
    """fp8 storage and offload together: placement needs the packed bytes' resident part, and the
    placement's streamed bytes are packed bytes (what crosses the link), as the worker reports them."""

    async def body() -> None:
        async with serving(demo, tmp_path, worker_budget_mb=0.8, cache_loads=False) as orch:
            record = await orch.catalog.resolve(UNET)
            fp8 = LoadOptions(storage_dtype=DType.FLOAT8_E4M3FN, offload="auto")
            assert fp8.stored_bytes(record) > 0.8 * MiB  # too big for the device even packed
            placed = (await orch.loads.load(UNET, options=fp8))["result"]
            assert placed["streamed_bytes"] > 0 and placed["bytes"] <= 0.8 * MiB
            whole = placed["bytes"] + placed["streamed_bytes"]
            assert whole <= 0.6 * LoadOptions().stored_bytes(record)  # fp8 bytes, not fp16
            p = orch.view.get(placed["model_id"], placed["device"])
            assert p is not None and p.streamed_bytes == placed["streamed_bytes"]

    run(body)


def test_bytes_follow_a_dtype_change(demo: DemoManifest, tmp_path: Path) -> None:
    async def body() -> None:
        async with serving(demo, tmp_path) as orch:
            placed = (await orch.loads.load(CLIP_L))["result"]
            before = placed["bytes"]
            await orch.operations.run(
                "optimize", CLIP_L, None, {"options": {"dtype": "float32"}, "measure": False}
            )
            p = orch.view.get(placed["model_id"], "cpu")
            assert p is not None and 1.9 * before < p.bytes <= 2 * before  # fp16 weights, now fp32
            await orch.operations.run("optimize", CLIP_L, None, {"revert": True, "measure": False})
            assert p.bytes == before

    run(body)


@pytest.mark.parametrize("cache_loads", [True, False])
def test_a_pickle_checkpoint_loads_on_first_use(
    demo: DemoManifest, tmp_path: Path, cache_loads: bool
) -> None:
    import torch
    from safetensors.torch import load_file

    root = tmp_path / "models"
    (root / "checkpoints").mkdir(parents=True)
    state = load_file(demo.root / CKPT)
    torch.save({"state_dict": state, "global_step": 1}, root / "checkpoints" / "tiny-sd15.ckpt")

    async def body() -> None:
        async with serving(demo, tmp_path, model_roots=[root], cache_loads=cache_loads) as orch:
            record = await orch.catalog.resolve("checkpoints/tiny-sd15.ckpt")
            # converted in the sandbox into segments, which the worker loads (it was refused as
            # UNSUPPORTED_FORMAT before, and never loaded with the cache off); the tiny file has no
            # config of its own, so each component's known SD1 config is fitted to its shapes
            result = (await orch.loads.load(record.id))["result"]
            assert set(result["components"]) == {"unet", "vae", "text_encoder"}
            assert set(result["sources"].values()) == {"ram"}
            assert any(record.id in s["models"] for s in orch.feed.segments())

    run(body)
