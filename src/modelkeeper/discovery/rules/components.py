"""Rule tables for checkpoints and their components (UNet, transformer, VAE, text encoders, ControlNet).

Read top to bottom: ``COMPONENT_PREFIXES`` splits a single file into components;
``COMPONENT_RULES`` says what each group of tensors is; ``PROBES`` measure the dimensions that
discriminate; ``BASE_RULES``, ``VARIANT_RULES`` and ``ENCODER_RULES`` turn those measurements into
answers. The first rule that matches wins, so specific rules come before general ones.

Discriminating dimensions (real models and the tiny fixtures share them): UNet cross-attention
width 768 sd1 / 1024 sd2 / 2048 sdxl / 1280 sdxl refiner; UNet input channels 4 / 9 (inpaint) /
8 (instruct-pix2pix); VAE latent channels 4 (SD family) / 16 (SD3, Flux); text encoder width 768
CLIP-L / 1280 CLIP-G / 1024 OpenCLIP-H; Flux guidance embedder (dev) or none (schnell).
"""

from __future__ import annotations

from modelkeeper.discovery.records import Base, EncoderKind, Layout, ModelType, Variant
from modelkeeper.discovery.rules.engine import (
    BaseRule,
    ComponentPrefix,
    ComponentRule,
    EncoderRule,
    Probe,
    VariantRule,
    keys,
)
from modelkeeper.formats.conventions import (
    COMFY_CLIP_G_PREFIX,
    COMFY_CLIP_L_PREFIX,
    COMFY_T5XXL_PREFIX,
    LDM_CONTROLNET_PREFIX,
    LDM_DENOISER_PREFIX,
    LDM_TEXT_ENCODER_PREFIX,
    LDM_VAE_PREFIX,
    SGM_EMBEDDER_0_PREFIX,
    SGM_EMBEDDER_1_PREFIX,
)

T = ModelType
UNET, TRANSFORMER, VAE, TEXT, CONTROL = T.UNET, T.TRANSFORMER, T.VAE, T.TEXT_ENCODER, T.CONTROLNET
SD_FAMILY = (Base.SD1, Base.SD2, Base.SDXL, Base.SDXL_REFINER)

ORIG = Layout.ORIGINAL  # text encoders under these prefixes are in the checkpoint's (original) layout

COMPONENT_PREFIXES: tuple[ComponentPrefix, ...] = (
    ComponentPrefix("ldm.diffusion_model", LDM_DENOISER_PREFIX, "denoiser", ORIG),
    ComponentPrefix("ldm.first_stage_model", LDM_VAE_PREFIX, "vae", ORIG),
    ComponentPrefix("ldm.cond_stage_model", LDM_TEXT_ENCODER_PREFIX, "text_encoder", ORIG),
    ComponentPrefix("sgm.embedder_0", SGM_EMBEDDER_0_PREFIX, "text_encoder", ORIG),
    ComponentPrefix("sgm.embedder_1", SGM_EMBEDDER_1_PREFIX, "text_encoder_2", ORIG),
    ComponentPrefix("comfy.clip_l", COMFY_CLIP_L_PREFIX, "text_encoder", ORIG),
    ComponentPrefix("comfy.clip_g", COMFY_CLIP_G_PREFIX, "text_encoder_2", ORIG),
    ComponentPrefix("comfy.t5xxl", COMFY_T5XXL_PREFIX, "text_encoder_3", ORIG),
    ComponentPrefix("ldm.control_model", LDM_CONTROLNET_PREFIX, "controlnet", ORIG),
    ComponentPrefix("pipeline.unet", "unet.", "unet"),
    ComponentPrefix("pipeline.transformer", "transformer.", "transformer"),
    ComponentPrefix("pipeline.vae", "vae.", "vae"),
    ComponentPrefix("pipeline.text_encoder", "text_encoder.", "text_encoder"),
    ComponentPrefix("pipeline.text_encoder_2", "text_encoder_2.", "text_encoder_2"),
    ComponentPrefix("pipeline.text_encoder_3", "text_encoder_3.", "text_encoder_3"),
    ComponentPrefix("pipeline.controlnet", "controlnet.", "controlnet"),
)

#: Tensors of a checkpoint that belong to no component (EMA copies, schedules, markers).
EXTRA_PREFIXES: tuple[str, ...] = (
    "model_ema.",
    "alphas_cumprod",
    "betas",
    "lvlb_weights",
    "logvar",
    "v_pred",
    "ztsnr",
)

