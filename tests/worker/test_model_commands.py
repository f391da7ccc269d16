"""LoRA, fingerprint, validation, benchmark and optimisation through the protocol of a real worker process."""

from __future__ import annotations

import pytest

from modelkeeper.protocol import CommandType, ErrorCode, ProtocolError, WorkerProcess
from modelkeeper.testing import DemoManifest


def _fp(worker: WorkerProcess, name: str) -> str:
    info = worker.call(CommandType.GET_MODEL_INFO, {"name": name, "fingerprint": True})
    fingerprint: str = info["models"][0]["fingerprint"]
    return fingerprint


@pytest.fixture
def sd15(worker: WorkerProcess, demo: DemoManifest) -> WorkerProcess:
    root = str(demo.path("sd15-pipeline"))
    worker.call(CommandType.LOAD_MODEL, {"name": "u", "path": root, "type": "unet", "dtype": "float32"})
    worker.call(
        CommandType.LOAD_MODEL, {"name": "te", "path": root, "type": "text_encoder", "dtype": "float32"}
    )
    yield worker
    worker.call(CommandType.CLEANUP)


@pytest.mark.parametrize("lora", ["sd15-lora-kohya", "sd15-lora-peft", "sd15-loha", "sd15-lokr"])
def test_lora_apply_strength_and_exact_removal(sd15: WorkerProcess, demo: DemoManifest, lora: str) -> None:
    w = sd15
    original = _fp(w, "u")
    report = w.call(
        CommandType.LOAD_LORA,
        {"name": "l", "path": str(demo.path(lora)), "targets": {"unet": "u", "text_encoder": "te"}},
    )
    assert report["matched_keys"] > 0
    assert report["params_patched"] > 0
    patched = _fp(w, "u")
    assert patched != original
    half = w.call(CommandType.SET_LORA_STRENGTH, {"name": "l", "strength": 0.5})
    assert half["previous"] == 1.0
    assert _fp(w, "u") not in (original, patched)
    w.call(CommandType.SET_LORA_STRENGTH, {"name": "l", "strength": 1.0})
    assert _fp(w, "u") == patched
    removed = w.call(CommandType.UNLOAD_LORA, {"name": "l"})
    assert removed["name"] == "l"
    assert _fp(w, "u") == original


def test_lora_for_another_base_is_refused_and_changes_nothing(
    sd15: WorkerProcess, demo: DemoManifest
) -> None:
    before = _fp(sd15, "u")
    with pytest.raises(ProtocolError) as info:
        sd15.call(
            CommandType.LOAD_LORA,
            {
                "name": "x",
                "path": str(demo.path("sdxl-lora-kohya")),
                "targets": {"unet": "u", "text_encoder": "te"},
            },
        )
    assert info.value.code is ErrorCode.INVALID_REQUEST
    assert "sdxl" in info.value.message.lower() or "shape" in info.value.message.lower()
    assert _fp(sd15, "u") == before
    with pytest.raises(ProtocolError) as missing:
        sd15.call(
            CommandType.LOAD_LORA,
            {"name": "y", "path": str(demo.path("sd15-lora-kohya")), "targets": {"unet": "nope"}},
        )
    assert missing.value.code is ErrorCode.NOT_LOADED
    assert "data.targets.unet" in missing.value.message


def test_unloading_a_patched_model_detaches_its_lora(sd15: WorkerProcess, demo: DemoManifest) -> None:
    sd15.call(
        CommandType.LOAD_LORA,
        {"name": "l", "path": str(demo.path("sd15-lora-kohya")), "targets": {"unet": "u"}},
    )
    sd15.call(CommandType.UNLOAD_MODEL, {"name": "u"})
    with pytest.raises(ProtocolError):
        sd15.call(CommandType.SET_LORA_STRENGTH, {"name": "l", "strength": 0.3})


@pytest.mark.parametrize("level", ["header", "weights", "functional"])
def test_validate_levels(sd15: WorkerProcess, level: str) -> None:
    result = sd15.call(CommandType.VALIDATE_MODEL, {"name": "u", "level": level})
    assert result["passed"] is True
    assert result["checks"]
    assert all(c["passed"] for c in result["checks"])
    assert {c["level"] for c in result["checks"]} <= {"header", "weights", "functional"}


def test_validate_of_a_model_that_is_not_loaded(worker: WorkerProcess) -> None:
    with pytest.raises(ProtocolError) as info:
        worker.call(CommandType.VALIDATE_MODEL, {"name": "ghost"})
    assert info.value.code is ErrorCode.NOT_LOADED


def test_benchmark_and_optimize(sd15: WorkerProcess) -> None:
    bench = sd15.call(CommandType.BENCHMARK_MODEL, {"name": "te", "steps": 3, "warmup": 1})
    figures = bench["figures"]
    assert figures
    for fig in figures:
        assert fig["p90_s"] >= fig["median_s"] > 0
    before = sd15.call(CommandType.GET_MODEL_INFO, {"name": "u"})["models"][0]["bytes"]
    opt = sd15.call(
        CommandType.OPTIMIZE_MODEL, {"name": "u", "options": {"dtype": "float16"}, "measure": False}
    )
    assert opt["bytes_before"] == before
    assert opt["bytes_after"] * 2 == before
    assert sd15.call(CommandType.GET_MODEL_INFO, {"name": "u"})["models"][0]["dtype"] == "float16"
    back = sd15.call(CommandType.OPTIMIZE_MODEL, {"name": "u", "revert": True})
    assert back["bytes_after"] == before
    with pytest.raises(ProtocolError) as info:
        sd15.call(CommandType.OPTIMIZE_MODEL, {"name": "u", "options": {"warp_drive": True}})
    assert info.value.code is ErrorCode.INVALID_REQUEST
