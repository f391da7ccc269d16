"""Every command has a typed result, and the result models describe what a real worker answers.

The answers come from an in-process worker (the real server and protocol over pipes) on the tiny
demo models; each is validated with its result model and checked to hold no key the model does not
declare, at any depth, so the models document the answers rather than merely tolerate them.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import pytest
from pydantic import BaseModel

from modelkeeper.protocol import COMMAND_MODELS, LORA_ROLES, CommandType, LoraRole, messages, protocol_schema
from modelkeeper.protocol.messages import (
    BenchmarkModelResult,
    LoadLoraRequest,
    LoadLoraResult,
    OptimizeModelResult,
    SetLoraStrengthResult,
    UnloadLoraResult,
    ValidateModelResult,
)
from modelkeeper.testing import DemoManifest
from modelkeeper.worker import InProcessWorker

NEW_RESULTS = {
    CommandType.LOAD_LORA: LoadLoraResult,
    CommandType.SET_LORA_STRENGTH: SetLoraStrengthResult,
    CommandType.UNLOAD_LORA: UnloadLoraResult,
    CommandType.VALIDATE_MODEL: ValidateModelResult,
    CommandType.BENCHMARK_MODEL: BenchmarkModelResult,
    CommandType.OPTIMIZE_MODEL: OptimizeModelResult,
}


# ----------------------------------------------------------------------------- the table


@pytest.mark.parametrize("command", list(CommandType))
def test_every_command_has_a_request_and_a_typed_result(command: CommandType) -> None:
    assert command in COMMAND_MODELS, f"{command} has no entry in COMMAND_MODELS"
    request, result = COMMAND_MODELS[command]
    declared = result.model_fields
    assert issubclass(request, messages._Strict), f"{command}'s request must refuse unknown fields"
    assert result is not messages._Open, f"{command} answers a bare _Open: give it a result model"
    assert declared, f"{command}'s result {result.__name__} declares no field"


@pytest.mark.parametrize(("command", "model"), NEW_RESULTS.items())
def test_schema_has_each_result(command: CommandType, model: type[BaseModel]) -> None:
    result = protocol_schema()["commands"][command.value]["result"]
    assert result["title"] == model.__name__
    required = {n for n, f in model.model_fields.items() if f.is_required()}
    assert set(result["required"]) == required
    assert set(result["properties"]) == set(model.model_fields)


def test_lora_roles_are_one_table() -> None:
    assert tuple(LoraRole) == LORA_ROLES
    assert [r.value for r in LORA_ROLES] == ["unet", "transformer", "text_encoder", "text_encoder_2",
                                             "text_encoder_3"]  # fmt: skip
    data = protocol_schema()["commands"][CommandType.LOAD_LORA.value]["data"]
    assert "LoraRole" in data["$defs"]
    with pytest.raises(ValueError, match=r"targets\.vae"):
        LoadLoraRequest.model_validate({"name": "l", "path": "/l.safetensors", "targets": {"vae": "v"}})


# ----------------------------------------------------------------------------- real answers


def assert_documented(model: type[BaseModel], answer: dict[str, Any]) -> BaseModel:
    """``answer`` validates and every key in it, at any depth, is a field its model declares."""
    assert set(answer) <= set(model.model_fields), sorted(set(answer) - set(model.model_fields))
    parsed = model.model_validate(answer)
    _no_extra(parsed, model.__name__)
    return parsed


def _no_extra(value: Any, where: str) -> None:
    if isinstance(value, BaseModel):
        assert not value.model_extra, f"{where}: undeclared {sorted(value.model_extra or {})}"
        for name in type(value).model_fields:
            _no_extra(getattr(value, name), f"{where}.{name}")
    elif isinstance(value, list):
        for i, item in enumerate(value):
            _no_extra(item, f"{where}[{i}]")
    elif isinstance(value, dict):
        for key, item in value.items():
            _no_extra(item, f"{where}.{key}")


def fields(model: type[BaseModel], *leave_out: str) -> set[str]:
    return set(model.model_fields) - set(leave_out)


@pytest.fixture(scope="module")
def sd15(demo: DemoManifest, worker_device: str) -> Iterator[InProcessWorker]:
    """An in-process worker holding the tiny SD1.5 UNet (``u``) and text encoder (``te``)."""
    root = str(demo.path("sd15-pipeline"))
    with InProcessWorker(worker_device) as w:
        for name, kind in (("u", "unet"), ("te", "text_encoder")):
            w.call(CommandType.LOAD_MODEL, {"name": name, "path": root, "type": kind, "dtype": "float32"})
        yield w


def test_lora_answers(sd15: InProcessWorker, demo: DemoManifest) -> None:
    path = str(demo.path("sd15-lora-kohya"))
    loaded = sd15.call(
        CommandType.LOAD_LORA,
        {"name": "l", "path": path, "targets": {"unet": "u", "text_encoder": "te"},
         "role_strength": {"text_encoder": 0.5}},
    )  # fmt: skip
    assert set(loaded) == fields(LoadLoraResult)
    report = assert_documented(LoadLoraResult, loaded)
    assert isinstance(report, LoadLoraResult)
    assert set(report.roles) == {LoraRole.UNET, LoraRole.TEXT_ENCODER}
    assert report.role_strength == {LoraRole.TEXT_ENCODER: 0.5}
    assert report.skipped_roles == []

    strength = sd15.call(
        CommandType.SET_LORA_STRENGTH, {"name": "l", "strength": 0.5, "role_strength": {"unet": 0.25}}
    )
    assert set(strength) == fields(SetLoraStrengthResult)
    assert_documented(SetLoraStrengthResult, strength)

    removed = sd15.call(CommandType.UNLOAD_LORA, {"name": "l"})
    assert set(removed) == fields(UnloadLoraResult)
    assert_documented(UnloadLoraResult, removed)

    # a role the file has keys for but no target was given for
    only_unet = sd15.call(CommandType.LOAD_LORA, {"name": "l", "path": path, "targets": {"unet": "u"}})
    partial = assert_documented(LoadLoraResult, only_unet)
    assert isinstance(partial, LoadLoraResult)
    assert partial.skipped_roles == ["text_encoder"]
    assert partial.role_strength == {}
    sd15.call(CommandType.UNLOAD_LORA, {"name": "l"})


@pytest.mark.parametrize("level", ["header", "weights", "functional"])
def test_validate_answers(sd15: InProcessWorker, level: str) -> None:
    for name in ("u", "te"):
        answer = sd15.call(CommandType.VALIDATE_MODEL, {"name": name, "level": level})
        assert set(answer) == fields(ValidateModelResult)
        report = assert_documented(ValidateModelResult, answer)
        assert isinstance(report, ValidateModelResult)
        assert report.passed, [c.detail for c in report.checks if not c.passed]
        assert {c.level for c in report.checks} >= {"header"}


def test_benchmark_answers(sd15: InProcessWorker) -> None:
    for name, resolution in (("u", 64), ("te", None)):
        data: dict[str, Any] = {"name": name, "steps": 1, "warmup": 0, "tokens": 8}
        if resolution is not None:
            data["resolution"] = resolution
        answer = sd15.call(CommandType.BENCHMARK_MODEL, data)
        assert set(answer) == fields(BenchmarkModelResult)
        report = assert_documented(BenchmarkModelResult, answer)
        assert isinstance(report, BenchmarkModelResult)
        assert report.figures
        for figure in report.figures:
            assert figure.resolution == resolution
            assert set(answer["figures"][0]) == set(type(figure).model_fields)


def test_optimize_and_revert_answers(sd15: InProcessWorker, demo: DemoManifest) -> None:
    root = str(demo.path("sd15-pipeline"))
    sd15.call(CommandType.LOAD_MODEL, {"name": "opt", "path": root, "type": "unet", "dtype": "float32"})
    options = {"dtype": "float16", "channels_last": True, "attention": "default", "vae_slicing": True}
    answer = sd15.call(CommandType.OPTIMIZE_MODEL, {"name": "opt", "options": options, "measure": False})
    assert set(answer) == fields(OptimizeModelResult, "reverted")
    report = assert_documented(OptimizeModelResult, answer)
    assert isinstance(report, OptimizeModelResult)
    applied = {a.option: a for a in report.applied or []}
    assert set(applied) == {"dtype", "channels_last", "attention"}
    assert applied["dtype"].lossless is not None and applied["channels_last"].after is True
    assert isinstance(applied["attention"].before, str)
    assert [s.option for s in report.skipped or []] == ["vae_slicing"]
    assert report.latency_before_s is None and report.speedup is None

    reverted = sd15.call(CommandType.OPTIMIZE_MODEL, {"name": "opt", "revert": True})
    assert set(reverted) == {"name", "bytes_before", "bytes_after", "reverted"}
    undone = assert_documented(OptimizeModelResult, reverted)
    assert isinstance(undone, OptimizeModelResult)
    assert undone.reverted == ["attention", "channels_last", "dtype"]
    assert undone.bytes_after == report.bytes_before
    sd15.call(CommandType.UNLOAD_MODEL, {"name": "opt"})
