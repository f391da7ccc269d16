"""A LoRA through the service on a model kept in fp8 (``storage_dtype``): applied, re-strengthened and
removed on an in-process CPU worker; the weights' fingerprint after removal is the one before."""

from __future__ import annotations

from pathlib import Path

import pytest

from modelkeeper.orchestrator import LoadOptions, Orchestrator
from modelkeeper.protocol.commands import CommandType
from modelkeeper.protocol.messages import DType, ModelInfoRequest, ModelInfoResult
from modelkeeper.testing import DemoManifest

from .conftest import run, serving
from .test_orchestrator import SD15

LORA = "loras/tiny-sd15-kohya.safetensors"

pytestmark = pytest.mark.xdist_group("orchestrator-inprocess")


async def fingerprints(orch: Orchestrator, device: str) -> dict[str, str]:
    info = await orch.pool.slot(device).call(
        CommandType.GET_MODEL_INFO, ModelInfoRequest(fingerprint=True), ModelInfoResult
    )
    return {m.name: str(getattr(m, "fingerprint", "")) for m in info.models}


def test_lora_on_an_fp8_pipeline_through_the_service(demo: DemoManifest, tmp_path: Path) -> None:
    async def body() -> None:
        async with serving(demo, tmp_path) as orch:
            fp8 = LoadOptions(storage_dtype=DType.FLOAT8_E4M3FN)
            placed = (await orch.loads.load(SD15, options=fp8))["result"]
            device = placed["device"]
            before = await fingerprints(orch, device)
            applied = await orch.loras.apply(SD15, LORA, strength=0.8)
            (result,) = applied["applied"]
            assert result["params_patched"] > 0 and result["unmatched_keys"] == 0
            assert result["backup_bytes"] == 0  # every patched weight is packed: no copy is kept
            placement = orch.view.get(placed["model_id"], device)
            assert placement is not None and placement.loras[applied["lora_id"]]["strength"] == 0.8
            changed = await orch.loras.strength(SD15, LORA, 0.3)
            assert changed["devices"][0]["previous"] == 0.8
            assert placement.loras[applied["lora_id"]]["strength"] == 0.3
            removed = await orch.loras.remove(SD15, LORA)
            assert removed["devices"][0]["params_restored"] == result["params_patched"]
            assert placement.loras == {}
            after = await fingerprints(orch, device)
            assert after == before and all(v.startswith("blake3:") for v in after.values())

    run(body)
