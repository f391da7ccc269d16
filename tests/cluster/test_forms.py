"""Loading a model already loaded, in cluster mode (docs/SERVICE.md "Loading a model already
loaded"), with two plain node agents behind the driver (no Ray, as ``test_shared_parts``): a load
in another dtype, storage dtype or offload than the model has on its ``node/device`` is refused
before any job (409 ALREADY_LOADED, naming ``node/device``), the same form returns the placement,
and ``reload`` unloads it and loads it again on the node that holds it (not where a fresh load
would go), honouring the driver's leases unless ``force``. Status shows the form as one host does.
A load of another form while one is in flight on the device is refused; one asking nothing joins."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import replace
from pathlib import Path

import pytest

from modelkeeper.cluster.agent import NodeAgent
from modelkeeper.cluster.service import ClusterOrchestrator
from modelkeeper.cluster.settings import ClusterSettings
from modelkeeper.orchestrator import LoadedDifferently, LoadOptions, Settings
from modelkeeper.protocol.errors import ErrorCode, ProtocolError
from modelkeeper.protocol.messages import DType
from modelkeeper.testing import DemoManifest
from tests.cluster.test_agent import node_settings
from tests.cluster.test_shared_parts import attach
from tests.orchestrator.test_orchestrator import Gate, until

CLIP_L = "clip/tiny-clip-l.safetensors"
CKPT = "checkpoints/tiny-sd15.safetensors"
LORA = "loras/tiny-sd15-kohya.safetensors"
FP8 = LoadOptions(storage_dtype=DType.FLOAT8_E4M3FN)


@asynccontextmanager
async def cluster(demo: DemoManifest, tmp_path: Path) -> AsyncIterator[ClusterOrchestrator]:
    """A driver with two nodes that both have the models' files; node a has the more room, so a
    fresh load goes there."""
    agents = {
        name: NodeAgent(
            name,
            {**node_settings(demo, tmp_path / name, (CLIP_L, CKPT, LORA)), "worker_budget_mb": budget},
            workers="inprocess",
        )
        for name, budget in (("node-a", 256), ("node-b", 128))
    }
    driver = ClusterOrchestrator(Settings(), ClusterSettings(workers="inprocess"))
    driver.bus.bind(asyncio.get_running_loop())
    driver.ready = True
    try:
        for name, agent in agents.items():
            await attach(driver, name, agent)
        yield driver
    finally:
        for agent in agents.values():
            await agent.stop()


def load_jobs(driver: ClusterOrchestrator) -> int:
    return len(driver.jobs.list(kind="load"))


def test_another_form_is_refused_or_reloaded_on_the_node_that_holds_it(
    demo: DemoManifest, tmp_path: Path
) -> None:
    async def body() -> None:
        async with cluster(demo, tmp_path) as driver:
            first = (await driver.loads.load(CLIP_L, "node-b/cpu"))["result"]
            loaded_as = first["dtype"]
            assert loaded_as in ("float16", "float32") and first["storage_dtype"] is None
            # status shows the form as one host does (the node's whole form is the driver's alone)
            (shown,) = driver.views.device("node-b/cpu")["models"]
            assert (shown["dtype"], shown["storage_dtype"], shown["offload"]) == (loaded_as, None, "none")
            assert "form" not in shown and "shares" not in shown
            # the same form, spelled out or left out: the placement, keep_alive updated
            again = await driver.loads.load(CLIP_L, options=LoadOptions(dtype=DType(loaded_as), keep_alive=7))
            assert again["result"]["already_loaded"] and again["result"]["device"] == "node-b/cpu"
            assert again["result"]["keep_alive"] == 7
            jobs = load_jobs(driver)
            for other in (LoadOptions(dtype=DType.BFLOAT16), FP8, LoadOptions(offload=1000)):
                for device in (None, "node-b/cpu"):
                    with pytest.raises(LoadedDifferently) as refused:
                        await driver.loads.load(CLIP_L, device, options=other)
                    assert refused.value.code is ErrorCode.ALREADY_LOADED
                    assert f"tiny-clip-l is loaded on node-b/cpu as {loaded_as}" in refused.value.message
                    assert refused.value.details["model_id"] == first["model_id"]  # the cluster key
                    assert refused.value.details["device"] == "node-b/cpu"
            assert load_jobs(driver) == jobs  # refused before any job
            # on another device the model is not loaded: loaded there in the form asked for
            elsewhere = (await driver.loads.load(CLIP_L, "node-a/cpu", options=FP8))["result"]
            assert elsewhere["storage_dtype"] == "float8_e4m3fn" and "reloaded" not in elsewhere
            gone = await driver.loads.unload(CLIP_L, "node-a/cpu")
            assert gone["handle"] == gone["unloaded"][0]["handle"] == first["handle"] == "tiny-clip-l"

            # reload: unloaded and loaded again where it is, though a fresh load would go to node a
            reloaded = (await driver.loads.load(CLIP_L, options=replace(FP8, reload=True)))["result"]
            assert reloaded["device"] == "node-b/cpu" and reloaded["storage_dtype"] == "float8_e4m3fn"
            assert reloaded["reloaded"] == {"dtype": loaded_as, "storage_dtype": None, "offload": "none"}
            assert reloaded["bytes"] <= 0.6 * first["bytes"] and "already_loaded" not in reloaded
            assert [p["device"] for p in driver.view.placements(first["model_id"])] == ["node-b/cpu"]
            unloaded = [e for e in driver.bus.recent if e["type"] == "model.unloaded"]
            assert [e["device"] for e in unloaded] == ["node-a/cpu", "node-b/cpu"]
            (shown,) = driver.views.device("node-b/cpu")["models"]
            assert shown["storage_dtype"] == "float8_e4m3fn"
            plain = (await driver.loads.load(CLIP_L))["result"]  # asks for nothing: returned as it is
            assert plain["already_loaded"] and plain["storage_dtype"] == "float8_e4m3fn"

            # a reload asking for nothing new (what it leaves out keeps its value): returned as it is
            same = (await driver.loads.load(CLIP_L, options=LoadOptions(reload=True)))["result"]
            assert same["already_loaded"] and "reloaded" not in same
            # reload honours the driver's leases: a leased model is not unloaded without force
            lease = await driver.loads.grant_lease(CLIP_L, None, "pipeline", 60)
            back = LoadOptions(dtype=DType.BFLOAT16, reload=True)
            with pytest.raises(ProtocolError) as held:
                await driver.loads.load(CLIP_L, options=back)
            assert held.value.code is ErrorCode.BUSY and lease["id"] in held.value.details["leases"]
            back.force = True
            forced = (await driver.loads.load(CLIP_L, options=back))["result"]
            # the storage dtype it left out is kept: the reload changed only the dtype
            assert forced["device"] == "node-b/cpu" and forced["dtype"] == "bfloat16"
            assert forced["storage_dtype"] == "float8_e4m3fn" and forced["dropped_loras"] == []
            assert forced["reloaded"]["storage_dtype"] == "float8_e4m3fn"
            assert driver.leases.holding(first["model_id"], "node-b/cpu") == []  # revoked by force

    asyncio.run(asyncio.wait_for(body(), 120))


def test_a_reload_names_the_loras_it_drops_and_keeps_what_it_leaves_out(
    demo: DemoManifest, tmp_path: Path
) -> None:
    """As on one host: the 409 names the form in words and the LoRAs a reload would drop; an
    offload that streamed nothing is the form of none; the reload keeps the storage dtype and
    offload it leaves out, and lists the LoRAs it dropped."""

    async def body() -> None:
        async with cluster(demo, tmp_path) as driver:
            asked = replace(FP8, offload=4_000_000_000)
            first = (await driver.loads.load(CKPT, "node-b/cpu", options=asked))["result"]
            loaded_as = first["dtype"]
            lora = await driver.catalog.resolve(LORA)
            await driver.loras.apply(CKPT, LORA, strength=0.5)
            applied = [{"lora_id": lora.key, "handle": lora.handle, "strength": 0.5}]
            with pytest.raises(LoadedDifferently) as refused:
                await driver.loads.load(CKPT, options=LoadOptions(dtype=DType.BFLOAT16))
            message = refused.value.message
            assert f"on node-b/cpu as {loaded_as}, stored as float8_e4m3fn, offload 4.0 GB;" in message
            assert f"a reload drops its LoRAs {lora.handle} (strength 0.5): apply them again" in message
            assert refused.value.details["loras"] == applied
            # its 4 GB offload streamed nothing: placed whole, as no offload places it (forms.py)
            for alike in ("none", "auto"):
                plain = (await driver.loads.load(CKPT, options=LoadOptions(offload=alike)))["result"]
                assert plain["already_loaded"] and plain["device"] == "node-b/cpu"
            reloaded = (
                await driver.loads.load(CKPT, options=LoadOptions(dtype=DType.BFLOAT16, reload=True))
            )["result"]
            assert reloaded["device"] == "node-b/cpu" and reloaded["dtype"] == "bfloat16"
            assert reloaded["storage_dtype"] == "float8_e4m3fn" and reloaded["offload"] == 4_000_000_000
            assert reloaded["loras"] == {} and reloaded["dropped_loras"] == applied

    asyncio.run(asyncio.wait_for(body(), 120))


def test_another_form_in_flight_is_refused_and_the_same_joins(demo: DemoManifest, tmp_path: Path) -> None:
    async def body() -> None:
        async with cluster(demo, tmp_path) as driver:
            node = driver.members.links["node-a"]
            agent = node.actor.agent  # the node's own queue, held by the test
            async with Gate(agent.service.pool.slot("cpu")):
                first = asyncio.ensure_future(driver.loads.load(CKPT, "node-a/cpu", options=FP8))
                await until(lambda: bool(driver.loads.pending))
                with pytest.raises(
                    LoadedDifferently, match="is being loaded on node-a/cpu as the file's dtype, stored as"
                ):
                    await driver.loads.load(CKPT, options=LoadOptions(dtype=DType.BFLOAT16))
                plain = asyncio.ensure_future(driver.loads.load(CKPT, "node-a/cpu"))  # joins
                await until(lambda: len(driver.jobs.list(kind="load")) == 2)
            results = [r["result"] for r in await asyncio.gather(first, plain)]
            assert [bool(r.get("coalesced")) for r in results] == [False, True]
            assert {r["storage_dtype"] for r in results} == {"float8_e4m3fn"}
            assert driver.loads.pending == {}

    asyncio.run(asyncio.wait_for(body(), 120))
