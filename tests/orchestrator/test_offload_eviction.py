"""An offloaded load evicts only when that places the model whole: ``auto`` of a model larger than
the budget streams and evicts nothing (and, when even its streamed form cannot fit, fails with the
other models still loaded); ``auto`` of a model that fits the budget evicts as a whole load does;
``auto`` that finds no room to evict (the others leased) streams instead of failing."""

from __future__ import annotations

from pathlib import Path

import pytest

from modelkeeper.orchestrator import LoadOptions, Orchestrator
from modelkeeper.protocol.errors import ErrorCode, ProtocolError
from modelkeeper.testing import DemoManifest

from .conftest import run, serving
from .test_orchestrator import CLIP_L, SD15, events

SDXL = "diffusers/tiny-sdxl"  # 30 MB: larger than the budget
SD15_CKPT = "checkpoints/tiny-sd15.safetensors"  # 8.7 MB: fits the budget, not what is free
SDXL_UNET = "unet/tiny-sdxl-unet.safetensors"  # 4.8 MB
SD2_UNET = "unet/tiny-sd2-unet.safetensors"  # 2.2 MB
AUTO = LoadOptions(offload="auto")

pytestmark = pytest.mark.xdist_group("orchestrator-inprocess")


def loaded(orch: Orchestrator) -> set[str]:
    return {p.model_id for p in orch.view.placements.values()}


def test_an_offloaded_load_evicts_only_to_place_the_model_whole(demo: DemoManifest, tmp_path: Path) -> None:
    async def body() -> None:
        async with serving(demo, tmp_path, cache_loads=False, worker_budget_mb=20) as orch:
            sd15 = (await orch.loads.load(SD15))["result"]["model_id"]
            clip = (await orch.loads.load(CLIP_L))["result"]["model_id"]
            # larger than the budget: it streams, evicting nothing; its text_encoder_2 cannot
            # fit even streamed, so it fails, and the models there stay loaded
            with pytest.raises(ProtocolError) as failed:
                await orch.loads.load(SDXL, options=AUTO)
            assert failed.value.code is ErrorCode.INSUFFICIENT_MEMORY
            assert failed.value.message.startswith(
                "offload: tiny-sdxl@diffusers (text_encoder_2) needs 18.5 MB"
            )
            assert "even streamed" in failed.value.message
            assert loaded(orch) == {sd15, clip}
            assert [e for e in events(orch, "model.unloaded") if e.get("reason") == "evicted"] == []
            # fits the budget whole: evicting the least recently used places it whole, as `none` would
            whole = (await orch.loads.load(SD15_CKPT, options=AUTO))["result"]
            assert whole["evicted"] == [sd15] and whole["streamed_bytes"] == 0
            # no room to evict (the others leased): `auto` streams what does not fit, evicting nothing
            sd2_unet = (await orch.loads.load(SD2_UNET))["result"]["model_id"]
            for ref in (CLIP_L, SD15_CKPT, SD2_UNET):
                await orch.loads.grant_lease(ref, None, "pipeline", 60)
            streamed = (await orch.loads.load(SDXL_UNET, options=AUTO))["result"]
            assert streamed["evicted"] == [] and streamed["streamed_bytes"] > 0
            assert loaded(orch) == {clip, whole["model_id"], sd2_unet, streamed["model_id"]}
            # without offload the same load is refused (nothing to evict)
            await orch.loads.unload(SDXL_UNET)
            with pytest.raises(ProtocolError) as refused:
                await orch.loads.load(SDXL_UNET)
            assert refused.value.code is ErrorCode.INSUFFICIENT_MEMORY

    run(body)
