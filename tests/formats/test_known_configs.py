"""The shipped configs are the real ones: built on the meta device, each model has the published size.

Parameter counts and where each comes from:

* SD 1.x UNet 859,520,964, SD 2.x UNet 865,910,724, SDXL base UNet 2,567,463,684, SD VAE 83,653,863,
  CLIP ViT-L/14 text 123,060,480, OpenCLIP ViT-H text (23 layers) 340,387,840, OpenCLIP bigG text with
  projection 694,659,840: published counts, and each agrees with the size of the official fp32
  safetensors file (count x 4 bytes plus a 24-225 kB JSON header).
* T5 v1.1 XXL encoder 4,762,310,656, FLUX.1-dev transformer 11,901,408,320, SD3 medium transformer
  2,028,328,000: published counts.
* Derived from a published count by exact arithmetic: SD 1.5 inpainting UNet (+ 5 input channels of
  the 320-channel 3x3 conv_in: +14,400), CLIP-L with projection (+ a 768x768 projection: +589,824),
  16-channel VAE of SD3 / FLUX (no quant convs: -92; 32-channel encoder output: +110,616; 16-channel
  decoder input: +55,296), FLUX.1-schnell (no guidance embedder: -10,229,760).
* SDXL refiner UNet: no exact published count to cite (about 2.26 B, 4.5 GB in fp16), so it is checked
  to 0.1 % together with the structure of Stability's sd_xl_refiner.yaml (384 channels, depth 4, 1280
  context, 2560 ADM inputs).
"""

from __future__ import annotations

import functools
import json
import re
from importlib import resources
from typing import Any, cast

import diffusers
import pytest
import torch
import transformers
from torch import nn

from modelkeeper.formats.known_configs import (
    BOOKKEEPING_KEYS,
    KnownBase,
    UnknownConfigError,
    known_base,
    known_bases,
    known_components,
    load_known_config,
    model_index,
)

BASES = ["flux_dev", "flux_schnell", "sd1", "sd1_inpaint", "sd2", "sd2_base", "sd3", "sdxl", "sdxl_refiner"]

CLIP_L = 123_060_480
CLIP_L_PROJ = CLIP_L + 768 * 768
CLIP_G_PROJ = 694_659_840
OPENCLIP_H = 340_387_840
T5_XXL = 4_762_310_656
SD_VAE = 83_653_863
SD_VAE_16CH = SD_VAE - 92 + (32 - 8) * 512 * 9 + 24 + (16 - 4) * 512 * 9
FLUX_DEV = 11_901_408_320
FLUX_GUIDANCE_EMBEDDER = (256 * 3072 + 3072) + (3072 * 3072 + 3072)

EXACT_COUNTS: dict[tuple[str, str], int] = {
    ("sd1", "unet"): 859_520_964,
    ("sd1", "vae"): SD_VAE,
    ("sd1", "text_encoder"): CLIP_L,
    ("sd1_inpaint", "unet"): 859_520_964 + 5 * 320 * 3 * 3,
    ("sd1_inpaint", "vae"): SD_VAE,
    ("sd1_inpaint", "text_encoder"): CLIP_L,
    ("sd2", "unet"): 865_910_724,
    ("sd2", "vae"): SD_VAE,
    ("sd2", "text_encoder"): OPENCLIP_H,
    ("sd2_base", "unet"): 865_910_724,
    ("sd2_base", "vae"): SD_VAE,
    ("sd2_base", "text_encoder"): OPENCLIP_H,
    ("sdxl", "unet"): 2_567_463_684,
    ("sdxl", "vae"): SD_VAE,
    ("sdxl", "text_encoder"): CLIP_L,
    ("sdxl", "text_encoder_2"): CLIP_G_PROJ,
    ("sdxl_refiner", "vae"): SD_VAE,
    ("sdxl_refiner", "text_encoder_2"): CLIP_G_PROJ,
    ("sd3", "transformer"): 2_028_328_000,
    ("sd3", "vae"): SD_VAE_16CH,
    ("sd3", "text_encoder"): CLIP_L_PROJ,
    ("sd3", "text_encoder_2"): CLIP_G_PROJ,
    ("sd3", "text_encoder_3"): T5_XXL,
    ("flux_dev", "transformer"): FLUX_DEV,
    ("flux_dev", "vae"): SD_VAE_16CH,
    ("flux_dev", "text_encoder"): CLIP_L,
    ("flux_dev", "text_encoder_2"): T5_XXL,
    ("flux_schnell", "transformer"): FLUX_DEV - FLUX_GUIDANCE_EMBEDDER,
    ("flux_schnell", "vae"): SD_VAE_16CH,
    ("flux_schnell", "text_encoder"): CLIP_L,
    ("flux_schnell", "text_encoder_2"): T5_XXL,
}
APPROX_COUNTS: dict[tuple[str, str], int] = {("sdxl_refiner", "unet"): 2_259_526_660}


