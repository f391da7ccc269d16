"""Parts shared on one device, through an orchestrator with an in-process CPU worker: two tiny Flux
transformers (Q8_0 GGUF and fp8) hold one CLIP-L, one T5 and one VAE module there; the status
counts those bytes once and names who shares them; unloading one keeps the parts for the other,
which still runs; the last frees them; a LoRA that patches a shared text encoder gives its model its
own copy and leaves the other's as it was."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
from safetensors.torch import save_file

from modelkeeper.testing import DemoManifest
from modelkeeper.testing.demo import write_demo_models
from modelkeeper.testing.loras import DEFAULT_RANK, kohya_lora_state_dict, kohya_metadata
from modelkeeper.worker import InProcessWorker
from modelkeeper.worker.fingerprint import fingerprint
from tests.orchestrator.conftest import run, serving

Q8 = "transformer/tiny-flux-Q8_0.gguf"
FP8 = "transformer/tiny-flux-fp8-e4m3fn.safetensors"
ROLES = ("text_encoder", "text_encoder_2", "vae")
SETTINGS = {"cache_fill": "before", "hash_on_start": True}


@pytest.fixture(scope="module")
def flux_demo(tmp_path_factory: pytest.TempPathFactory) -> DemoManifest:
    demo = write_demo_models(
        tmp_path_factory.mktemp("shared-parts"),
        only=["flux-transformer-q8_0", "flux-transformer-fp8-e4m3fn", "t5", "clip-l", "flux-vae"],
    )
    # a kohya LoRA of CLIP-L alone (its lora_te_ keys), registered under the root like any LoRA
    state = {k: v for k, v in kohya_lora_state_dict("sd1").items() if k.startswith("lora_te_")}
    (demo.root / "loras").mkdir(exist_ok=True)
    metadata = kohya_metadata("sd1", rank=DEFAULT_RANK, alpha=DEFAULT_RANK, name="clip-only")
    save_file(state, str(demo.root / "loras" / "clip-only.safetensors"), metadata=metadata)
    return demo


def worker_of(orch: Any) -> InProcessWorker:
    proc = orch.pool.slot("cpu").proc
    assert isinstance(proc, InProcessWorker)
    return proc


def device_status(orch: Any) -> tuple[dict[str, Any], dict[str, dict[str, Any]]]:
    device = orch.views.status()["devices"][0]
    return device, {p["model_id"]: p for p in device["models"]}


def test_two_flux_transformers_share_their_parts_on_one_device(
    flux_demo: DemoManifest, tmp_path: Path
) -> None:
    async def body() -> None:
        async with serving(flux_demo, tmp_path, **SETTINGS) as orch:
            q8 = (await orch.loads.load(Q8))["result"]
            fp8 = (await orch.loads.load(FP8))["result"]
            assert q8["parts"] == fp8["parts"]
            worker = worker_of(orch)
            for role in ROLES:
                assert worker.module(q8["components"][role]) is worker.module(fp8["components"][role])
            assert fp8["shared"] == {role: [q8["model_id"]] for role in ROLES}
            await orch.pool.slot("cpu").status()
            device, models = device_status(orch)
            shared = models[q8["model_id"]]["shared_bytes"]
            assert shared == models[fp8["model_id"]]["shared_bytes"] > 0
            assert models[q8["model_id"]]["shared"] == {role: [fp8["model_id"]] for role in ROLES}
            total = sum(p["bytes"] for p in models.values())
            assert device["memory"]["models_bytes"] == total - shared  # the parts once

            done = await orch.loads.unload(Q8)
            own = q8["bytes"] - shared
            assert done["unloaded"][0]["freed_bytes"] == own  # its transformer only: the parts stay
            checked = await orch.operations.run("validate", fp8["model_id"], None, {"level": "functional"})
            results = checked["result"][0]["components"]
            assert set(results) == {"transformer", *ROLES} and all(r["passed"] for r in results.values())
            device, models = device_status(orch)
            assert "shared" not in models[fp8["model_id"]]
            assert device["memory"]["models_bytes"] == fp8["bytes"]

            done = await orch.loads.unload(FP8)
            assert done["unloaded"][0]["freed_bytes"] == fp8["bytes"]
            assert orch.pool.slot("cpu").used_bytes == 0 and worker.service.model_count() == 0

    run(body)


def test_the_room_a_load_makes_counts_a_shared_part_once(flux_demo: DemoManifest, tmp_path: Path) -> None:
    """With a budget that holds both transformers and one set of parts, the second load evicts
    nothing: its parts are on the device already."""

    async def body() -> None:
        async with serving(flux_demo, tmp_path, **SETTINGS) as orch:
            q8 = (await orch.loads.load(Q8))["result"]
            fp8 = (await orch.loads.load(FP8))["result"]
            need = q8["bytes"] + fp8["bytes"] - fp8["shared_bytes"]
            await orch.loads.unload_all()
        async with serving(flux_demo, tmp_path, worker_budget_mb=need / 2**20 + 0.01, **SETTINGS) as orch:
            await orch.loads.load(Q8)
            again = (await orch.loads.load(FP8))["result"]
            assert again["evicted"] == [] and set(again["shared"]) == set(ROLES)

    run(body)


def test_a_lora_on_a_shared_text_encoder_gives_its_model_its_own_copy(
    flux_demo: DemoManifest, tmp_path: Path
) -> None:
    async def body() -> None:
        async with serving(flux_demo, tmp_path, **SETTINGS) as orch:
            q8 = (await orch.loads.load(Q8))["result"]
            fp8 = (await orch.loads.load(FP8))["result"]
            worker = worker_of(orch)
            clip = worker.module(fp8["components"]["text_encoder"])
            before = fingerprint(clip)
            applied = await orch.loras.apply(Q8, "loras/clip-only.safetensors")
            assert applied["applied"][0]["unshared"] == [q8["components"]["text_encoder"]]
            mine = worker.module(q8["components"]["text_encoder"])
            assert mine is not clip and fingerprint(clip) == before != fingerprint(mine)
            _, models = device_status(orch)
            assert set(models[q8["model_id"]]["shared"]) == {"text_encoder_2", "vae"}
            await orch.pool.slot("cpu").status()
            device, models = device_status(orch)
            total = sum(p["bytes"] for p in models.values())
            assert device["memory"]["models_bytes"] == total - models[q8["model_id"]]["shared_bytes"]
            await orch.loras.remove(Q8, "loras/clip-only.safetensors")
            assert fingerprint(mine) == before  # removal exact; the copy stays its own until unloaded

    run(body)
