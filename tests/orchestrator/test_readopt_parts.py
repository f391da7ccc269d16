"""A placement re-adopted by ``reconcile`` (the worker holds models the view lacks: the view was lost
while the worker kept running, as for a service restarted against running workers) gets back its
``parts`` map (role -> part's model id) as the load recorded it: from the registry's completion of
the model, each part checked against the file the worker says it read."""

from __future__ import annotations

from pathlib import Path

import pytest

from modelkeeper.testing import DemoManifest
from modelkeeper.testing.demo import write_demo_models
from tests.orchestrator.conftest import run, serving

PARTS = ["flux-transformer", "t5", "t5-fp8-e4m3fn", "clip-l", "flux-vae"]
FLUX = "transformer/tiny-flux.safetensors"


@pytest.fixture(scope="module")
def parts_demo(tmp_path_factory: pytest.TempPathFactory) -> DemoManifest:
    return write_demo_models(tmp_path_factory.mktemp("readopt-parts"), only=PARTS)


@pytest.mark.parametrize("cache_fill", ["before", "alongside"], ids=["from-ram", "from-disk"])
def test_a_re_adopted_placement_keeps_its_parts(
    parts_demo: DemoManifest, tmp_path: Path, cache_fill: str
) -> None:
    async def body() -> None:
        async with serving(parts_demo, tmp_path, cache_fill=cache_fill) as orch:
            flux = (await orch.loads.load(FLUX))["result"]
            assert set(flux["parts"]) == {"text_encoder", "text_encoder_2", "vae"}
            assert set(flux["sources"].values()) == {"ram" if cache_fill == "before" else "disk"}
            orch.view.remove(flux["model_id"], "cpu")  # the view lost; the worker holds them still
            report = await orch.recovery.reconcile("cpu")
            assert sorted(report["adopted"]) == sorted(flux["components"].values())
            p = orch.view.get(flux["model_id"], "cpu")
            assert p is not None and p.components == flux["components"]
            assert p.parts == flux["parts"]
            assert p.info()["parts"] == flux["parts"]

    run(body)


def test_a_part_the_worker_did_not_read_is_left_out(parts_demo: DemoManifest, tmp_path: Path) -> None:
    """The choice changed after the load (another T5 pinned): the worker's T5 is no longer the
    registry's choice for the role, so the re-adopted placement does not claim it."""

    async def body() -> None:
        async with serving(parts_demo, tmp_path, cache_fill="alongside") as orch:
            flux = (await orch.loads.load(FLUX))["result"]
            fp8 = await orch.catalog.resolve("clip/tiny-t5-fp8-e4m3fn.safetensors")
            assert flux["parts"]["text_encoder_2"] != fp8.id
            await orch.catalog.set_metadata(
                FLUX, {"default_settings": {"parts": {"text_encoder_2": fp8.handle}}}
            )
            orch.view.remove(flux["model_id"], "cpu")
            await orch.recovery.reconcile("cpu")
            p = orch.view.get(flux["model_id"], "cpu")
            assert p is not None and "text_encoder_2" in p.components
            assert p.parts == {k: v for k, v in flux["parts"].items() if k != "text_encoder_2"}

    run(body)