COMPONENT_RULES: tuple[ComponentRule, ...] = (
    # ControlNets first: they share the UNet's encoder half.
    ComponentRule(
        "controlnet.original",
        CONTROL,
        Layout.ORIGINAL,
        requires=(keys(r"input_hint_block\.0\.weight"), keys(r"zero_convs\.0\.0\.weight")),
    ),
    ComponentRule(
        "controlnet.diffusers",
        CONTROL,
        Layout.DIFFUSERS,
        requires=(
            keys(r"controlnet_cond_embedding\.conv_in\.weight"),
            keys(r"controlnet_down_blocks\.0\.weight"),
        ),
    ),
    ComponentRule(
        "controlnet.flux.diffusers",
        CONTROL,
        Layout.DIFFUSERS,
        requires=(keys(r"controlnet_blocks\.0\.weight"), keys(r"controlnet_x_embedder\.weight")),
        base=Base.FLUX,
    ),
    ComponentRule(
        "controlnet.sd3.diffusers",
        CONTROL,
        Layout.DIFFUSERS,
        requires=(keys(r"controlnet_blocks\.0\.weight"), keys(r"pos_embed_input\.proj\.weight")),
        base=Base.SD3,
    ),
    ComponentRule(
        "unet.original",
        UNET,
        Layout.ORIGINAL,
        requires=(keys(r"input_blocks\.0\.0\.weight"), keys(r"middle_block\..*"), keys(r"out\.2\.weight")),
    ),
    ComponentRule(
        "unet.diffusers",
        UNET,
        Layout.DIFFUSERS,
        requires=(
            keys(r"conv_in\.weight"),
            keys(r"time_embedding\.linear_1\.weight"),
            keys(r"up_blocks\.0\..*"),
        ),
    ),
    ComponentRule(
        "transformer.flux.original",
        TRANSFORMER,
        Layout.ORIGINAL,
        requires=(keys(r"double_blocks\.0\.img_attn\.qkv\.weight"), keys(r"img_in\.weight")),
        base=Base.FLUX,
    ),
    ComponentRule(
        "transformer.flux.diffusers",
        TRANSFORMER,
        Layout.DIFFUSERS,
        requires=(keys(r"single_transformer_blocks\.0\..*"), keys(r"x_embedder\.weight")),
        base=Base.FLUX,
    ),
    ComponentRule(
        "transformer.sd3.original",
        TRANSFORMER,
        Layout.ORIGINAL,
        requires=(keys(r"joint_blocks\.0\.context_block\..*"), keys(r"x_embedder\.proj\.weight")),
        base=Base.SD3,
    ),
    ComponentRule(
        "transformer.sd3.diffusers",
        TRANSFORMER,
        Layout.DIFFUSERS,
        requires=(
            keys(r"transformer_blocks\.0\.attn\.add_k_proj\.weight"),
            keys(r"pos_embed\.proj\.weight"),
            keys(r"context_embedder\.weight"),
        ),
        excludes=(keys(r"single_transformer_blocks\..*"),),
        base=Base.SD3,
    ),
    ComponentRule(
        "vae.original",
        VAE,
        Layout.ORIGINAL,
        requires=(keys(r"encoder\.down\.0\.block\.0\.conv1\.weight"), keys(r"decoder\.conv_in\.weight")),
    ),
    ComponentRule(
        "vae.diffusers",
        VAE,
        Layout.DIFFUSERS,
        requires=(
            keys(r"encoder\.down_blocks\.0\.resnets\.0\.conv1\.weight"),
            keys(r"decoder\.conv_in\.weight"),
        ),
    ),
    ComponentRule(
        "vae.decoder_only.original",
        VAE,
        Layout.ORIGINAL,
        requires=(keys(r"decoder\.up\.0\.block\.0\.conv1\.weight"), keys(r"decoder\.conv_in\.weight")),
        confidence=0.8,
    ),
    ComponentRule(
        "text_encoder.clip.transformers",
        TEXT,
        Layout.DIFFUSERS,
        requires=(keys(r"(?:transformer\.)?text_model\.embeddings\.token_embedding\.weight"),),
        family="clip",
    ),
    ComponentRule(
        "text_encoder.openclip",
        TEXT,
        Layout.ORIGINAL,
        requires=(
            keys(r"(?:model\.)?token_embedding\.weight"),
            keys(r"(?:model\.)?transformer\.resblocks\.0\..*"),
        ),
        family="openclip",
    ),
    ComponentRule(
        "text_encoder.t5.transformers",
        TEXT,
        Layout.DIFFUSERS,
        requires=(keys(r"(?:transformer\.)?encoder\.block\.0\.layer\.0\.SelfAttention\.q\.weight"),),
        family="t5",
    ),
    ComponentRule(
        "text_encoder.t5.gguf",
        TEXT,
        Layout.ORIGINAL,
        requires=(keys(r"enc\.blk\.0\.attn_q\.weight"),),
        family="t5",
    ),
)

