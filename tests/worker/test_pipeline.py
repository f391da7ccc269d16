"""The modules a worker loads are usable: a diffusers SDXL pipeline built from them generates an image."""

from __future__ import annotations

import pytest
import torch

from modelkeeper.protocol import CommandType
from modelkeeper.testing import DemoManifest
from modelkeeper.worker import InProcessWorker


def test_sdxl_pipeline_from_worker_loaded_components(inproc: InProcessWorker, demo: DemoManifest) -> None:
    from diffusers import EulerDiscreteScheduler, StableDiffusionXLPipeline

    root = demo.path("sdxl-pipeline")
    for name, kind, encoder in [("unet", "unet", None), ("vae", "vae", None), ("text_encoder", "text_encoder", "clip_l"),
                                ("text_encoder_2", "text_encoder", "clip_g"), ("tokenizer", "tokenizer", "clip_l"),
                                ("tokenizer_2", "tokenizer", "clip_g")]:  # fmt: skip
        data = {"name": name, "path": str(root), "type": kind, **({"encoder": encoder} if encoder else {})}
        inproc.call(CommandType.LOAD_MODEL, data)
    modules = {
        name: inproc.module(name)
        for name in ("unet", "vae", "text_encoder", "text_encoder_2", "tokenizer", "tokenizer_2")
    }
    assert modules["text_encoder_2"].__class__.__name__ == "CLIPTextModelWithProjection"
    device = inproc.service.device
    dtype = torch.float16 if device.type == "cuda" else torch.float32
    for name in ("unet", "vae", "text_encoder", "text_encoder_2"):
        modules[name].to(dtype)
    scheduler = EulerDiscreteScheduler.from_pretrained(root, subfolder="scheduler")
    pipe = StableDiffusionXLPipeline(scheduler=scheduler, **modules)
    generator = torch.Generator("cpu").manual_seed(0)
    image = pipe(
        "a tiny cat", num_inference_steps=2, height=64, width=64, generator=generator, output_type="pil"
    ).images[0]
    assert image.size == (64, 64)
    array = pipe(
        "a tiny cat", num_inference_steps=2, height=64, width=64, generator=generator, output_type="np"
    ).images
    assert array.shape == (1, 64, 64, 3)
    assert bool(torch.isfinite(torch.from_numpy(array)).all())


@pytest.mark.parametrize("name", ["sd15-pipeline"])
def test_sd15_pipeline_from_worker_loaded_components(
    inproc: InProcessWorker, demo: DemoManifest, name: str
) -> None:
    from diffusers import PNDMScheduler, StableDiffusionPipeline

    root = demo.path(name)
    for kind in ("unet", "vae", "text_encoder", "tokenizer"):
        inproc.call(
            CommandType.LOAD_MODEL, {"name": kind, "path": str(root), "type": kind, "dtype": "float32"}
        )
    modules = {kind: inproc.module(kind) for kind in ("unet", "vae", "text_encoder", "tokenizer")}
    pipe = StableDiffusionPipeline(
        scheduler=PNDMScheduler.from_pretrained(root, subfolder="scheduler"),
        safety_checker=None, feature_extractor=None, requires_safety_checker=False, **modules,
    )  # fmt: skip
    out = pipe("a tiny dog", num_inference_steps=2, height=64, width=64, output_type="np").images
    assert out.shape == (1, 64, 64, 3)
