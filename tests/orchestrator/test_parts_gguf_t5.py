"""A GGUF T5 in llama.cpp's names (city96's T5-XXL GGUFs) as a part: a T5-XXL candidate chosen after
full precision and fp8 forms, and, pinned, loaded with a transformer-only Flux through an orchestrator
with an in-process CPU worker and validated forward."""

from __future__ import annotations

import shutil
from pathlib import Path
from typing import Any

import pytest

from modelkeeper.orchestrator import Orchestrator
from modelkeeper.orchestrator.parts import Candidate, resolve
from modelkeeper.protocol.messages import CommandType, ModelInfoRequest, ModelInfoResult
from modelkeeper.testing import DemoManifest
from modelkeeper.testing.demo import write_demo_models
from tests.orchestrator.conftest import run, serving
from tests.orchestrator.test_pipeline_parts import CLIP_L, FLUX, T5, T5_FP8, VAE16

T5_GGUF = Candidate("m-t5g", "t5-v1_1-xxl-encoder-Q8_0", "t5_xxl", 4096, bases=("sd3",), quant="Q8_0")
T5_SCALED = Candidate("m-t5s", "t5xxl_fp8_e4m3fn_scaled", "t5_xxl", 4096, quant="scaled_float8_e4m3fn")


@pytest.mark.parametrize(
    ("t5s", "chosen"),
    [
        ([T5_GGUF, T5_FP8, T5], "t5xxl-bf16"),
        ([T5_GGUF, T5_FP8], "t5xxl-fp8"),
        ([T5_GGUF, T5_SCALED], "t5xxl_fp8_e4m3fn_scaled"),  # after its handle, but fp8 comes first
        ([T5_GGUF], "t5-v1_1-xxl-encoder-Q8_0"),
    ],
)
def test_a_gguf_t5_is_chosen_after_full_precision_and_fp8(t5s: list[Candidate], chosen: str) -> None:
    choice = {c.role.name: c for c in resolve(FLUX, [*t5s, CLIP_L, VAE16])}["text_encoder_2"]
    assert choice.status == "auto" and choice.candidate is not None and choice.candidate.handle == chosen


async def worker_source(orch: Orchestrator, placed: dict[str, Any], role: str) -> dict[str, Any]:
    """What the worker says of the component loaded for ``role`` (its rule, its stored form)."""
    slot = orch.pool.slot(placed["device"])
    request = ModelInfoRequest(name=placed["components"][role])
    info = await slot.call(CommandType.GET_MODEL_INFO, request, ModelInfoResult)
    return info.models[0].source


PARTS = ["flux-transformer", "t5", "t5-q8_0", "clip-l", "flux-vae"]
GGUF_T5 = "clip/tiny-t5-Q8_0.gguf"


@pytest.fixture(scope="module")
def parts_demo(tmp_path_factory: pytest.TempPathFactory) -> DemoManifest:
    return write_demo_models(tmp_path_factory.mktemp("gguf-t5-parts"), only=PARTS)


def test_the_flux_transformer_loads_with_the_gguf_t5_pinned(parts_demo: DemoManifest, tmp_path: Path) -> None:
    async def body() -> None:
        async with serving(parts_demo, tmp_path, cache_fill="before") as orch:
            t5 = await orch.catalog.resolve(GGUF_T5)
            assert (t5.type, t5.encoder, t5.identification.quant, t5.identification.loadable) == (
                "text_encoder", "t5_xxl", "Q8_0", True)  # fmt: skip
            ref = "transformer/tiny-flux.safetensors"
            detail = await orch.views.model_detail(ref)
            auto = {p["role"]: p for p in detail["parts"]}["text_encoder_2"]
            assert (auto["status"], auto["handle"]) == ("auto", "tiny-t5")  # the bf16 T5 comes first
            await orch.catalog.set_metadata(
                ref, {"default_settings": {"parts": {"text_encoder_2": t5.handle}}}
            )
            detail = await orch.views.model_detail(ref)
            pinned = {p["role"]: p for p in detail["parts"]}["text_encoder_2"]
            assert (pinned["status"], pinned["model_id"]) == ("pinned", t5.id)
            flux = (await orch.loads.load(ref))["result"]
            assert set(flux["components"]) == {"transformer", "text_encoder", "text_encoder_2", "vae"}
            assert flux["parts"]["text_encoder_2"] == t5.id
            assert flux["sources"]["text_encoder_2"] == "ram"  # from its RAM-cache segment: no .gguf there
            source = await worker_source(orch, flux, "text_encoder_2")
            assert (source["storage"], source["class_name"], source["rule"]) == (
                "gguf:Q8_0", "T5EncoderModel", "t5/gguf")  # fmt: skip
            checked = await orch.operations.run("validate", flux["model_id"], None, {"level": "functional"})
            results = checked["result"][0]["components"]
            assert set(results) == set(flux["components"]) and all(r["passed"] for r in results.values())

    run(body)


def test_a_gguf_t5_alone_completes_the_flux_transformer(parts_demo: DemoManifest, tmp_path: Path) -> None:
    root = tmp_path / "models"
    for rel in ("transformer/tiny-flux.safetensors", GGUF_T5, "clip/tiny-clip-l.safetensors",
                "vae/tiny-flux-vae.safetensors"):  # fmt: skip
        (root / rel).parent.mkdir(parents=True, exist_ok=True)
        shutil.copy(parts_demo.root / rel, root / rel)
    only_gguf = DemoManifest(root=root, entries=(), seed=parts_demo.seed)

    async def body() -> None:
        async with serving(only_gguf, tmp_path) as orch:
            flux = (await orch.loads.load("transformer/tiny-flux.safetensors"))["result"]
            assert flux["parts"]["text_encoder_2"] == (await orch.catalog.resolve(GGUF_T5)).id
            assert (await worker_source(orch, flux, "text_encoder_2"))["storage"] == "gguf:Q8_0"

    run(body)