def _build_on_meta(config: dict[str, Any]) -> nn.Module:
    """Instantiate the class the config names, with every tensor on the meta device (no memory, no init)."""
    # torch.device("meta") rather than accelerate.init_empty_weights: the latter breaks T5's tie of
    # encoder.embed_tokens to shared, which would count the 131M-parameter embedding twice.
    if "_class_name" in config:
        model_class = getattr(diffusers, config["_class_name"])
        with torch.device("meta"):
            return cast(nn.Module, model_class.from_config(config))
    model_class = getattr(transformers, config["architectures"][0])
    model_config = model_class.config_class.from_dict(config)
    with torch.device("meta"):
        return cast(nn.Module, model_class(model_config))


@functools.cache
def _built(config_text: str) -> nn.Module:
    """Components shared by several bases (CLIP-L, the SD VAE, T5) are built once."""
    return _build_on_meta(json.loads(config_text))


def _module(base: str, component: str) -> nn.Module:
    return _built(json.dumps(load_known_config(base, component), sort_keys=True))


def _count(module: nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())


def _count_type(module: nn.Module, type_name: str) -> int:
    return sum(type(m).__name__ == type_name for m in module.modules())


# ---------------------------------------------------------------------------------------------------
# The API
# ---------------------------------------------------------------------------------------------------


def test_known_bases() -> None:
    assert known_bases() == BASES


def test_known_components() -> None:
    assert known_components("sd1") == ["scheduler", "text_encoder", "unet", "vae"]
    assert known_components("sdxl_refiner") == ["scheduler", "text_encoder_2", "unet", "vae"]
    assert known_components("sd3") == [
        "scheduler",
        "text_encoder",
        "text_encoder_2",
        "text_encoder_3",
        "transformer",
        "vae",
    ]
    assert known_components("flux_dev") == [
        "scheduler",
        "text_encoder",
        "text_encoder_2",
        "transformer",
        "vae",
    ]


def test_known_base_describes_family_variant_and_source() -> None:
    assert known_base("flux_schnell") == KnownBase(
        name="flux_schnell",
        family="flux",
        variant="schnell",
        repo="black-forest-labs/FLUX.1-schnell",
        components=("scheduler", "text_encoder", "text_encoder_2", "transformer", "vae"),
    )
    assert known_base("sdxl").variant is None
    assert {known_base(b).family for b in BASES} == {"sd1", "sd2", "sdxl", "sdxl_refiner", "sd3", "flux"}


def test_load_returns_a_fresh_copy() -> None:
    first = load_known_config("sd1", "unet")
    first["in_channels"] = 99
    first["block_out_channels"].append(1)
    again = load_known_config("sd1", "unet")
    assert again["in_channels"] == 4
    assert again["block_out_channels"] == [320, 640, 1280, 1280]
    index = model_index("sd1")
    index.clear()
    assert model_index("sd1")["_class_name"] == "StableDiffusionPipeline"


def test_unknown_base_names_it_and_lists_the_known_ones() -> None:
    with pytest.raises(UnknownConfigError) as caught:
        load_known_config("sd4", "unet")
    assert isinstance(caught.value, KeyError)
    message = str(caught.value)
    assert "'sd4'" in message
    assert all(base in message for base in BASES)
    with pytest.raises(KeyError, match="sd4"):
        model_index("sd4")
    with pytest.raises(KeyError, match="sd4"):
        known_components("sd4")


