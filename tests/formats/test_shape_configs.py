"""``fit_config``: the config a single file's shapes imply, over the known config of its base.

Three kinds of case: the published configs fit their own shapes (nothing changes, in either
layout); the two demo files written without a config (a tiny SDXL UNet, a tiny SD1 VAE) get the
architecture they were built with; shrunk variants that are not in the demo set (another number
of levels, layers and attention depth; no mid attention; a two-layer OpenCLIP; T5 with other
heads; a Flux with fewer blocks, an SD 3.5 Large) get a config whose module has exactly the file's
shapes."""

from __future__ import annotations

import json
import re
from collections.abc import Mapping
from typing import Any

import pytest
import torch

from modelkeeper.formats.known_configs import load_known_config
from modelkeeper.formats.safetensors_header import read_header
from modelkeeper.formats.shape_configs import fit_config
from modelkeeper.protocol.messages import ModelKind
from modelkeeper.testing import DemoManifest, write_demo_models
from modelkeeper.testing.components import (
    component_config,
    make_text_encoder,
    make_transformer,
    make_unet,
    make_vae,
    state_dict_for_save,
)
from modelkeeper.testing.original_layout import clip_to_openclip, unet_to_original, vae_to_original
from modelkeeper.worker.assemble import class_name_for, skeleton
from tests.discovery.stripped import flux_bfl, sd3_mmdit

Shapes = dict[str, tuple[int, ...]]


def _shapes(state: Mapping[str, torch.Tensor]) -> Shapes:
    return {k: tuple(v.shape) for k, v in state.items()}


def _module_shapes(kind: ModelKind, config: dict[str, Any]) -> Shapes:
    """The state-dict shapes of the module ``config`` builds (on the meta device), as files store them."""
    return _shapes(state_dict_for_save(skeleton(class_name_for(kind, config), config)))


@pytest.mark.parametrize("base", ["sd1", "sd1_inpaint", "sd2", "sdxl", "sdxl_refiner"])
@pytest.mark.parametrize("component", ["unet", "vae"])
def test_published_configs_fit_their_own_shapes(base: str, component: str) -> None:
    config = load_known_config(base, component)
    kind = ModelKind.UNET if component == "unet" else ModelKind.VAE
    module = skeleton(class_name_for(kind, config), config)
    state = module.state_dict()
    to_original = unet_to_original if component == "unet" else vae_to_original
    assert fit_config(f"{component}/diffusers", _shapes(state), config).changed == ()
    assert fit_config(f"{component}/original", _shapes(to_original(state, config)), config).changed == ()


@pytest.mark.parametrize(
    ("base", "component", "layout"),
    [("sd1", "text_encoder", "clip/transformers"), ("sdxl", "text_encoder_2", "clip/transformers"),
     ("sd2", "text_encoder", "clip/transformers"), ("flux_dev", "text_encoder_2", "t5/transformers")],
)  # fmt: skip
def test_published_text_encoder_configs_fit_their_own_shapes(base: str, component: str, layout: str) -> None:
    config = load_known_config(base, component)
    shapes = _module_shapes(ModelKind.TEXT_ENCODER, config)
    assert fit_config(layout, shapes, config).changed == ()


def test_sd2_openclip_keeps_its_penultimate_layer_config() -> None:
    """SD 2 checkpoints hold 24 OpenCLIP blocks; its text encoder config has 23 (the last is dropped)."""
    config = load_known_config("sd2", "text_encoder")
    state = state_dict_for_save(skeleton("CLIPTextModel", {**config, "num_hidden_layers": 24}))
    openclip = clip_to_openclip(state, prefix="")
    assert fit_config("clip/openclip", _shapes(openclip), config).changed == ()


# ---------------------------------------------------------------------- the two demo files without config


@pytest.fixture(scope="module")
def bare(tmp_path_factory: pytest.TempPathFactory) -> DemoManifest:
    return write_demo_models(tmp_path_factory.mktemp("bare"), only=["sdxl-unet", "sd15-vae"])


STRUCTURE = ("block_out_channels", "layers_per_block", "down_block_types", "up_block_types", "in_channels",
             "out_channels", "cross_attention_dim", "transformer_layers_per_block", "latent_channels",
             "projection_class_embeddings_input_dim")  # fmt: skip


