"""Loading a model already loaded: the same form returns it (keep_alive updated), another dtype,
storage dtype or offload is refused before any job (409 ALREADY_LOADED) or, with reload, reloaded;
concurrent loads of one form still coalesce, one of another form is refused. An offloaded model
counts its resident weights and ring the same in its load result, status and unload. A lease
taken ahead of a load says that the model is not loaded yet. Requests the
caller must fix are refused before any job: a LoRA or embedding loaded or cached, a file gone, a
an optimize with nothing (or something unknown) to apply, a LoRA of
another base."""

from __future__ import annotations

import asyncio
import shutil
from dataclasses import replace
from pathlib import Path

import pytest

from modelkeeper.orchestrator import LoadedDifferently, LoadOptions, NotLoadable, NotLoaded, Orchestrator
from modelkeeper.orchestrator.loras import naming
from modelkeeper.protocol.errors import ErrorCode, ProtocolError
from modelkeeper.protocol.messages import DType
from modelkeeper.testing import DemoManifest

from .conftest import run, serving
from .test_orchestrator import Gate, until

SD15 = "diffusers/tiny-sd15"
CKPT = "checkpoints/tiny-sd15.safetensors"
CLIP_L = "clip/tiny-clip-l.safetensors"
UNET = "diffusers/tiny-sd15-unet"
LORA_SD15 = "loras/tiny-sd15-kohya.safetensors"
LORA_SDXL = "loras/tiny-sdxl-kohya.safetensors"
EMBEDDING = "embeddings/tiny-sd15-a1111.safetensors"
VAE = "vae/tiny-sd15-vae.safetensors"
FP8 = LoadOptions(storage_dtype=DType.FLOAT8_E4M3FN)

pytestmark = pytest.mark.xdist_group("orchestrator-inprocess")


def load_jobs(orch: Orchestrator) -> int:
    return len(orch.jobs.list(kind="load"))


def test_another_form_is_refused_or_reloaded_and_the_same_form_returned(
    demo: DemoManifest, tmp_path: Path
) -> None:
    async def body() -> None:
        async with serving(demo, tmp_path, cache_loads=False) as orch:
            first = (await orch.loads.load(CLIP_L))["result"]
            loaded_as = first["dtype"]
            assert loaded_as in ("float16", "float32") and first["storage_dtype"] is None
            assert first["offload"] == "none"
            # the same form, spelled out or left out: the placement, keep_alive updated
            again = await orch.loads.load(CLIP_L, options=LoadOptions(dtype=DType(loaded_as), keep_alive=7))
            assert again["result"]["already_loaded"] and again["result"]["keep_alive"] == 7
            jobs = load_jobs(orch)
            for other in (LoadOptions(dtype=DType.BFLOAT16), FP8, LoadOptions(offload=1000, keep_alive=1)):
                with pytest.raises(LoadedDifferently) as refused:
                    await orch.loads.load(CLIP_L, options=other)
                assert refused.value.code is ErrorCode.ALREADY_LOADED
                assert f"tiny-clip-l is loaded on cpu as {loaded_as}" in refused.value.message
                assert "unload it first, or pass reload" in refused.value.message
            assert load_jobs(orch) == jobs  # refused before any job
            p = orch.view.get(first["model_id"], "cpu")
            assert p is not None and p.keep_alive == 7  # a refused load changed nothing
            # offload "none" and "auto" are one form while nothing streams
            assert (await orch.loads.load(CLIP_L, options=LoadOptions(offload="none")))["result"][
                "already_loaded"
            ]
            # reload: unloaded and loaded again in the form asked for
            reloaded = (await orch.loads.load(CLIP_L, options=replace(FP8, reload=True)))["result"]
            assert reloaded["storage_dtype"] == "float8_e4m3fn" and "already_loaded" not in reloaded
            assert reloaded["reloaded"] == {"dtype": loaded_as, "storage_dtype": None, "offload": "none"}
            assert reloaded["bytes"] <= 0.6 * first["bytes"]
            assert [e["reason"] for e in orch.bus.recent if e["type"] == "model.unloaded"] == ["requested"]
            # a plain load now returns the fp8 placement as it is
            plain = (await orch.loads.load(CLIP_L))["result"]
            assert plain["already_loaded"] and plain["storage_dtype"] == "float8_e4m3fn"
            # a reload asking for nothing new (what it leaves out keeps its value): returned as it is
            same = (await orch.loads.load(CLIP_L, options=LoadOptions(reload=True)))["result"]
            assert same["already_loaded"] and "reloaded" not in same
            # reload honours leases: a leased model is not unloaded without force
            lease = await orch.loads.grant_lease(CLIP_L, None, "pipeline", 60)
            back = LoadOptions(dtype=DType.BFLOAT16, reload=True)
            with pytest.raises(ProtocolError) as held:
                await orch.loads.load(CLIP_L, options=back)
            assert held.value.code is ErrorCode.BUSY and "tiny-clip-l" in held.value.message
            assert lease["id"] in held.value.message
            back.force = True
            forced = (await orch.loads.load(CLIP_L, options=back))["result"]
            # the storage dtype it left out is kept: the reload changed only the dtype
            assert (forced["dtype"], forced["storage_dtype"]) == ("bfloat16", "float8_e4m3fn")
            assert forced["dropped_loras"] == []

    run(body)