def test_unknown_component_names_it_and_lists_the_known_ones() -> None:
    with pytest.raises(UnknownConfigError) as caught:
        load_known_config("sdxl_refiner", "text_encoder")
    message = str(caught.value)
    assert "'sdxl_refiner'" in message
    assert "'text_encoder'" in message
    assert "scheduler, text_encoder_2, unet, vae" in message
    with pytest.raises(UnknownConfigError, match="model_index"):
        load_known_config("sd1", "model_index")


# ---------------------------------------------------------------------------------------------------
# The files
# ---------------------------------------------------------------------------------------------------


def test_every_file_is_shipped_by_the_package_data_glob() -> None:
    root = resources.files("modelkeeper.formats").joinpath("configs")
    files = [f"{d.name}/{f.name}" for d in root.iterdir() if d.is_dir() for f in d.iterdir()]
    files += [f.name for f in root.iterdir() if f.is_file()]
    # pyproject.toml: package-data "formats/configs/*/*.json" and "formats/configs/*.json".
    assert all(re.fullmatch(r"([a-z0-9_]+/)?[a-z0-9_]+\.json", f) for f in files), files
    assert {f.split("/")[0] for f in files if "/" in f} == set(BASES)


@pytest.mark.parametrize("base", BASES)
def test_no_bookkeeping_keys(base: str) -> None:
    for config in [model_index(base), *(load_known_config(base, c) for c in known_components(base))]:
        assert not BOOKKEEPING_KEYS & config.keys()


@pytest.mark.parametrize("base", BASES)
def test_model_index_names_the_shipped_components_and_their_classes(base: str) -> None:
    index = model_index(base)
    assert index["_class_name"].endswith("Pipeline")
    models = {
        name: spec[1]
        for name, spec in index.items()
        if isinstance(spec, list)
        and spec[0] is not None
        and not name.startswith("tokenizer")
        and name not in {"feature_extractor", "safety_checker"}
    }
    assert sorted(models) == known_components(base)
    for component, class_name in models.items():
        config = load_known_config(base, component)
        assert class_name == config.get("_class_name", (config.get("architectures") or [None])[0])


@pytest.mark.parametrize("base", BASES)
def test_scheduler_is_built_by_the_class_it_names(base: str) -> None:
    config = load_known_config(base, "scheduler")
    scheduler = getattr(diffusers, config["_class_name"]).from_config(config)
    assert scheduler.config.num_train_timesteps == 1000


# ---------------------------------------------------------------------------------------------------
# The models: built on the meta device from the config alone, sized as published
# ---------------------------------------------------------------------------------------------------


def test_counts_cover_every_model_component() -> None:
    models = {(b, c) for b in BASES for c in known_components(b) if c != "scheduler"}
    assert models == set(EXACT_COUNTS) | set(APPROX_COUNTS)


@pytest.mark.parametrize(("base", "component"), sorted(EXACT_COUNTS))
def test_parameter_count_is_the_published_one(base: str, component: str) -> None:
    module = _module(base, component)
    assert next(module.parameters()).device.type == "meta"
    assert _count(module) == EXACT_COUNTS[base, component]


@pytest.mark.parametrize(("base", "component"), sorted(APPROX_COUNTS))
def test_parameter_count_is_close_to_the_published_size(base: str, component: str) -> None:
    assert _count(_module(base, component)) == pytest.approx(APPROX_COUNTS[base, component], rel=1e-3)


def test_sd1_structure() -> None:
    unet = load_known_config("sd1", "unet")
    assert (unet["cross_attention_dim"], unet["in_channels"], unet["attention_head_dim"]) == (768, 4, 8)
    assert load_known_config("sd1_inpaint", "unet")["in_channels"] == 9
    assert _count_type(_module("sd1", "unet"), "BasicTransformerBlock") == 16
    assert load_known_config("sd1", "vae")["latent_channels"] == 4
    text = load_known_config("sd1", "text_encoder")
    assert (text["hidden_size"], text["num_hidden_layers"], text["hidden_act"]) == (768, 12, "quick_gelu")
    assert load_known_config("sd1", "scheduler")["_class_name"] == "PNDMScheduler"


