"""Models kept packed (GGUF, fp8, scaled fp8) through the service: an optimize ``dtype`` is refused
before any job (its cast would break the decoding; the compute dtype is the load's), and the model
stays whole; a packed model loaded without a dtype answers a load asking for the compute dtype
its worker chose."""

from __future__ import annotations

from pathlib import Path

import pytest

from modelkeeper.orchestrator import LoadedDifferently, LoadOptions
from modelkeeper.protocol.errors import ErrorCode, ProtocolError
from modelkeeper.protocol.messages import DType
from modelkeeper.testing import DemoManifest, write_demo_models

from .conftest import run, serving

SCALED = "unet/tiny-sdxl-fp8-scaled.safetensors"
Q4 = "transformer/tiny-flux-Q4_K.gguf"
E5M2 = "transformer/tiny-flux-fp8-e5m2.safetensors"

pytestmark = pytest.mark.xdist_group("orchestrator-inprocess")


@pytest.fixture(scope="module")
def packed_demo(tmp_path_factory: pytest.TempPathFactory) -> DemoManifest:
    return write_demo_models(
        tmp_path_factory.mktemp("packed-models"),
        only=["sdxl-unet-fp8-scaled", "flux-transformer-q4_k", "flux-transformer-fp8-e5m2", "t5", "clip-l",
              "flux-vae"],
    )  # fmt: skip


def test_an_optimize_dtype_on_a_packed_model_is_refused_before_any_job(
    packed_demo: DemoManifest, tmp_path: Path
) -> None:
    async def body() -> None:
        async with serving(packed_demo, tmp_path) as orch:
            for ref in (SCALED, Q4):
                placed = (await orch.loads.load(ref))["result"]
                jobs = len(orch.jobs.list(kind="optimize"))
                with pytest.raises(ProtocolError) as refused:
                    await orch.operations.run("optimize", ref, None, {"options": {"dtype": "float16"}})
                assert refused.value.code is ErrorCode.INVALID_REQUEST
                assert refused.value.details["field"] == "options.dtype"
                assert f"options.dtype: {placed['handle']} is stored packed (" in refused.value.message
                assert "load it with --dtype instead" in refused.value.message
                assert len(orch.jobs.list(kind="optimize")) == jobs  # refused before any job
                # the model is whole: it validates, and another option applies
                (checked,) = (await orch.operations.run("validate", ref, None, {"level": "functional"}))[
                    "result"
                ]
                assert all(c["passed"] for c in checked["components"].values())
            # one component not packed (the Flux VAE part) takes the dtype
            options = {"options": {"dtype": "bfloat16"}, "measure": False}
            (done,) = (await orch.operations.run("optimize", Q4, None, options, component="vae"))["result"]
            assert [a["option"] for a in done["components"]["vae"]["applied"]] == ["dtype"]

    run(body)


def test_a_packed_model_loaded_without_dtype_is_the_same_form_as_its_compute_dtype(
    packed_demo: DemoManifest, tmp_path: Path
) -> None:
    async def body() -> None:
        async with serving(packed_demo, tmp_path) as orch:
            for ref in (Q4, E5M2):
                placed = (await orch.loads.load(ref))["result"]
                chosen = placed["dtype"]  # the compute dtype the worker chose for the packed transformer
                assert chosen == "bfloat16" and placed["storage_dtype"] is not None
                jobs = len(orch.jobs.list(kind="load"))
                again = (await orch.loads.load(ref, options=LoadOptions(dtype=DType(chosen))))["result"]
                assert again["already_loaded"] and again["dtype"] == chosen
                with pytest.raises(LoadedDifferently) as refused:
                    await orch.loads.load(ref, options=LoadOptions(dtype=DType.FLOAT16))
                assert refused.value.details["loaded"]["dtype"] == chosen
                assert f"is loaded on cpu as {chosen}, stored as " in refused.value.message
                assert len(orch.jobs.list(kind="load")) == jobs + 1  # the same form: answered, no new load
                await orch.loads.unload(ref)

    run(body)
