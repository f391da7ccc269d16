"""Rule tables for diffusers folders: ``config.json`` of a component, ``model_index.json`` of a pipeline.

``CONFIG_CLASSES`` maps the class a config names (diffusers ``_class_name`` or transformers
``architectures`` / ``model_type``) to a component kind. ``CONFIG_EVIDENCE`` reads the config
fields that play the part of the header probes (``cross_attention_dim`` is the UNet's
cross-attention width...), so that the same base and variant tables decide for folders and files.
``CONFIG_BASE_RULES`` are tried before those tables: a VAE's ``scaling_factor`` tells the SD-family
and SD3 / Flux VAEs apart where shapes cannot.
"""

from __future__ import annotations

from dataclasses import dataclass

from modelkeeper.discovery.records import Base, ModelType
from modelkeeper.discovery.rules.components import SD_FAMILY
from modelkeeper.discovery.rules.engine import BaseRule

T = ModelType


@dataclass(frozen=True)
class ConfigClass:
    name: str
    classes: frozenset[str]  # _class_name, an entry of architectures, or model_type
    kind: ModelType
    family: str | None = None
    base: Base | None = None


CONFIG_CLASSES: tuple[ConfigClass, ...] = (
    ConfigClass("config.unet", frozenset({"UNet2DConditionModel"}), T.UNET),
    ConfigClass("config.vae", frozenset({"AutoencoderKL"}), T.VAE),
    ConfigClass("config.controlnet", frozenset({"ControlNetModel"}), T.CONTROLNET),
    ConfigClass("config.controlnet.flux", frozenset({"FluxControlNetModel"}), T.CONTROLNET, base=Base.FLUX),
    ConfigClass("config.controlnet.sd3", frozenset({"SD3ControlNetModel"}), T.CONTROLNET, base=Base.SD3),
    ConfigClass("config.transformer.sd3", frozenset({"SD3Transformer2DModel"}), T.TRANSFORMER, base=Base.SD3),
    ConfigClass(
        "config.transformer.flux", frozenset({"FluxTransformer2DModel"}), T.TRANSFORMER, base=Base.FLUX
    ),
    ConfigClass(
        "config.clip_text",
        frozenset({"CLIPTextModel", "CLIPTextModelWithProjection", "clip_text_model"}),
        T.TEXT_ENCODER,
        family="clip",
    ),
    ConfigClass(
        "config.t5",
        frozenset({"T5EncoderModel", "T5ForConditionalGeneration", "t5"}),
        T.TEXT_ENCODER,
        family="t5",
    ),
)

#: evidence name -> config fields that give it (the first present wins), per kind.
CONFIG_EVIDENCE: dict[ModelType, dict[str, tuple[str, ...]]] = {
    T.UNET: {
        "cross_attention_width": ("cross_attention_dim",),
        "in_channels": ("in_channels",),
        "adm_in_channels": ("projection_class_embeddings_input_dim",),
    },
    T.CONTROLNET: {"cross_attention_width": ("cross_attention_dim",)},
    T.VAE: {"latent_channels": ("latent_channels",), "scaling_factor": ("scaling_factor",)},
    T.TRANSFORMER: {
        "guidance": ("guidance_embeds",),
        "img_in_width": ("in_channels",),
        "depth": ("num_layers",),
    },
    T.TEXT_ENCODER: {"hidden": ("hidden_size", "d_model"), "layers": ("num_hidden_layers", "num_layers")},
}

#: Values a config leaves out take the class's default (diffusers' own defaults).
CONFIG_DEFAULTS: dict[ModelType, dict[str, object]] = {
    T.UNET: {"cross_attention_width": 1280, "in_channels": 4},
    T.VAE: {"scaling_factor": 0.18215},
}

_VAE = frozenset({T.VAE})

CONFIG_BASE_RULES: tuple[BaseRule, ...] = (
    BaseRule(
        "vae.config.scaling_0.18215",
        _VAE,
        {"latent_channels": 4, "scaling_factor": 0.18215},
        Base.SD1,
        SD_FAMILY[:2],
        0.8,
    ),
    BaseRule(
        "vae.config.scaling_0.13025",
        _VAE,
        {"latent_channels": 4, "scaling_factor": 0.13025},
        Base.SDXL,
        SD_FAMILY[2:],
        0.9,
    ),
    BaseRule(
        "vae.config.scaling_1.5305",
        _VAE,
        {"latent_channels": 16, "scaling_factor": 1.5305},
        Base.SD3,
        (Base.SD3,),
    ),
    BaseRule(
        "vae.config.scaling_0.3611",
        _VAE,
        {"latent_channels": 16, "scaling_factor": 0.3611},
        Base.FLUX,
        (Base.FLUX,),
    ),
)

#: Pipeline classes whose name settles the base (the denoiser's config decides the others).
PIPELINE_BASES: dict[str, Base] = {
    "StableDiffusion3Pipeline": Base.SD3,
    "StableDiffusion3Img2ImgPipeline": Base.SD3,
    "StableDiffusion3InpaintPipeline": Base.SD3,
    "FluxPipeline": Base.FLUX,
    "FluxImg2ImgPipeline": Base.FLUX,
    "FluxInpaintPipeline": Base.FLUX,
    "FluxFillPipeline": Base.FLUX,
}

#: scheduler ``prediction_type`` -> the ``meta_prediction`` evidence of the variant table.
PREDICTION_TYPES: dict[str, str] = {"v_prediction": "v", "epsilon": "epsilon"}

#: Subfolders of a pipeline that hold no weights a worker loads as a model.
NON_MODEL_SLOTS: frozenset[str] = frozenset(
    {
        "tokenizer",
        "tokenizer_2",
        "tokenizer_3",
        "scheduler",
        "feature_extractor",
        "safety_checker",
        "image_encoder",
    }
)