@pytest.mark.parametrize(
    ("name", "known", "layout"),
    [("sdxl-unet", "sdxl/unet", "unet/original"), ("sd15-vae", "sd1/vae", "vae/original")],
)
def test_demo_files_without_config_get_the_architecture_they_were_built_with(
    bare: DemoManifest, name: str, known: str, layout: str
) -> None:
    entry = bare[name]
    assert not entry.config_metadata and entry.config is not None
    header = read_header(bare.path(name))
    fitted = fit_config(
        layout, {k: tuple(t.shape) for k, t in header.tensors.items()}, load_known_config(*known.split("/"))
    )
    assert fitted.changed
    built = json.loads(json.dumps(entry.config))  # tuples as lists, as a config file has them
    assert {f: fitted.config[f] for f in STRUCTURE if f in built} == {
        f: built[f] for f in STRUCTURE if f in built
    }
    # what shapes cannot tell is the base's: the SDXL time embedding, the SD1 VAE's sample size
    if name == "sdxl-unet":
        assert fitted.config["addition_time_embed_dim"] == 256 and fitted.config["sample_size"] == 128
    else:
        assert fitted.config["sample_size"] == 512


# ------------------------------------------------------------------------------ variants not in the demo set


def _fits_exactly(
    kind: ModelKind, module: torch.nn.Module, layout: str, shapes: Shapes, known: dict[str, Any]
) -> dict[str, Any]:
    fitted = fit_config(layout, shapes, known)
    assert fitted.changed
    assert _module_shapes(kind, fitted.config) == _shapes(state_dict_for_save(module))
    return fitted.config


@pytest.mark.parametrize("original", [False, True], ids=["diffusers", "original"])
def test_a_deeper_unet_variant(original: bool) -> None:
    """Three levels (attention in the first two), two layers per level, two transformer blocks per
    attention, 40 heads' worth of width that the SD1 head count (8) does not divide."""
    unet = make_unet(
        "sd1",
        device="meta",
        block_out_channels=(40, 80, 80),
        layers_per_block=2,
        transformer_layers_per_block=(2, 2, 1),
        down_block_types=("CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"),
        up_block_types=("UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"),
        mid_block_type="UNetMidBlock2D",
        attention_head_dim=5,
        norm_num_groups=8,
    )
    state = unet.state_dict()
    config = component_config(unet)
    shapes = _shapes(unet_to_original(state, config) if original else state)
    fitted = _fits_exactly(
        ModelKind.UNET,
        unet,
        "unet/original" if original else "unet/diffusers",
        shapes,
        load_known_config("sd1", "unet"),
    )
    assert fitted["layers_per_block"] == 2 and fitted["block_out_channels"] == [40, 80, 80]
    assert fitted["norm_num_groups"] == 20  # 32 divides none of the widths; 20 is the largest below that does


@pytest.mark.parametrize("original", [False, True], ids=["diffusers", "original"])
def test_a_vae_variant_without_mid_attention_or_quant_convs(original: bool) -> None:
    vae = make_vae(
        "sd1", device="meta", block_out_channels=(16, 32, 64), down_block_types=("DownEncoderBlock2D",) * 3,
        up_block_types=("UpDecoderBlock2D",) * 3, layers_per_block=2, mid_block_add_attention=False,
        use_quant_conv=False, use_post_quant_conv=False,
    )  # fmt: skip
    state = vae.state_dict()
    shapes = _shapes(vae_to_original(state, component_config(vae)) if original else state)
    layout = "vae/original" if original else "vae/diffusers"
    fitted = _fits_exactly(ModelKind.VAE, vae, layout, shapes, load_known_config("sdxl", "vae"))
    assert fitted["mid_block_add_attention"] is False and fitted["use_quant_conv"] is False


def test_an_openclip_variant() -> None:
    encoder = make_text_encoder("clip_g", device="meta", num_hidden_layers=2, intermediate_size=96)
    openclip = clip_to_openclip(state_dict_for_save(encoder), prefix="")
    fitted = fit_config("clip/openclip", _shapes(openclip), load_known_config("sdxl", "text_encoder_2"))
    assert fitted.config["num_hidden_layers"] == 2 and fitted.config["intermediate_size"] == 96
    assert _module_shapes(ModelKind.TEXT_ENCODER, fitted.config) == _shapes(state_dict_for_save(encoder))