def test_sd2_structure() -> None:
    for base, sample_size, prediction in (("sd2", 96, "v_prediction"), ("sd2_base", 64, "epsilon")):
        unet = load_known_config(base, "unet")
        assert unet["cross_attention_dim"] == 1024
        assert unet["attention_head_dim"] == [5, 10, 20, 20]
        assert unet["use_linear_projection"] is True
        assert unet["sample_size"] == sample_size
        assert load_known_config(base, "scheduler")["prediction_type"] == prediction
        text = load_known_config(base, "text_encoder")
        assert (text["hidden_size"], text["num_hidden_layers"], text["hidden_act"]) == (1024, 23, "gelu")
    assert load_known_config("sd2", "unet")["upcast_attention"] is True


def test_sdxl_structure() -> None:
    unet = load_known_config("sdxl", "unet")
    assert unet["cross_attention_dim"] == 2048 == 768 + 1280
    assert unet["transformer_layers_per_block"] == [1, 2, 10]
    assert unet["addition_embed_type"] == "text_time"
    assert unet["projection_class_embeddings_input_dim"] == 2816 == 1280 + 6 * 256
    assert _count_type(_module("sdxl", "unet"), "BasicTransformerBlock") == 70
    assert load_known_config("sdxl", "vae")["scaling_factor"] == 0.13025
    bigg = load_known_config("sdxl", "text_encoder_2")
    assert (bigg["hidden_size"], bigg["num_hidden_layers"], bigg["projection_dim"]) == (1280, 32, 1280)
    assert load_known_config("sdxl", "scheduler")["_class_name"] == "EulerDiscreteScheduler"


def test_sdxl_refiner_structure() -> None:
    unet = load_known_config("sdxl_refiner", "unet")
    assert unet["cross_attention_dim"] == 1280
    assert unet["block_out_channels"] == [384, 768, 1536, 1536]
    assert unet["attention_head_dim"] == [6, 12, 24, 24]
    assert unet["transformer_layers_per_block"] == 4
    assert unet["projection_class_embeddings_input_dim"] == 2560 == 1280 + 5 * 256
    assert _count_type(_module("sdxl_refiner", "unet"), "BasicTransformerBlock") == 44
    index = model_index("sdxl_refiner")
    assert index["requires_aesthetics_score"] is True
    assert index["text_encoder"] == [None, None]


def test_sd3_structure() -> None:
    transformer = _module("sd3", "transformer")
    assert _count_type(transformer, "JointTransformerBlock") == 24
    config = load_known_config("sd3", "transformer")
    assert (config["in_channels"], config["joint_attention_dim"], config["pooled_projection_dim"]) == (
        16,
        4096,
        768 + 1280,
    )
    vae = load_known_config("sd3", "vae")
    assert (vae["latent_channels"], vae["scaling_factor"], vae["shift_factor"]) == (16, 1.5305, 0.0609)
    t5 = load_known_config("sd3", "text_encoder_3")
    assert (t5["d_model"], t5["num_layers"], t5["num_heads"], t5["d_ff"]) == (4096, 24, 64, 10240)
    assert load_known_config("sd3", "scheduler")["shift"] == 3.0


@pytest.mark.parametrize(
    ("base", "guidance", "shift"), [("flux_dev", True, 3.0), ("flux_schnell", False, 1.0)]
)
def test_flux_structure(base: str, guidance: bool, shift: float) -> None:
    config = load_known_config(base, "transformer")
    assert config["guidance_embeds"] is guidance
    transformer = _module(base, "transformer")
    assert _count_type(transformer, "FluxTransformerBlock") == 19
    assert _count_type(transformer, "FluxSingleTransformerBlock") == 38
    vae = load_known_config(base, "vae")
    assert (vae["latent_channels"], vae["scaling_factor"], vae["shift_factor"]) == (16, 0.3611, 0.1159)
    scheduler = load_known_config(base, "scheduler")
    assert (scheduler["shift"], scheduler["use_dynamic_shifting"]) == (shift, guidance)