_ALL = frozenset({UNET, TRANSFORMER, VAE, TEXT, CONTROL})
_UNETS = frozenset({UNET, CONTROL})

PROBES: tuple[Probe, ...] = (
    Probe("cross_attention_width", _UNETS, keys(r".*attn2\.to_k\.weight"), dim=1),
    Probe("in_channels", frozenset({UNET}), keys(r"input_blocks\.0\.0\.weight|conv_in\.weight"), dim=1),
    Probe("adm_in_channels", _UNETS, keys(r"label_emb\.0\.0\.weight|add_embedding\.linear_1\.weight"), dim=1),
    Probe("latent_channels", frozenset({VAE}), keys(r"decoder\.conv_in\.weight"), dim=1),
    Probe(
        "guidance",
        frozenset({TRANSFORMER}),
        keys(r"guidance_in\.in_layer\.weight|time_text_embed\.guidance_embedder\.linear_1\.weight"),
    ),
    Probe("img_in_width", frozenset({TRANSFORMER}), keys(r"img_in\.weight|x_embedder\.weight"), dim=1),
    Probe(
        "depth",
        frozenset({TRANSFORMER}),
        keys(r"joint_blocks\.(\d+)\..*|transformer_blocks\.(\d+)\..*"),
        count=True,
    ),
    Probe(
        "hidden", frozenset({TRANSFORMER}), keys(r"x_embedder\.proj\.weight|pos_embed\.proj\.weight"), dim=0
    ),
    Probe(
        "hidden",
        frozenset({TEXT}),
        keys(
            r"(?:transformer\.)?text_model\.embeddings\.token_embedding\.weight|(?:model\.)?token_embedding\.weight"
            r"|(?:transformer\.)?shared\.weight|(?:transformer\.)?encoder\.embed_tokens\.weight"
        ),
        dim=1,
    ),
    Probe(
        "hidden",
        frozenset({TEXT}),
        keys(r"(?:transformer\.)?encoder\.block\.0\.layer\.0\.SelfAttention\.q\.weight"),
        dim=1,
    ),
    Probe("hidden", frozenset({TEXT}), keys(r"token_embd\.weight|enc\.blk\.0\.attn_q\.weight"), dim=1),
    Probe(
        "layers",
        frozenset({TEXT}),
        keys(
            r"(?:transformer\.)?text_model\.encoder\.layers\.(\d+)\..*|(?:model\.)?transformer\.resblocks\.(\d+)\..*"
            r"|(?:transformer\.)?encoder\.block\.(\d+)\..*|enc\.blk\.(\d+)\..*"
        ),
        count=True,
    ),
)

BASE_RULES: tuple[BaseRule, ...] = (
    BaseRule("unet.cross_attention_768", _UNETS, {"cross_attention_width": 768}, Base.SD1),
    BaseRule("unet.cross_attention_1024", _UNETS, {"cross_attention_width": 1024}, Base.SD2),
    BaseRule("unet.cross_attention_2048", _UNETS, {"cross_attention_width": 2048}, Base.SDXL),
    BaseRule("unet.cross_attention_1280", _UNETS, {"cross_attention_width": 1280}, Base.SDXL_REFINER),
    BaseRule("unet.adm_2816", _UNETS, {"adm_in_channels": 2816}, Base.SDXL, confidence=0.8),
    BaseRule("unet.adm_2560", _UNETS, {"adm_in_channels": 2560}, Base.SDXL_REFINER, confidence=0.8),
    # The SD-family VAEs and the SD3 / Flux VAEs have the same shapes: the header cannot tell them apart.
    BaseRule("vae.latent_4", frozenset({VAE}), {"latent_channels": 4}, Base.SD1, SD_FAMILY, confidence=0.5),
    BaseRule(
        "vae.latent_16", frozenset({VAE}), {"latent_channels": 16}, Base.FLUX, (Base.FLUX, Base.SD3), 0.5
    ),
)

