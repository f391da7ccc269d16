"""diffusers -> original layout conversion is the exact inverse of diffusers' own single-file converters."""

from __future__ import annotations

import pytest
import torch
from diffusers.loaders.single_file_utils import (
    convert_ldm_clip_checkpoint,
    convert_ldm_unet_checkpoint,
    convert_ldm_vae_checkpoint,
    convert_open_clip_checkpoint,
)
from safetensors.torch import load_file

from modelkeeper.formats.conventions import LDM_DENOISER_PREFIX, LDM_VAE_PREFIX
from modelkeeper.testing import (
    ENCODER_HIDDEN_SIZE,
    UNET_KINDS,
    VAE_KINDS,
    DemoManifest,
    clip_to_openclip,
    clip_to_original,
    make_text_encoder,
    make_unet,
    make_vae,
    state_dict_for_save,
    unet_to_original,
    vae_to_original,
)
from modelkeeper.testing.original_layout import (
    SD1_CLIP_PREFIX,
    SD2_OPENCLIP_PREFIX,
    SDXL_CLIP_G_PREFIX,
    SDXL_CLIP_L_PREFIX,
    SDXL_REFINER_CLIP_G_PREFIX,
    unet_key_to_original,
)
from tests.testing.conftest import GROUP, assert_bitwise_equal

pytestmark = GROUP


@pytest.mark.parametrize("kind", UNET_KINDS)
def test_unet_round_trips_through_diffusers_converter(kind: str) -> None:
    unet = make_unet(kind, dtype=torch.float16)
    diffusers_sd = state_dict_for_save(unet)
    original = unet_to_original(diffusers_sd, unet.config, prefix=LDM_DENOISER_PREFIX)
    assert all(k.startswith(LDM_DENOISER_PREFIX) for k in original)
    back = convert_ldm_unet_checkpoint(original, dict(unet.config))
    assert_bitwise_equal(back, diffusers_sd)


def test_unet_original_names_are_the_ldm_ones() -> None:
    unet = make_unet("sdxl", device="meta")
    names = set(unet_to_original(state_dict_for_save(unet), unet.config))
    # SDXL: no attention in the first level, so input block 3 (second level, first resnet) has one.
    assert "input_blocks.3.1.transformer_blocks.0.attn2.to_k.weight" in names
    assert "input_blocks.1.1.norm.weight" not in names
    assert {"label_emb.0.0.weight", "time_embed.0.weight", "out.2.weight", "input_blocks.0.0.weight"} <= names
    assert "middle_block.1.proj_in.weight" in names and "middle_block.2.in_layers.0.weight" in names
    assert "input_blocks.2.0.op.weight" in names  # the first level's downsampler
    # An up block with attention puts its upsampler after it (.2), one without after the resnet (.1).
    assert "output_blocks.1.2.conv.weight" in names
    sd1 = make_unet("sd1", device="meta")
    assert "output_blocks.1.1.conv.weight" in set(unet_to_original(state_dict_for_save(sd1), sd1.config))
    with pytest.raises(ValueError, match="no original-layout name"):
        unet_key_to_original("not_a_unet.weight", unet.config)


@pytest.mark.parametrize("kind", VAE_KINDS)
@pytest.mark.parametrize("prefix", ["", LDM_VAE_PREFIX])
def test_vae_round_trips_through_diffusers_converter(kind: str, prefix: str) -> None:
    vae = make_vae(kind, dtype=torch.float16)
    diffusers_sd = state_dict_for_save(vae)
    original = vae_to_original(diffusers_sd, vae.config, prefix=prefix)
    assert f"{prefix}encoder.down.0.block.0.norm1.weight" in original
    assert original[f"{prefix}encoder.mid.attn_1.q.weight"].ndim == 4  # a 1x1 convolution, as in LDM
    assert (f"{prefix}quant_conv.weight" in original) == (kind not in ("flux", "sd3"))
    back = convert_ldm_vae_checkpoint(original, dict(vae.config))
    assert_bitwise_equal(back, diffusers_sd)


@pytest.mark.parametrize("prefix", [SD1_CLIP_PREFIX, SDXL_CLIP_L_PREFIX])
def test_clip_l_round_trips_through_diffusers_converter(prefix: str) -> None:
    diffusers_sd = state_dict_for_save(make_text_encoder("clip_l", dtype=torch.float16))
    assert all(k.startswith("text_model.") for k in diffusers_sd)
    original = clip_to_original(diffusers_sd, prefix=prefix)
    assert f"{prefix}text_model.encoder.layers.0.self_attn.q_proj.weight" in original
    assert_bitwise_equal(convert_ldm_clip_checkpoint(original), diffusers_sd)


