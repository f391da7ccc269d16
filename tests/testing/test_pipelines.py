"""The demo pipelines run, and diffusers loads the demo LoRAs and embeddings into them."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from diffusers import StableDiffusionPipeline, StableDiffusionXLPipeline
from safetensors.torch import load_file

from modelkeeper.testing import DemoManifest, make_pipeline, save_pipeline_folder
from modelkeeper.testing.embeddings import DEFAULT_TOKEN
from tests.testing.conftest import GROUP

pytestmark = GROUP


def _load(cls: Any, folder: Path) -> Any:
    pipe = cls.from_pretrained(folder, local_files_only=True)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def _run(pipe: Any, prompt: str = "a photo of a cat", size: int = 64) -> np.ndarray[Any, Any]:
    generator = torch.Generator().manual_seed(0)
    out = pipe(prompt, num_inference_steps=2, height=size, width=size, generator=generator, output_type="np")
    image: np.ndarray[Any, Any] = out.images[0]
    return image


def _unet_out(pipe: Any) -> torch.Tensor:
    """One UNet step on fixed inputs: what a LoRA changes."""
    unet = pipe.unet
    kwargs: dict[str, Any] = {
        "encoder_hidden_states": torch.ones(1, 77, unet.config.cross_attention_dim) * 0.1,
    }
    if unet.config.addition_embed_type == "text_time":
        kwargs["added_cond_kwargs"] = {
            "text_embeds": torch.ones(1, 1280) * 0.1,
            "time_ids": torch.zeros(1, 6),
        }
    with torch.no_grad():
        sample: torch.Tensor = unet(torch.ones(1, 4, 8, 8) * 0.1, 10, **kwargs).sample
    return sample


@pytest.mark.parametrize(
    ("name", "cls"),
    [("sd15-pipeline", StableDiffusionPipeline), ("sdxl-pipeline", StableDiffusionXLPipeline)],
)
def test_pipeline_folder_generates(demo: DemoManifest, name: str, cls: Any) -> None:
    pipe = _load(cls, demo.path(name))
    assert type(pipe).__name__ == demo[name].class_name
    assert pipe.unet.dtype == torch.float32 and pipe.text_encoder.dtype == torch.float32
    image = _run(pipe)
    assert image.shape == (64, 64, 3) and np.isfinite(image).all()
    assert image.min() >= 0.0 and image.max() <= 1.0 and image.std() > 0


def test_sd2_pipeline_is_v_prediction_and_generates(tmp_path: Path) -> None:
    folder = save_pipeline_folder(make_pipeline("sd2"), tmp_path / "sd2")
    pipe = _load(StableDiffusionPipeline, folder)
    assert pipe.scheduler.config.prediction_type == "v_prediction"
    assert pipe.unet.config.cross_attention_dim == pipe.text_encoder.config.hidden_size == 1024
    assert _run(pipe, size=32).shape == (32, 32, 3)


@pytest.mark.parametrize("lora", ["sd15-lora-peft", "sd15-lora-kohya"])
def test_sd15_loras_load_into_the_pipeline(demo: DemoManifest, lora: str) -> None:
    pipe = _load(StableDiffusionPipeline, demo.path("sd15-pipeline"))
    before = _unet_out(pipe)
    ids = pipe.tokenizer("a photo", return_tensors="pt").input_ids
    with torch.no_grad():
        text_before = pipe.text_encoder(ids).last_hidden_state
    pipe.load_lora_weights(str(demo.path(lora)))
    assert not torch.equal(_unet_out(pipe), before)
    with torch.no_grad():
        assert not torch.equal(pipe.text_encoder(ids).last_hidden_state, text_before)


@pytest.mark.parametrize("lora", ["sdxl-lora-peft", "sdxl-lora-kohya"])
def test_sdxl_loras_load_into_the_pipeline(demo: DemoManifest, lora: str) -> None:
    pipe = _load(StableDiffusionXLPipeline, demo.path("sdxl-pipeline"))
    before = _unet_out(pipe)
    pipe.load_lora_weights(str(demo.path(lora)))
    assert not torch.equal(_unet_out(pipe), before)
    assert pipe.text_encoder_2.peft_config  # the CLIP-G half of the LoRA found its modules


def test_embeddings_load_into_the_pipelines(demo: DemoManifest) -> None:
    pipe = _load(StableDiffusionPipeline, demo.path("sd15-pipeline"))
    pipe.load_textual_inversion(str(demo.path("sd15-embedding-a1111")), token="<a1111>")
    pipe.load_textual_inversion(str(demo.path("sd15-embedding-diffusers")))
    for token in ("<a1111>", DEFAULT_TOKEN):
        assert token in pipe.tokenizer.get_vocab()
    embedding = load_file(demo.path("sd15-embedding-a1111"))["emb_params"]
    first = pipe.tokenizer.convert_tokens_to_ids("<a1111>")
    assert torch.equal(pipe.text_encoder.get_input_embeddings().weight[first], embedding[0])
    assert _run(pipe, f"a photo of {DEFAULT_TOKEN}", size=32).shape == (32, 32, 3)

    xl = _load(StableDiffusionXLPipeline, demo.path("sdxl-pipeline"))
    tensors = load_file(demo.path("sdxl-embedding"))
    xl.load_textual_inversion(
        tensors["clip_l"], token="<xl>", text_encoder=xl.text_encoder, tokenizer=xl.tokenizer
    )
    xl.load_textual_inversion(
        tensors["clip_g"], token="<xl>", text_encoder=xl.text_encoder_2, tokenizer=xl.tokenizer_2
    )
    assert _run(xl, "a photo of <xl>", size=32).shape == (32, 32, 3)