_DENOISERS = frozenset({UNET, TRANSFORMER})

VARIANT_RULES: tuple[VariantRule, ...] = (
    VariantRule("unet.in_channels_9", _DENOISERS, None, {"in_channels": 9}, Variant.INPAINT),
    VariantRule("unet.in_channels_8", _DENOISERS, None, {"in_channels": 8}, Variant.INSTRUCT_PIX2PIX),
    VariantRule("flux.img_in_384", _DENOISERS, frozenset({Base.FLUX}), {"img_in_width": 384}, Variant.FILL),
    VariantRule("flux.img_in_128", _DENOISERS, frozenset({Base.FLUX}), {"img_in_width": 128}, Variant.DEPTH),
    VariantRule(
        "flux.guidance_embedder", _DENOISERS, frozenset({Base.FLUX}), {"guidance": True}, Variant.DEV
    ),
    VariantRule(
        "flux.no_guidance_embedder", _DENOISERS, frozenset({Base.FLUX}), {"guidance": False}, Variant.SCHNELL
    ),
    VariantRule("sd3.depth_38", _DENOISERS, frozenset({Base.SD3}), {"depth": 38}, Variant.LARGE),
    VariantRule("sd3.depth_24", _DENOISERS, frozenset({Base.SD3}), {"depth": 24}, Variant.MEDIUM),
    VariantRule("file.v_pred_marker", _DENOISERS, None, {"v_pred_marker": True}, Variant.V_PREDICTION),
    VariantRule("meta.prediction_v", _DENOISERS, None, {"meta_prediction": "v"}, Variant.V_PREDICTION),
    VariantRule("meta.prediction_epsilon", _DENOISERS, None, {"meta_prediction": "epsilon"}, Variant.NORMAL),
    # SD2 768 checkpoints predict v, SD2 base 512 epsilon, with identical shapes: like diffusers,
    # assume v unless the file, a sidecar config or a scheduler config says otherwise.
    VariantRule("sd2.assume_v_prediction", _DENOISERS, frozenset({Base.SD2}), {}, Variant.V_PREDICTION, 0.7),
)

_CLIP = frozenset({"clip", "openclip"})

ENCODER_RULES: tuple[EncoderRule, ...] = (
    EncoderRule(
        "clip.width_768",
        _CLIP,
        {"hidden": 768},
        EncoderKind.CLIP_L,
        (Base.SD1, Base.SDXL, Base.SD3, Base.FLUX),
    ),
    EncoderRule(
        "clip.width_1280",
        _CLIP,
        {"hidden": 1280},
        EncoderKind.CLIP_G,
        (Base.SDXL, Base.SDXL_REFINER, Base.SD3),
    ),
    EncoderRule("clip.width_1024", _CLIP, {"hidden": 1024}, EncoderKind.CLIP_H, (Base.SD2,)),
    EncoderRule(
        "t5.width_4096", frozenset({"t5"}), {"hidden": 4096}, EncoderKind.T5_XXL, (Base.SD3, Base.FLUX)
    ),
    # Shrunk T5s (fixtures, T5 1.1 small/base used in tests) keep the architecture; XXL is what pipelines take.
    EncoderRule("t5.any_width", frozenset({"t5"}), {}, EncoderKind.T5_XXL, (Base.SD3, Base.FLUX), 0.6),
)

#: Metadata values that name a base (modelspec.architecture, kohya ss_base_model_version,
#: civitai baseModel), lowercased substring -> base; the first that occurs wins.
METADATA_BASES: tuple[tuple[str, Base], ...] = (
    ("xl-v1-refiner", Base.SDXL_REFINER),
    ("sdxl_refiner", Base.SDXL_REFINER),
    ("sdxl", Base.SDXL),
    ("stable-diffusion-xl", Base.SDXL),
    ("sd_xl", Base.SDXL),
    ("pony", Base.SDXL),
    ("illustrious", Base.SDXL),
    ("stable-diffusion-3", Base.SD3),
    ("sd3", Base.SD3),
    ("sd 3", Base.SD3),
    ("flux", Base.FLUX),
    ("sd_v2", Base.SD2),
    ("stable-diffusion-v2", Base.SD2),
    ("sd 2", Base.SD2),
    ("sd_v1", Base.SD1),
    ("stable-diffusion-v1", Base.SD1),
    ("sd 1", Base.SD1),
)