def test_a_reload_names_the_loras_it_drops_and_keeps_what_it_leaves_out(
    demo: DemoManifest, tmp_path: Path
) -> None:
    """The 409 names the form in words (offload in GB) and the LoRAs a reload would drop; the
    reload keeps the storage dtype and offload it leaves out, and lists the LoRAs it dropped."""

    async def body() -> None:
        async with serving(demo, tmp_path, cache_loads=False) as orch:
            asked = replace(FP8, offload=4_000_000_000)
            first = (await orch.loads.load(CKPT, options=asked))["result"]
            loaded_as = first["dtype"]
            lora = (await orch.catalog.resolve(LORA_SD15)).id
            await orch.loras.apply(CKPT, LORA_SD15, strength=0.5)
            applied = [{"lora_id": lora, "handle": "tiny-sd15-kohya", "strength": 0.5}]
            with pytest.raises(LoadedDifferently) as refused:
                await orch.loads.load(CKPT, options=LoadOptions(dtype=DType.BFLOAT16))
            message = refused.value.message
            assert (
                f"as {loaded_as}, stored as float8_e4m3fn, offload 4.0 GB; this load asks for dtype"
                in message
            )
            assert "a reload drops its LoRAs tiny-sd15-kohya (strength 0.5): apply them again" in message
            assert refused.value.details["loras"] == applied
            with pytest.raises(LoadedDifferently, match=r"asks for offload 1\.0 GB: unload it first"):
                await orch.loads.load(CKPT, options=LoadOptions(offload=1_000_000_000))
            reloaded = (await orch.loads.load(CKPT, options=LoadOptions(dtype=DType.BFLOAT16, reload=True)))[
                "result"
            ]
            assert (reloaded["dtype"], reloaded["storage_dtype"]) == ("bfloat16", "float8_e4m3fn")
            assert reloaded["offload"] == 4_000_000_000 and reloaded["loras"] == {}
            assert reloaded["dropped_loras"] == applied
            assert reloaded["reloaded"] == {
                "dtype": loaded_as, "storage_dtype": "float8_e4m3fn", "offload": 4_000_000_000
            }  # fmt: skip

    run(body)


def test_concurrent_loads_coalesce_and_another_form_in_flight_is_refused(
    demo: DemoManifest, tmp_path: Path
) -> None:
    async def body() -> None:
        async with serving(demo, tmp_path, cache_loads=False) as orch:
            slot = orch.pool.slot("cpu")
            async with Gate(slot):
                same = [asyncio.ensure_future(orch.loads.load(CKPT, options=FP8)) for _ in range(3)]
                await until(lambda: bool(orch.loads.inflight))
                with pytest.raises(
                    LoadedDifferently, match="is being loaded on cpu as the file's dtype, stored as"
                ):
                    await orch.loads.load(CKPT, options=LoadOptions(dtype=DType.BFLOAT16))
                plain = asyncio.ensure_future(orch.loads.load(CKPT))  # asks for nothing: joins
            results = [r["result"] for r in await asyncio.gather(*same, plain)]
            assert sum(1 for r in results if r.get("coalesced")) == 3
            assert {r["storage_dtype"] for r in results} == {"float8_e4m3fn"}

    run(body)


