"""GGUF files through the service: loaded with the config they carry, from the RAM cache (the segment
holds the file's blocks repacked), kept packed, and a LoRA applied and removed exactly."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest

from modelkeeper.formats.gguf_header import read_gguf_header
from modelkeeper.orchestrator.loading import CachePlan, ComponentLoad, cache_plan
from modelkeeper.protocol.messages import LoadRequest
from modelkeeper.testing import DemoManifest, component_config, make_unet
from modelkeeper.testing.gguf_files import write_gguf

from .conftest import run, serving
from .test_lora_packed import fingerprints

pytestmark = pytest.mark.xdist_group("orchestrator-inprocess")

UNET = "unet/tiny-sdxl-Q8_0.gguf"
LORA = "loras/tiny-sdxl-kohya.safetensors"


@pytest.fixture
def root(demo: DemoManifest, tmp_path: Path) -> Path:
    """A model root with a GGUF SDXL UNet (its config in its metadata) and the demo's SDXL LoRA."""
    folder = tmp_path / "models"
    (folder / "unet").mkdir(parents=True)
    (folder / "loras").mkdir()
    ref = make_unet("sdxl")
    write_gguf(folder / UNET, ref.state_dict(), "Q8_0", arch="sdxl", config=component_config(ref))
    shutil.copy(demo.path("sdxl-lora-kohya"), folder / LORA)
    return folder


def test_a_gguf_file_has_a_cache_plan(tmp_path: Path) -> None:
    path = tmp_path / "t.gguf"
    path.write_bytes(b"GGUF")
    load = ComponentLoad("", {"content_id": "c1"}, LoadRequest(name="t", path=str(path), type="unet"), 4)
    assert cache_plan(load) == CachePlan(path, "c1", None, None)


def test_a_gguf_file_is_loaded_with_the_config_it_carries(root: Path) -> None:
    from modelkeeper.orchestrator.loading import _apply_embedded_config

    request = LoadRequest(name="u", path=str(root / UNET), type="unet", config={"sample_size": 128})
    load = ComponentLoad("", {}, request, 0)
    _apply_embedded_config(load)
    assert load.request.config == component_config(make_unet("sdxl"))


def test_a_gguf_unet_loads_from_the_ram_cache_and_takes_a_lora(
    demo: DemoManifest, root: Path, tmp_path: Path
) -> None:
    async def body() -> None:
        async with serving(demo, tmp_path, model_roots=[root], cache_fill="before") as orch:
            placed = (await orch.loads.load(UNET))["result"]
            file_bytes = sum(t.nbytes for t in read_gguf_header(root / UNET).tensors.values())
            assert abs(placed["bytes"] - file_bytes) <= 0.05 * file_bytes  # kept packed
            placement = orch.view.get(placed["model_id"], placed["device"])
            assert placement is not None and set(placement.sources.values()) == {"ram"}
            assert any(s["source"] == str(root / UNET) for s in orch.feed.segments())
            before = await fingerprints(orch, placed["device"])
            applied = await orch.loras.apply(UNET, LORA)
            assert applied["applied"][0]["params_patched"] > 0
            await orch.loras.strength(UNET, LORA, 0.5)
            await orch.loras.remove(UNET, LORA)
            assert await fingerprints(orch, placed["device"]) == before

    run(body)
