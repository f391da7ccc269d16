"""The tiny components keep the discriminating dimensions, are seeded, and are float16-exact."""

from __future__ import annotations

import pytest
import torch
from transformers import CLIPTextModel, CLIPTextModelWithProjection, T5EncoderModel

from modelkeeper import testing
from modelkeeper.testing import (
    CLIP_VOCAB_SIZE,
    ENCODER_KINDS,
    T5_VOCAB_SIZE,
    UNET_CROSS_ATTENTION_DIM,
    UNET_IN_CHANNELS,
    UNET_KINDS,
    VAE_KINDS,
    VAE_LATENT_CHANNELS,
    component_config,
    make_scheduler,
    make_text_encoder,
    make_unet,
    make_vae,
    state_dict_for_save,
    unet_config,
)
from tests.testing.conftest import GROUP

pytestmark = GROUP


def test_public_api_is_exported() -> None:
    for name in testing.__all__:
        assert hasattr(testing, name), name
    public = {n for n in dir(testing) if not n.startswith("_") and n[0].isupper()}
    assert public <= set(testing.__all__)


@pytest.mark.parametrize("kind", UNET_KINDS)
def test_unet_dimensions(kind: str) -> None:
    unet = make_unet(kind)  # type: ignore[arg-type]
    assert unet.config.cross_attention_dim == UNET_CROSS_ATTENTION_DIM[kind]  # type: ignore[index]
    assert unet.conv_in.weight.shape[1] == UNET_IN_CHANNELS[kind]  # type: ignore[index]
    attn2 = next(m for n, m in unet.named_modules() if n.endswith("attn2"))
    assert attn2.to_k.weight.shape[1] == UNET_CROSS_ATTENTION_DIM[kind]  # type: ignore[index]
    if kind.startswith("sdxl"):
        assert unet.config.addition_embed_type == "text_time"
        assert unet.config.addition_time_embed_dim == 256
        time_ids = 6 if kind == "sdxl" else 5
        assert unet.add_embedding.linear_1.in_features == 1280 + time_ids * 256
    sd = state_dict_for_save(unet)
    assert sum(t.numel() for t in sd.values()) < 3_000_000


def test_unet_forward_runs() -> None:
    unet = make_unet("sdxl")
    with torch.no_grad():
        out = unet(
            torch.randn(1, 4, 8, 8),
            10,
            encoder_hidden_states=torch.randn(1, 77, 2048),
            added_cond_kwargs={"text_embeds": torch.randn(1, 1280), "time_ids": torch.zeros(1, 6)},
        ).sample
    assert out.shape == (1, 4, 8, 8) and torch.isfinite(out).all()


@pytest.mark.parametrize("kind", VAE_KINDS)
def test_vae_dimensions_and_scale(kind: str) -> None:
    vae = make_vae(kind)  # type: ignore[arg-type]
    assert vae.config.latent_channels == VAE_LATENT_CHANNELS[kind]  # type: ignore[index]
    sixteen = VAE_LATENT_CHANNELS[kind] == 16  # type: ignore[index]
    assert vae.config.use_quant_conv is not sixteen and vae.config.use_post_quant_conv is not sixteen
    assert (vae.config.shift_factor is not None) is sixteen
    with torch.no_grad():
        latents = vae.encode(torch.zeros(1, 3, 64, 64)).latent_dist.mode()
    assert latents.shape == (1, VAE_LATENT_CHANNELS[kind], 8, 8)  # type: ignore[index]


@pytest.mark.parametrize("kind", ENCODER_KINDS)
def test_text_encoders(kind: str) -> None:
    encoder = make_text_encoder(kind)  # type: ignore[arg-type]
    expected = {"clip_l": CLIPTextModel, "clip_h": CLIPTextModel, "clip_g": CLIPTextModelWithProjection}
    assert type(encoder) is expected.get(kind, T5EncoderModel)
    ids = torch.tensor([[1, 5, 7, 2]])
    with torch.no_grad():
        out = encoder(ids, output_hidden_states=True)
    width = {"clip_l": 768, "clip_g": 1280, "clip_h": 1024, "t5": 32}[kind]
    assert out.last_hidden_state.shape == (1, 4, width)
    if kind == "t5":
        assert encoder.config.vocab_size == T5_VOCAB_SIZE
    else:
        assert encoder.config.vocab_size == CLIP_VOCAB_SIZE
        assert encoder.config.num_hidden_layers == 1 and len(out.hidden_states) == 2  # SDXL reads [-2]
    if kind == "clip_g":
        assert out.text_embeds.shape == (1, 1280)


def test_same_seed_same_weights_other_seed_other_weights() -> None:
    a, b = state_dict_for_save(make_unet("sd1")), state_dict_for_save(make_unet("sd1"))
    assert all(torch.equal(a[k], b[k]) for k in a)
    c = state_dict_for_save(make_unet("sd1", seed=1))
    assert not all(torch.equal(a[k], c[k]) for k in a)
    # Different components of one seed do not share weights either.
    l1 = state_dict_for_save(make_text_encoder("clip_l"))["text_model.encoder.layers.0.mlp.fc1.weight"]
    h1 = state_dict_for_save(make_text_encoder("clip_h"))["text_model.encoder.layers.0.mlp.fc1.weight"]
    assert not torch.equal(l1[:, :768], h1[:, :768])


def test_weights_are_float16_exact_and_sane() -> None:
    for module in (make_unet("sdxl"), make_vae("flux"), make_text_encoder("clip_g"), make_text_encoder("t5")):
        tensors = [t for t in module.state_dict().values() if t.is_floating_point()]
        assert all(t.dtype == torch.float32 for t in tensors)
        flat = torch.cat([t.flatten() for t in tensors])
        assert torch.equal(flat.half().float(), flat)
        assert torch.isfinite(flat).all() and flat.abs().max() <= 1.0625
    half = make_unet("sd1", dtype=torch.float16)
    full = make_unet("sd1")
    assert all(torch.equal(half.state_dict()[k].float(), v) for k, v in full.state_dict().items())


def test_meta_device_gives_structure_only() -> None:
    unet = make_unet("sdxl", device="meta")
    assert all(p.device.type == "meta" for p in unet.parameters())
    assert set(state_dict_for_save(unet)) == set(state_dict_for_save(make_unet("sdxl")))


def test_t5_ties_its_embeddings_and_saves_them_once() -> None:
    t5 = make_text_encoder("t5")
    assert t5.shared.weight is t5.encoder.embed_tokens.weight
    keys = set(state_dict_for_save(t5))
    assert "shared.weight" in keys and "encoder.embed_tokens.weight" not in keys
    assert "encoder.block.0.layer.1.DenseReluDense.wi_1.weight" in keys  # T5 v1.1, gated


def test_configs_and_overrides() -> None:
    assert unet_config("sd2")["use_linear_projection"] is True
    assert unet_config("sd1", layers_per_block=2)["layers_per_block"] == 2
    assert component_config(make_unet("sd1", device="meta"))["_class_name"] == "UNet2DConditionModel"
    assert component_config(make_text_encoder("clip_g", device="meta"))["architectures"] == [
        "CLIPTextModelWithProjection"
    ]
    with pytest.raises(ValueError, match="unknown UNet kind"):
        unet_config("sd9")  # type: ignore[arg-type]


def test_schedulers() -> None:
    assert make_scheduler("sd2").config.prediction_type == "v_prediction"
    assert make_scheduler("sd1").config.prediction_type == "epsilon"
    assert type(make_scheduler("sdxl")).__name__ == "EulerDiscreteScheduler"