def test_an_offload_that_streamed_nothing_is_the_form_of_none(demo: DemoManifest, tmp_path: Path) -> None:
    """An offload that streamed nothing placed the model whole, as ``none`` does: a load asking for
    ``none``, ``auto`` or a larger byte count gets that placement (a new user's 409 on ``offload
    4GB`` then ``none``); a smaller count might stream and is another form. A placement that streams
    stays another form than ``none`` and ``auto``."""

    async def body() -> None:
        async with serving(demo, tmp_path, cache_loads=False) as orch:
            whole = (await orch.loads.load(VAE, options=LoadOptions(offload=4_000_000_000)))["result"]
            assert whole["streamed_bytes"] == 0 and whole["offload"] == 4_000_000_000
            for alike in ("none", "auto", 8_000_000_000, 4_000_000_000):
                again = (await orch.loads.load(VAE, options=LoadOptions(offload=alike)))["result"]
                assert again["already_loaded"] and again["offload"] == 4_000_000_000
            with pytest.raises(
                LoadedDifferently, match=r"offload 4\.0 GB; this load asks for offload 1\.0 MB"
            ):
                await orch.loads.load(VAE, options=LoadOptions(offload=1_000_000))
            streamed = (await orch.loads.load(UNET, options=LoadOptions(offload=1_000_000)))["result"]
            assert streamed["streamed_bytes"] > 0
            for other in ("none", "auto", 2_000_000):
                with pytest.raises(LoadedDifferently) as refused:
                    await orch.loads.load(UNET, options=LoadOptions(offload=other))
                assert refused.value.code is ErrorCode.ALREADY_LOADED
                assert refused.value.details["differences"] == {
                    "offload": {"loaded": 1_000_000, "asked": other}
                }
            same = (await orch.loads.load(UNET, options=LoadOptions(offload=1_000_000)))["result"]
            assert same["already_loaded"]

    run(body)


def test_an_offloaded_model_reports_one_size(demo: DemoManifest, tmp_path: Path) -> None:
    """What the budget is charged (resident weights and ring) is the load's ``bytes``, the
    status's and what unloading frees; what streams from RAM is apart, in ``streamed_bytes``."""

    async def body() -> None:
        async with serving(demo, tmp_path, worker_budget_mb=3, cache_loads=False) as orch:
            placed = (await orch.loads.load(UNET, options=LoadOptions(offload=1_000_000)))["result"]
            assert placed["streamed_bytes"] > 0 and placed["offload"] == 1_000_000
            assert placed["bytes"] > 1_000_000  # the resident part and the ring
            slot = orch.pool.slot("cpu")
            await slot.status()
            assert slot.memory is not None and slot.memory.models_bytes == placed["bytes"]
            listed = orch.views.device("cpu")["models"][0]
            assert (listed["bytes"], listed["streamed_bytes"]) == (placed["bytes"], placed["streamed_bytes"])
            freed = (await orch.loads.unload(UNET))["unloaded"][0]["freed_bytes"]
            assert freed == placed["bytes"]

    run(body)