@pytest.mark.parametrize(
    ("kind", "prefix"),
    [("clip_g", SDXL_CLIP_G_PREFIX), ("clip_g", SDXL_REFINER_CLIP_G_PREFIX), ("clip_h", SD2_OPENCLIP_PREFIX)],
)
def test_openclip_round_trips_through_diffusers_converter(kind: str, prefix: str) -> None:
    encoder = make_text_encoder(kind, dtype=torch.float16)
    diffusers_sd = state_dict_for_save(encoder)
    original = clip_to_openclip(diffusers_sd, prefix=prefix)
    width = ENCODER_HIDDEN_SIZE[kind]
    assert original[f"{prefix}transformer.resblocks.0.attn.in_proj_weight"].shape == (3 * width, width)
    assert original[f"{prefix}positional_embedding"].shape == (77, width)
    assert {f"{prefix}ln_final.weight", f"{prefix}token_embedding.weight"} <= set(original)
    if kind == "clip_g":
        assert original[f"{prefix}text_projection"].shape == (width, 1280)
    back = convert_open_clip_checkpoint(encoder, original, prefix=prefix)
    assert_bitwise_equal(back, diffusers_sd)


def test_demo_checkpoints_hold_the_pipeline_tensors(demo: DemoManifest) -> None:
    """Each full checkpoint, split by diffusers' converters, is bitwise the pipeline folder of its base."""
    for checkpoint, pipeline in (("sd15-checkpoint", "sd15-pipeline"), ("sdxl-checkpoint", "sdxl-pipeline")):
        original = load_file(demo.path(checkpoint))
        folder = demo.path(pipeline)
        config = demo[checkpoint].config
        assert config is not None
        unet = convert_ldm_unet_checkpoint(original, config["unet"])
        assert_bitwise_equal(unet, load_file(folder / "unet/diffusion_pytorch_model.safetensors"))
        vae = convert_ldm_vae_checkpoint(original, config["vae"])
        assert_bitwise_equal(vae, load_file(folder / "vae/diffusion_pytorch_model.safetensors"))
        clip_l = convert_ldm_clip_checkpoint(original)
        assert_bitwise_equal(clip_l, load_file(folder / "text_encoder/model.safetensors"))
        if checkpoint == "sdxl-checkpoint":
            encoder = make_text_encoder("clip_g", device="meta")
            clip_g = convert_open_clip_checkpoint(encoder, original, prefix=SDXL_CLIP_G_PREFIX)
            assert_bitwise_equal(clip_g, load_file(folder / "text_encoder_2/model.safetensors"))


def test_demo_component_files_convert_back(demo: DemoManifest) -> None:
    """Every single-component original-layout file converts back to the component's own tensors."""
    checked = 0
    for entry in demo.select(layout="original", format="safetensors"):
        if entry.type == "main":
            continue
        original, config = load_file(demo.root / entry.path), entry.config
        assert config is not None and entry.prefix is not None
        if entry.type == "unet":
            if not entry.prefix:
                original = {LDM_DENOISER_PREFIX + k: v for k, v in original.items()}
            back = convert_ldm_unet_checkpoint(original, config)
            expected = state_dict_for_save(
                make_unet(_unet_kind(entry.base, entry.variant), dtype=torch.float16)
            )
        elif entry.type == "vae":
            back = convert_ldm_vae_checkpoint(original, config)
            expected = state_dict_for_save(make_vae(entry.base, dtype=torch.float16))
        elif entry.encoder == "clip_l":
            back = convert_ldm_clip_checkpoint(original)
            expected = state_dict_for_save(make_text_encoder("clip_l", dtype=torch.float16))
        else:
            encoder = make_text_encoder(entry.encoder, dtype=torch.float16)
            back = convert_open_clip_checkpoint(encoder, original, prefix=entry.prefix)
            expected = state_dict_for_save(encoder)
        assert_bitwise_equal(back, expected)
        checked += 1
    assert checked >= 7


def _unet_kind(base: str | None, variant: str) -> str:
    return "sd1_inpaint" if variant == "inpaint" else str(base)
