"""Validation of live modules: models loaded from the demo files pass every level; a planted NaN,
a shape that does not match the config and a never-loaded weight are caught."""

from __future__ import annotations

from typing import Any

import pytest
import torch

from modelkeeper.protocol import CommandType
from modelkeeper.testing import DemoManifest, make_text_encoder, make_unet, make_vae
from modelkeeper.worker import InProcessWorker
from modelkeeper.worker.errors import InvalidRequest
from modelkeeper.worker.validate import LEVELS, validate, validate_generation

from .conftest import load_data

LOADED = {"sd15-unet": CommandType.LOAD_UNET, "sdxl-unet": CommandType.LOAD_UNET,
          "sdxl-refiner-unet": CommandType.LOAD_UNET, "sd15-vae": CommandType.LOAD_VAE,
          "flux-vae": CommandType.LOAD_VAE, "clip-g": CommandType.LOAD_ENCODER, "t5": CommandType.LOAD_ENCODER}  # fmt: skip


pytestmark = pytest.mark.usefixtures("one_torch_thread")


def by_name(report: Any) -> dict[str, Any]:
    return {c.name: c for c in report.checks}


def test_loaded_models_pass_every_level(inproc: InProcessWorker, demo: DemoManifest) -> None:
    for name, command in LOADED.items():
        inproc.call(command, load_data(demo[name], demo.root))
        report = validate(inproc.module(name), "functional")
        assert report.passed, (name, [c for c in report.checks if not c.passed])
        checks = by_name(report)
        assert {"structure", "dtypes", "device", "finite", "statistics"} <= set(checks)
        forward = [c for c in report.checks if c.level == "functional"]
        assert forward and all(c.data["output_shape"] for c in forward)
        assert all(c.seconds >= 0 for c in report.checks)
        assert [c.level for c in report.checks] == sorted((c.level for c in report.checks), key=LEVELS.index)
        stats = checks["statistics"].data
        assert stats["min"] <= stats["mean_range"][0] <= stats["mean_range"][1] <= stats["max"]
        assert 0 < stats["std_range"][0] <= stats["std_range"][1]
    vae = by_name(validate(inproc.module("flux-vae"), "functional"))
    assert vae["encode"].data["output_shape"][1] == 16 and vae["decode"].data["output_shape"][1] == 3


def test_planted_nan_is_caught() -> None:
    unet = make_unet("sd1")
    name = "down_blocks.0.attentions.0.transformer_blocks.0.attn1.to_q.weight"
    with torch.no_grad():
        unet.get_parameter(name)[3, 5] = float("nan")
        unet.get_parameter("conv_out.bias")[0] = float("inf")
    assert validate(unet, "header").passed  # structure alone cannot see it
    report = validate(unet, "functional")
    checks = by_name(report)
    assert not report.passed and not checks["finite"].passed
    assert checks["finite"].data == {"nan_count": 1, "inf_count": 1, "tensors": ["conv_out.bias", name]} or (
        checks["finite"].data["tensors"] == [name, "conv_out.bias"]
    )
    assert "1 NaN and 1 Inf" in checks["finite"].detail
    assert not checks["forward"].passed and "non-finite" in checks["forward"].detail
    assert checks["statistics"].passed  # the finite tensors are still summarised


def test_shape_mismatch_and_missing_weights_are_caught() -> None:
    unet = make_unet("sd1")
    unet.conv_in.weight = torch.nn.Parameter(torch.zeros(32, 5, 3, 3), requires_grad=False)
    report = validate(unet, "header")
    structure = by_name(report)["structure"]
    assert not report.passed and not structure.passed
    assert structure.data["mismatched"] == ["conv_in.weight (32, 5, 3, 3) vs config (32, 4, 3, 3)"]
    assert "of another shape" in structure.detail
    functional = by_name(validate(unet, "functional"))["forward"]
    assert not functional.passed and "RuntimeError" in functional.detail  # the wrong shape breaks the forward

    encoder = make_text_encoder("clip_l")
    layer = encoder.get_submodule("encoder.layers.0.mlp.fc1")
    layer.weight = torch.nn.Parameter(torch.empty(64, 768, device="meta"), requires_grad=False)
    dtypes = by_name(validate(encoder, "header"))["dtypes"]
    assert not dtypes.passed and dtypes.data["meta"] == ["encoder.layers.0.mlp.fc1.weight"]
    assert not by_name(validate(encoder, "header"))["device"].passed  # cpu and meta


def test_zero_tensors_are_reported_not_failed() -> None:
    vae = make_vae("sd1")
    with torch.no_grad():
        vae.decoder.conv_out.weight.zero_()
    report = validate(vae, "weights")
    stats = by_name(report)["statistics"]
    assert report.passed and stats.data["zero_tensors"] == ["decoder.conv_out.weight"]


def test_transformers_and_controlnet_forward() -> None:
    from diffusers.models.controlnets.controlnet import ControlNetModel
    from diffusers.models.transformers.transformer_flux import FluxTransformer2DModel
    from diffusers.models.transformers.transformer_sd3 import SD3Transformer2DModel

    torch.manual_seed(0)
    flux = FluxTransformer2DModel(patch_size=1, in_channels=16, num_layers=1, num_single_layers=1,
                                  attention_head_dim=16, num_attention_heads=2, joint_attention_dim=32,
                                  pooled_projection_dim=32, guidance_embeds=True, axes_dims_rope=(4, 6, 6))  # fmt: skip
    sd3 = SD3Transformer2DModel(sample_size=8, patch_size=2, in_channels=16, num_layers=1, attention_head_dim=16,
                                num_attention_heads=2, joint_attention_dim=32, caption_projection_dim=32,
                                pooled_projection_dim=32, out_channels=16)  # fmt: skip
    controlnet = ControlNetModel.from_unet(make_unet("sdxl"), conditioning_channels=3)
    for module in (flux.eval(), sd3.eval(), controlnet.eval()):
        report = validate(module, "functional")
        assert report.passed, [c for c in report.checks if not c.passed]
        assert by_name(report)["forward"].data["output_shape"][0] == 1
    assert by_name(validate(flux, "functional", batch=2))["forward"].data["output_shape"] == [2, 16, 16]


def test_one_step_generation_of_a_set() -> None:
    check = validate_generation(
        {"unet": make_unet("sdxl"), "vae": make_vae("sdxl"), "text_encoder": make_text_encoder("clip_l"),
         "text_encoder_2": make_text_encoder("clip_g")}
    )  # fmt: skip
    assert check.passed, check.detail
    assert check.data["image_shape"] == [1, 3, 64, 64] and check.data["context_shape"] == [1, 8, 2048]


def test_unknown_level_and_unknown_class() -> None:
    with pytest.raises(InvalidRequest, match=r"data\.level"):
        validate(make_vae("sd1"), "deep")  # type: ignore[arg-type]
    report = validate(torch.nn.Linear(4, 4), "functional")
    assert report.passed and by_name(report)["forward"].detail.startswith("skipped")
    assert by_name(report)["structure"].detail.startswith("skipped")