def test_what_the_caller_must_fix_is_refused_before_any_job(demo: DemoManifest, tmp_path: Path) -> None:
    root = tmp_path / "models"
    for rel in (CLIP_L, LORA_SD15, EMBEDDING):
        (root / rel).parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(demo.root / rel, root / rel)

    async def body() -> None:
        async with serving(demo, tmp_path, model_roots=[root], cache_loads=False) as orch:
            with pytest.raises(
                NotLoadable, match=r"tiny-sd15-kohya \(m-\w+\) is a LoRA: apply it to a loaded model"
            ):
                await orch.loads.load(LORA_SD15)
            with pytest.raises(NotLoadable, match="is a textual-inversion embedding"):
                await orch.loads.load(EMBEDDING)
            with pytest.raises(NotLoadable, match="is a LoRA"):
                await orch.feed.cache_model(LORA_SD15)
            # a LoRA or an embedding is never loaded: a lease on it would hold nothing
            for ref, kind in ((LORA_SD15, "lora"), (EMBEDDING, "textual_inversion")):
                with pytest.raises(
                    NotLoadable, match=rf"; a lease holds a loaded model .* \({kind}\) is never loaded"
                ):
                    await orch.loads.grant_lease(ref, None, "pipeline", 60)
            assert orch.loads.leases.list() == []
            ahead = await orch.loads.grant_lease(CLIP_L, None, "pipeline", 60)  # held from its next load
            assert ahead["loaded"] is False and "tiny-clip-l (m-" in ahead["note"]
            assert "is not loaded now: the lease holds it from its next load" in ahead["note"]
            orch.loads.release_lease(ahead["id"])
            mid = (await orch.catalog.resolve(CLIP_L)).id
            (root / CLIP_L).unlink()
            await orch.catalog.scan(hash=False)  # the registry marks it missing
            with pytest.raises(ProtocolError) as gone:
                await orch.loads.load(mid)
            assert gone.value.code is ErrorCode.FILE_NOT_FOUND
            assert f"its file {root / CLIP_L} is missing" in gone.value.message
            assert "the last scan found it missing" in gone.value.message
            assert orch.jobs.list(kind="load") == [] and orch.jobs.list(kind="cache") == []

    run(body)


def test_optimize_with_nothing_or_something_unknown_to_apply_is_refused(
    demo: DemoManifest, tmp_path: Path
) -> None:
    async def body() -> None:
        async with serving(demo, tmp_path, cache_loads=False) as orch:
            await orch.loads.load(CLIP_L)
            for data, words in (
                ({"options": {}}, "options: nothing to apply; give at least one of dtype, channels_last"),
                ({"options": {"bogus": 1}}, "options: bogus: unknown optimisation 'bogus' (known: dtype,"),
                (
                    {"options": {"dtype": "float8"}},
                    "options: dtype: 'float8' is not float32, float16 or bfloat16",
                ),
            ):
                with pytest.raises(ProtocolError) as refused:
                    await orch.operations.run("optimize", CLIP_L, None, data)
                assert refused.value.code is ErrorCode.INVALID_REQUEST and words in refused.value.message
            assert orch.jobs.list(kind="optimize") == []
            # every option skipped: applied nothing, and so no speedup figure
            done = await orch.operations.run("optimize", CLIP_L, None, {"options": {"vae_tiling": True}})
            report = next(iter(done["result"][0]["components"].values()))
            assert report["applied"] == [] and report["speedup"] is None and report["latency_after_s"] is None

    run(body)


def test_lora_of_another_base_and_applied_again(demo: DemoManifest, tmp_path: Path) -> None:
    async def body() -> None:
        async with serving(demo, tmp_path, cache_loads=False) as orch:
            with pytest.raises(NotLoaded, match=r"tiny-sd15\S* \(m-\w+\) is not loaded"):
                await orch.loras.apply(CKPT, LORA_SD15)
            await orch.loads.load(CKPT)
            with pytest.raises(ProtocolError) as refused:
                await orch.loras.apply(CKPT, LORA_SDXL)
            assert refused.value.code is ErrorCode.INVALID_REQUEST
            assert "tiny-sdxl-kohya is an SDXL LoRA; tiny-sd15" in refused.value.message
            assert "is SD1: apply it to an SDXL model" in refused.value.message
            first = (await orch.loras.apply(CKPT, LORA_SD15, strength=1.0))["applied"][0]
            assert "already_applied" not in first
            again = (await orch.loras.apply(CKPT, LORA_SD15, strength=0.5))["applied"][0]
            assert again["already_applied"] and "strength set to 0.5 (was 1)" in again["message"]
            # a model with nothing a LoRA patches is told so, not sent to the worker
            await orch.loads.load(VAE)
            with pytest.raises(ProtocolError, match=r"tiny-sd15-vae has no component a LoRA patches \(vae; "):
                await orch.loras.apply(VAE, LORA_SD15)

    run(body, timeout=180)


def test_a_workers_lora_error_names_the_lora_and_model_by_handle() -> None:
    exc = naming(ProtocolError("m-1@m-2: key up_blocks.0 does not fit"), "m-1@m-2", "kohya on tiny-sd15")
    assert exc.message == "kohya on tiny-sd15: key up_blocks.0 does not fit" and str(exc).endswith(
        exc.message
    )