def test_a_t5_variant_with_other_heads() -> None:
    known = load_known_config("flux_dev", "text_encoder_2")
    variant = {
        **known,
        "d_model": 32,
        "num_heads": 2,
        "d_kv": 16,
        "num_layers": 2,
        "d_ff": 64,
        "vocab_size": 152,
    }
    encoder = skeleton("T5EncoderModel", variant)
    shapes = _shapes(state_dict_for_save(encoder))
    fitted = _fits_exactly(ModelKind.TEXT_ENCODER, encoder, "t5/transformers", shapes, known)
    assert (fitted["num_heads"], fitted["d_kv"], fitted["num_layers"]) == (2, 16, 2)


def test_no_known_config_at_all() -> None:
    """A UNet with no config to start from gets one from its shapes (the class's defaults beside them)."""
    unet = make_unet("sdxl", device="meta")
    fitted = fit_config("unet/diffusers", _shapes(unet.state_dict()), None)
    assert fitted.config["addition_embed_type"] == "text_time"
    assert _module_shapes(ModelKind.UNET, fitted.config) == _shapes(unet.state_dict())


def test_unknown_layouts_and_foreign_shapes_change_nothing() -> None:
    config = load_known_config("sd1", "unet")
    assert (
        fit_config("controlnet/original", {"input_hint_block.0.weight": (16, 3, 3, 3)}, config).changed == ()
    )
    assert fit_config("unet/diffusers", {"something.else": (1,)}, config).changed == ()


# ------------------------------------------------------------------------------------------- transformers


def _stripped(shapes: Mapping[str, tuple[str, tuple[int, ...]]], prefix: str = "") -> Shapes:
    """A stripped header's (dtype, shape) entries as shapes, the prefix removed."""
    return {k[len(prefix) :]: shape for k, (_, shape) in shapes.items()}


@pytest.mark.parametrize("base", ["flux_dev", "flux_schnell", "sd3"])
def test_published_transformer_configs_fit_their_own_shapes(base: str) -> None:
    config = load_known_config(base, "transformer")
    assert (
        fit_config("transformer/diffusers", _module_shapes(ModelKind.TRANSFORMER, config), config).changed
        == ()
    )
    if base == "sd3":
        original = _stripped(sd3_mmdit(prefix=""))
        assert fit_config("sd3/original", original, config).changed == ()
    else:
        original = _stripped(flux_bfl(guidance=base == "flux_dev"))
        assert fit_config("flux/original", original, config).changed == ()


@pytest.mark.parametrize("kind", ["flux", "sd3"])
def test_the_tiny_transformers_over_their_full_size_configs(kind: str) -> None:
    module = make_transformer(kind, device="meta")  # type: ignore[arg-type]
    known = load_known_config("flux_dev" if kind == "flux" else "sd3", "transformer")
    fitted = _fits_exactly(
        ModelKind.TRANSFORMER, module, "transformer/diffusers", _shapes(module.state_dict()), known
    )
    # the width is 256 either way; SD 3.0 has no query norm to tell its head width by (nor the tiny copy)
    assert fitted["num_layers"] == 1 and fitted["num_attention_heads"] * fitted["attention_head_dim"] == 256


def test_a_flux_with_fewer_double_blocks_and_an_sd35_large() -> None:
    """Flux lite keeps 8 of the 19 double blocks; SD 3.5 Large has 38 joint blocks 2432 wide."""
    lite = {
        k: v
        for k, v in _stripped(flux_bfl(guidance=True)).items()
        if not re.match(r"double_blocks\.(8|9|1\d)\.", k)
    }
    fitted = fit_config("flux/original", lite, load_known_config("flux_dev", "transformer"))
    assert fitted.changed == ("num_layers",) and fitted.config["num_layers"] == 8
    large = fit_config(
        "sd3/original", _stripped(sd3_mmdit(depth=38, prefix="")), load_known_config("sd3", "transformer")
    )
    assert {k: large.config[k] for k in large.changed} == {
        "num_layers": 38, "num_attention_heads": 38, "caption_projection_dim": 2432,
    }  # fmt: skip
