"""Model-ID mapping: what a worker needs for a registry model, valid for the protocol's LoadRequest."""

from __future__ import annotations

from pathlib import Path

import pytest

from modelkeeper.protocol.messages import LoadRequest
from modelkeeper.registry.errors import ModelNotFound
from modelkeeper.registry.store import Registry


def test_single_file_checkpoint(registry: Registry, models_root: Path) -> None:
    record = registry.resolve("sd15")
    spec = registry.worker_spec(record.id)
    assert (
        spec["type"] == "main"
        and spec["loadable"]
        and set(spec["components"]) == {"unet", "vae", "text_encoder"}
    )
    unet = spec["components"]["unet"]
    assert unet["key_prefix"] == "model.diffusion_model." and unet["layout"] == "original"
    assert unet["config_source"] == "known:sd1/unet"
    request = LoadRequest(**unet["request"])
    assert request.path == str(models_root / "checkpoints" / "sd15.safetensors")
    assert (request.type, request.layout, request.config) == ("unet", "original", "sd1/unet")
    assert request.name == f"{record.id}/unet"
    assert request.estimated_size_mb and request.estimated_size_mb > 1000  # a real SD1.5 UNet in fp16
    te = LoadRequest(**registry.worker_spec(record.id, "text_encoder")["request"])
    assert (te.type, te.encoder, te.config) == ("text_encoder", "clip_l", "sd1/text_encoder")
    assert registry.worker_spec(record.id, "vae")["key_prefix"] == "first_stage_model."


def test_pipeline_folder(registry: Registry, models_root: Path) -> None:
    record = registry.resolve("stable-diffusion-v1-5")
    spec = registry.worker_spec(record.id, "unet")
    request = LoadRequest(**spec["request"])
    assert request.path == str(models_root / "diffusers" / "stable-diffusion-v1-5")
    assert (request.subfolder, request.layout, request.config, request.variant) == (
        "unet",
        "diffusers",
        None,
        "fp16",
    )
    assert spec["config_source"] == "folder"


def test_single_components_and_loras(registry: Registry) -> None:
    vae = registry.worker_spec(registry.resolve("vae-ft-mse").id)
    assert vae["component"] == "vae" and vae["request"]["config"] == "sd1/vae" and vae["key_prefix"] == ""
    LoadRequest(**vae["request"])
    clip = registry.worker_spec(registry.resolve("clip_l").id)
    assert (clip["request"]["encoder"], clip["request"]["config"]) == ("clip_l", "sd1/text_encoder")
    flux = registry.worker_spec(registry.resolve("flux1-dev").id)
    assert (flux["type"], flux["request"]["type"], flux["request"]["config"]) == (
        "transformer",
        "transformer",
        "flux_dev/transformer",
    )
    lora = registry.worker_spec(registry.resolve("style").id)
    assert (lora["type"], lora["request"]["type"], lora["request"]["layout"]) == ("lora", "lora", "auto")
    LoadRequest(**lora["request"])
    embedding = registry.worker_spec(registry.resolve("easynegative").id)
    assert embedding["loadable"] is False


def test_unknown_component(registry: Registry) -> None:
    with pytest.raises(ModelNotFound, match="no component"):
        registry.worker_spec(registry.resolve("sd15").id, "controlnet")
