"""What a user reads when something is refused: the model by its handle, the option by the name
the user gave it, sizes in decimal units; refused before any job where the service can tell."""

from __future__ import annotations

from pathlib import Path

import pytest

from modelkeeper.orchestrator import LoadOptions, NotPlaceable
from modelkeeper.orchestrator.wording import in_users_words
from modelkeeper.protocol.errors import ErrorCode, ProtocolError
from modelkeeper.testing import DemoManifest

from .conftest import run, serving

UNET = "unet/tiny-sdxl-unet.safetensors"  # 4.8 MB
SDXL = "diffusers/tiny-sdxl"  # 30 MB
VAE = "vae/tiny-sd15-vae.safetensors"

pytestmark = pytest.mark.xdist_group("orchestrator-inprocess")


@pytest.mark.parametrize(
    ("message", "components", "expected"),
    [
        (
            "data.offload: 'm-3f1c/text_encoder_2' needs 17.6 MiB on cpu even streamed but 14.3 MiB of "
            "the 20.0 MiB budget is free",
            {"unet": "m-3f1c/unet", "text_encoder_2": "m-3f1c/text_encoder_2"},
            "offload: tiny-sdxl (text_encoder_2) needs 18.5 MB on cpu even streamed but 15.0 MB of the "
            "21.0 MB budget is free",
        ),
        (
            "data.name: 'm-10a2' is partially resident (offload); optimisations apply to fully resident models",
            {"unet": "m-10a2"},
            "tiny-sdxl (unet) is partially resident (offload); optimisations apply to fully resident models",
        ),
        ("data.resolution: must be a positive multiple of 8, got 1001", {}, "resolution: must be a positive multiple of 8, got 1001"),
        ("no answer from cpu", {"unet": "m-10a2"}, "no answer from cpu"),
    ],
)  # fmt: skip
def test_a_workers_message_in_the_users_words(
    message: str, components: dict[str, str], expected: str
) -> None:
    exc = ProtocolError(message, ErrorCode.INVALID_REQUEST, name="m-10a2")
    worded = in_users_words(exc, "tiny-sdxl", components)
    assert worded.message == expected and str(worded.args[0]) == expected
    assert worded.code is ErrorCode.INVALID_REQUEST and worded.details == {"name": "m-10a2"}  # ids kept


def test_refusals_name_the_model_by_its_handle_and_sizes_in_decimal_units(
    demo: DemoManifest, tmp_path: Path
) -> None:
    async def body() -> None:
        async with serving(demo, tmp_path, worker_budget_mb=3, cache_loads=False) as orch:
            # larger than every budget: by handle, decimal sizes, and what would place it
            with pytest.raises(NotPlaceable) as big:
                await orch.loads.load(SDXL)
            assert big.value.code is ErrorCode.INSUFFICIENT_MEMORY
            assert big.value.message.startswith(
                "tiny-sdxl@diffusers needs 29.9 MB, more than the budget of any "
            )
            assert "(cpu: 3.1 MB); load it with offload auto (--offload auto)" in big.value.message
            assert "m-" not in big.value.message
            # an optimize of an offloaded model: refused before any job, by its handle
            placed = (await orch.loads.load(UNET, options=LoadOptions(offload="auto")))["result"]
            assert placed["streamed_bytes"] > 0
            with pytest.raises(ProtocolError) as streamed:
                await orch.operations.run("optimize", UNET, None, {"options": {"attention": "default"}})
            assert streamed.value.code is ErrorCode.INVALID_REQUEST
            assert streamed.value.message.startswith(
                f"{placed['handle']} is partially resident on cpu (offload auto: "
            )
            assert "load it with offload none" in streamed.value.message
            assert orch.jobs.list(kind="optimize") == []
            # one component named: its worker refuses it, in the user's words
            with pytest.raises(ProtocolError) as worker:
                await orch.operations.run(
                    "optimize", UNET, None, {"options": {"attention": "default"}}, component="unet"
                )
            assert worker.value.message.startswith(f"{placed['handle']} (unet) is partially resident")
            assert "data." not in worker.value.message and placed["model_id"] not in worker.value.message
            # a benchmark resolution its worker would refuse: before any job, naming the option
            await orch.loads.unload(UNET)
            await orch.loads.load(VAE)
            with pytest.raises(ProtocolError) as resolution:
                await orch.operations.run("benchmark", VAE, None, {"resolution": 1001})
            assert resolution.value.code is ErrorCode.INVALID_REQUEST
            assert resolution.value.details["field"] == "resolution"
            assert resolution.value.message == (
                "resolution: 1001 is not a multiple of 8 (a latent pixel is 8 image pixels a side); "
                "try 1000 or 1008"
            )
            with pytest.raises(ProtocolError, match=r"resolution: .*less than or equal to 4096"):
                await orch.operations.run("benchmark", VAE, None, {"resolution": 4104})
            assert orch.jobs.list(kind="benchmark") == []

    run(body)
