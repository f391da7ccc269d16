"""Tiny but real diffusers / transformers components with seeded random weights.

Every builder keeps the dimensions that identification discriminates on (UNet cross-attention width and
input channels, VAE latent channels, text-encoder width) and shrinks everything else, so a whole
family of models builds in a few seconds on a CPU and saves to a few megabytes. Weights are seeded
uniform values on a float16-exact grid (no library initialisation, which is slow), so saving them as
float16 loses nothing: a file written in float16 and loaded back as float32 is bitwise equal to the
module that was built.
"""

from __future__ import annotations

import json
import math
import zlib
from collections.abc import Callable
from functools import partial
from typing import Any, Literal, TypeVar, cast, get_args

import numpy as np
import torch
from accelerate import init_empty_weights

# Classes come from their modules: under mypy, ``from diffusers import X`` resolves to diffusers' dummies.
from diffusers.models.autoencoders.autoencoder_kl import AutoencoderKL
from diffusers.models.modeling_utils import ModelMixin
from diffusers.models.transformers.transformer_flux import FluxTransformer2DModel
from diffusers.models.transformers.transformer_sd3 import SD3Transformer2DModel
from diffusers.models.unets.unet_2d_condition import UNet2DConditionModel
from diffusers.schedulers.scheduling_ddim import DDIMScheduler
from diffusers.schedulers.scheduling_euler_discrete import EulerDiscreteScheduler
from diffusers.schedulers.scheduling_pndm import PNDMScheduler
from diffusers.schedulers.scheduling_utils import SchedulerMixin
from transformers import (
    CLIPTextConfig,
    CLIPTextModel,
    CLIPTextModelWithProjection,
    PreTrainedModel,
    T5Config,
    T5EncoderModel,
)

from modelkeeper.testing.tokenizer import CLIP_VOCAB_SIZE, T5_VOCAB_SIZE

Base = Literal["sd1", "sd2", "sdxl", "sdxl_refiner", "sd3", "flux"]
"""Model families, spelled as the registry spells them."""

UNetKind = Literal["sd1", "sd1_inpaint", "sd2", "sdxl", "sdxl_refiner"]
VaeKind = Literal["sd1", "sdxl", "sd3", "flux"]
EncoderKind = Literal["clip_l", "clip_g", "clip_h", "t5"]
"""Text encoders: CLIP-L (768, SD1 and SDXL), OpenCLIP bigG (1280, SDXL), OpenCLIP-H (1024, SD2), T5."""

UNET_KINDS: tuple[UNetKind, ...] = get_args(UNetKind)
VAE_KINDS: tuple[VaeKind, ...] = get_args(VaeKind)
ENCODER_KINDS: tuple[EncoderKind, ...] = get_args(EncoderKind)

TextEncoder = CLIPTextModel | CLIPTextModelWithProjection | T5EncoderModel
Component = UNet2DConditionModel | AutoencoderKL | TextEncoder

DEFAULT_SEED = 0
_M = TypeVar("_M", bound=torch.nn.Module)
Device = Literal["cpu", "meta"]

# The discriminating dimensions, one table for builders, tests and the manifest.
UNET_CROSS_ATTENTION_DIM: dict[UNetKind, int] = {
    "sd1": 768,
    "sd1_inpaint": 768,
    "sd2": 1024,
    "sdxl": 2048,
    "sdxl_refiner": 1280,
}
UNET_IN_CHANNELS: dict[UNetKind, int] = {"sd1": 4, "sd1_inpaint": 9, "sd2": 4, "sdxl": 4, "sdxl_refiner": 4}
VAE_LATENT_CHANNELS: dict[VaeKind, int] = {"sd1": 4, "sdxl": 4, "sd3": 16, "flux": 16}
ENCODER_HIDDEN_SIZE: dict[EncoderKind, int] = {"clip_l": 768, "clip_g": 1280, "clip_h": 1024, "t5": 32}

# Images are 8x the latent size, as in the real models (four VAE levels); 8 latents -> 64 pixels.
VAE_SCALE_FACTOR = 8
UNET_SAMPLE_SIZE = 8

_SD_BLOCKS: dict[str, Any] = {
    "down_block_types": ("CrossAttnDownBlock2D", "DownBlock2D"),
    "up_block_types": ("UpBlock2D", "CrossAttnUpBlock2D"),
}
# SDXL has no attention in its first (widest) level; the tiny copy keeps that shape.
_SDXL_BLOCKS: dict[str, Any] = {
    "down_block_types": ("DownBlock2D", "CrossAttnDownBlock2D"),
    "up_block_types": ("CrossAttnUpBlock2D", "UpBlock2D"),
    "attention_head_dim": (2, 4),
    "use_linear_projection": True,
    "addition_embed_type": "text_time",
    "addition_time_embed_dim": 256,
}


def seed_for(name: str, seed: int = DEFAULT_SEED) -> int:
    """A stable per-component seed: the same name and seed give the same weights in any process."""
    return (zlib.crc32(name.encode()) + seed * 1_000_003) % (2**31)


def unet_config(kind: UNetKind = "sd1", **overrides: Any) -> dict[str, Any]:
    """The ``UNet2DConditionModel`` init arguments of a tiny UNet of ``kind``."""
    if kind not in UNET_KINDS:
        raise ValueError(f"unknown UNet kind {kind!r}; expected one of {UNET_KINDS}")
    config: dict[str, Any] = {
        "sample_size": UNET_SAMPLE_SIZE,
        "in_channels": UNET_IN_CHANNELS[kind],
        "out_channels": 4,
        "block_out_channels": (32, 64),
        "layers_per_block": 1,
        "norm_num_groups": 8,
        "cross_attention_dim": UNET_CROSS_ATTENTION_DIM[kind],
        "attention_head_dim": 8,
    }
    if kind in ("sd1", "sd1_inpaint"):
        config.update(_SD_BLOCKS)
    elif kind == "sd2":
        config.update(_SD_BLOCKS, attention_head_dim=(2, 4), use_linear_projection=True)
    elif kind == "sdxl":
        # 1280 pooled CLIP-G embedding + 6 time ids (size, crop, target size) of 256 each.
        config.update(_SDXL_BLOCKS, projection_class_embeddings_input_dim=1280 + 6 * 256)
    else:
        # The refiner conditions on an aesthetic score instead of the target size: 5 time ids.
        config.update(_SDXL_BLOCKS, projection_class_embeddings_input_dim=1280 + 5 * 256)
    config.update(overrides)
    return config


TransformerKind = Literal["flux", "sd3"]
#: Width of the tiny transformers: 256, one K-quant block, so GGUF files of them hold every quant type.
TRANSFORMER_WIDTH = 256


def transformer_config(kind: TransformerKind = "flux", **overrides: Any) -> dict[str, Any]:
    """Init arguments of a tiny ``FluxTransformer2DModel`` or ``SD3Transformer2DModel``: one block of
    each sort, 2 heads of 128, the tiny T5's width for text and CLIP's pooled widths (768; 768 + 1280)."""
    common = {"num_layers": 1, "attention_head_dim": 128, "num_attention_heads": 2,
              "joint_attention_dim": ENCODER_HIDDEN_SIZE["t5"]}  # fmt: skip
    if kind == "flux":
        config = {**common, "patch_size": 1, "in_channels": 64, "num_single_layers": 1,
                  "pooled_projection_dim": 768, "guidance_embeds": True, "axes_dims_rope": (16, 56, 56)}  # fmt: skip
    else:
        config = {**common, "sample_size": 16, "patch_size": 2, "in_channels": 16, "out_channels": 16,
                  "caption_projection_dim": TRANSFORMER_WIDTH, "pooled_projection_dim": 2048,
                  "pos_embed_max_size": 16}  # fmt: skip
    return config | overrides


def make_transformer(
    kind: TransformerKind = "flux",
    *,
    seed: int = DEFAULT_SEED,
    dtype: torch.dtype = torch.float32,
    device: Device = "cpu",
    **overrides: Any,
) -> FluxTransformer2DModel | SD3Transformer2DModel:
    """A tiny Flux or SD3 transformer with seeded random weights (float16-exact), in eval mode."""
    config = transformer_config(kind, **overrides)
    cls = FluxTransformer2DModel if kind == "flux" else SD3Transformer2DModel
    module: FluxTransformer2DModel | SD3Transformer2DModel = _materialize(
        lambda: cls(**config), f"transformer:{kind}", seed, dtype, device
    )
    return module


def vae_config(kind: VaeKind = "sd1", **overrides: Any) -> dict[str, Any]:
    """``AutoencoderKL`` init arguments of a tiny VAE of ``kind`` (4 latent channels; 16 for SD3, Flux)."""
    if kind not in VAE_KINDS:
        raise ValueError(f"unknown VAE kind {kind!r}; expected one of {VAE_KINDS}")
    config: dict[str, Any] = {
        "in_channels": 3,
        "out_channels": 3,
        "down_block_types": ("DownEncoderBlock2D",) * 4,
        "up_block_types": ("UpDecoderBlock2D",) * 4,
        "block_out_channels": (16, 32, 32, 32),
        "layers_per_block": 1,
        "norm_num_groups": 8,
        "latent_channels": VAE_LATENT_CHANNELS[kind],
        "sample_size": UNET_SAMPLE_SIZE * VAE_SCALE_FACTOR,
    }
    if kind == "sd1":
        config.update(scaling_factor=0.18215)
    elif kind == "sdxl":
        config.update(scaling_factor=0.13025, force_upcast=True)
    elif kind == "sd3":
        config.update(
            scaling_factor=1.5305, shift_factor=0.0609, use_quant_conv=False, use_post_quant_conv=False
        )
    elif kind == "flux":
        config.update(
            scaling_factor=0.3611, shift_factor=0.1159, use_quant_conv=False, use_post_quant_conv=False
        )
    else:
        raise ValueError(f"unknown VAE kind {kind!r}; expected one of {VAE_KINDS}")
    config.update(overrides)
    return config


def text_encoder_config(kind: EncoderKind = "clip_l", **overrides: Any) -> CLIPTextConfig | T5Config:
    """The transformers config of a tiny text encoder: one layer, a narrow MLP, the tiny tokenizers' vocab."""
    if kind == "t5":
        t5 = T5Config(
            vocab_size=T5_VOCAB_SIZE,
            d_model=ENCODER_HIDDEN_SIZE["t5"],
            d_kv=8,
            d_ff=64,
            num_layers=1,
            num_heads=4,
            feed_forward_proj="gated-gelu",  # T5 v1.1, as SD3 and Flux use: wi_0, wi_1, wo
            is_encoder_decoder=False,
            use_cache=False,
            **overrides,
        )
        t5.architectures = ["T5EncoderModel"]
        return t5
    if kind not in ENCODER_KINDS:
        raise ValueError(f"unknown text encoder kind {kind!r}; expected one of {ENCODER_KINDS}")
    hidden = ENCODER_HIDDEN_SIZE[kind]
    fields: dict[str, Any] = {
        "vocab_size": CLIP_VOCAB_SIZE,
        "hidden_size": hidden,
        "intermediate_size": 64,
        "num_hidden_layers": 1,
        "num_attention_heads": hidden // 64,
        "max_position_embeddings": 77,
        "hidden_act": "quick_gelu" if kind == "clip_l" else "gelu",
        "projection_dim": {"clip_l": 768, "clip_g": 1280, "clip_h": 512}[kind],
        "bos_token_id": CLIP_VOCAB_SIZE - 2,
        "eos_token_id": CLIP_VOCAB_SIZE - 1,
        "pad_token_id": CLIP_VOCAB_SIZE - 1,
    }
    fields.update(overrides)
    clip = CLIPTextConfig(**fields)
    clip.architectures = ["CLIPTextModelWithProjection" if kind == "clip_g" else "CLIPTextModel"]
    return clip


_EMBEDDING_NAMES = ("embedding", "embed_tokens", "shared.", "relative_attention_bias")


def _random_weight(
    name: str, shape: tuple[int, ...], rng: np.random.Generator, dtype: torch.dtype
) -> torch.Tensor:
    """Seeded uniform weights on a float16-exact grid: ``k * 2**-p`` with ``|k| <= 1024``.

    Linear and convolution weights lie in ``±2**-round(log2(sqrt(fan_in)))`` (torch's default bound,
    to a power of two), embeddings in ``±1/32``, biases in ``±1/64``, norm scales in ``1 ± 1/16``. Every
    value is exact in float16, so float16 files and float32 modules hold the same numbers.
    """
    count = math.prod(shape)
    if len(shape) == 1 and not name.endswith("bias") and not any(e in name for e in _EMBEDDING_NAMES):
        values = rng.integers(-64, 65, count, dtype=np.int16).astype(np.float32) * np.float32(2.0**-10) + 1
    else:
        if name.endswith("bias"):
            exponent = 6
        elif any(e in name for e in _EMBEDDING_NAMES):
            exponent = 5
        else:
            exponent = max(0, round(math.log2(math.sqrt(math.prod(shape[1:]) or 1))))
        steps = rng.integers(-1024, 1025, count, dtype=np.int16)
        values = steps.astype(np.float32) * np.float32(2.0 ** -(exponent + 10))
    return torch.from_numpy(values.reshape(shape)).to(dtype)


def _materialize(factory: Callable[[], _M], name: str, seed: int, dtype: torch.dtype, device: Device) -> _M:
    """Build ``factory()`` without initialising it (parameters on the meta device, buffers real), then give
    every parameter seeded values from :func:`_random_weight`; tied parameters stay tied. Eval mode.
    On ``device="meta"`` the parameters stay empty: the module only has its structure."""
    with init_empty_weights(include_buffers=False):
        module = factory()
    if device == "meta":
        torch.nn.Module.eval(module)
        return module
    rng = np.random.default_rng(seed_for(name, seed))
    made: dict[int, torch.nn.Parameter] = {}
    for param_name, param in list(module.named_parameters(remove_duplicate=False)):
        if id(param) not in made:
            value = _random_weight(param_name, tuple(param.shape), rng, dtype)
            made[id(param)] = torch.nn.Parameter(value, requires_grad=param.requires_grad)
        owner, _, attr = param_name.rpartition(".")
        module.get_submodule(owner)._parameters[attr] = made[id(param)]
    if isinstance(module, PreTrainedModel):
        module.tie_weights()  # transformers 5 ties declared pairs (T5's shared / embed_tokens) as on load
    for buffer_name, buffer in list(module.named_buffers()):
        if buffer.is_floating_point() and buffer.dtype != dtype:
            owner, _, attr = buffer_name.rpartition(".")
            module.get_submodule(owner)._buffers[attr] = buffer.to(dtype)
    torch.nn.Module.eval(module)
    return module


def make_unet(
    kind: UNetKind = "sd1",
    *,
    seed: int = DEFAULT_SEED,
    dtype: torch.dtype = torch.float32,
    device: Device = "cpu",
    **overrides: Any,
) -> UNet2DConditionModel:
    """A tiny ``UNet2DConditionModel`` of ``kind`` with seeded random weights (float16-exact), in eval mode.

    ``device="meta"`` gives the structure only (no weights), cheap for naming and shapes; ``overrides``
    change :func:`unet_config` fields."""
    config = unet_config(kind, **overrides)
    unet: UNet2DConditionModel = _materialize(
        lambda: UNet2DConditionModel(**config), f"unet:{kind}", seed, dtype, device
    )
    return unet


def make_vae(
    kind: VaeKind = "sd1",
    *,
    seed: int = DEFAULT_SEED,
    dtype: torch.dtype = torch.float32,
    device: Device = "cpu",
    **overrides: Any,
) -> AutoencoderKL:
    """A tiny ``AutoencoderKL`` of ``kind`` with seeded random weights (float16-exact), in eval mode."""
    config = vae_config(kind, **overrides)
    vae: AutoencoderKL = _materialize(lambda: AutoencoderKL(**config), f"vae:{kind}", seed, dtype, device)
    return vae


def make_text_encoder(
    kind: EncoderKind = "clip_l",
    *,
    seed: int = DEFAULT_SEED,
    dtype: torch.dtype = torch.float32,
    device: Device = "cpu",
    **overrides: Any,
) -> TextEncoder:
    """A tiny text encoder: ``CLIPTextModel`` (clip_l, clip_h), ``CLIPTextModelWithProjection`` (clip_g)
    or ``T5EncoderModel`` (t5), with seeded random weights (float16-exact), in eval mode."""
    config = text_encoder_config(kind, **overrides)
    factory: Callable[[], TextEncoder]
    if isinstance(config, T5Config):
        factory = partial(T5EncoderModel, config)
    elif kind == "clip_g":
        factory = partial(CLIPTextModelWithProjection, config)
    else:
        factory = partial(CLIPTextModel, config)
    model = cast(TextEncoder, _materialize(factory, f"text_encoder:{kind}", seed, dtype, device))
    # The config says float32: files store float16, loaders upcast unless told otherwise.
    model.config.dtype = "float32"
    return model


def make_scheduler(base: Base = "sd1") -> SchedulerMixin:
    """The scheduler the real ``base`` pipeline ships: PNDM (SD1), DDIM v-prediction (SD2), Euler (SDXL)."""
    common: dict[str, Any] = {
        "num_train_timesteps": 1000,
        "beta_start": 0.00085,
        "beta_end": 0.012,
        "beta_schedule": "scaled_linear",
        "steps_offset": 1,
    }
    scheduler: SchedulerMixin
    if base == "sd1":
        scheduler = PNDMScheduler(**common, skip_prk_steps=True, set_alpha_to_one=False)
    elif base == "sd2":
        scheduler = DDIMScheduler(
            **common, prediction_type="v_prediction", clip_sample=False, set_alpha_to_one=False
        )
    elif base in ("sdxl", "sdxl_refiner"):
        scheduler = EulerDiscreteScheduler(**common, timestep_spacing="leading", interpolation_type="linear")
    else:
        raise ValueError(f"no UNet pipeline scheduler for base {base!r}")
    return scheduler


def state_dict_for_save(module: torch.nn.Module) -> dict[str, torch.Tensor]:
    """The state dict as the component's own files store it (diffusers / Hugging Face key layout).

    Tied tensors are stored once (T5 keeps ``shared.weight``), non-persistent buffers are left out, and
    ``CLIPTextModel`` keys carry the ``text_model.`` prefix that every published CLIP-L/H file has
    (transformers 5 dropped it from the module and maps it back on load).
    """
    prefix = "text_model." if type(module) is CLIPTextModel else ""
    first_name: dict[int, str] = {}
    tied: set[str] = set()
    for name, param in module.named_parameters(remove_duplicate=False):
        if first_name.setdefault(id(param), name) != name:
            tied.add(name)
    return {prefix + key: t.detach() for key, t in module.state_dict().items() if key not in tied}


def component_config(module: torch.nn.Module) -> dict[str, Any]:
    """The ``config.json`` a diffusers / transformers folder of this component carries, as a JSON dict."""
    if isinstance(module, PreTrainedModel):
        config: dict[str, Any] = json.loads(module.config.to_json_string(use_diff=False))
        config["architectures"] = [type(module).__name__]
        return config
    if isinstance(module, ModelMixin):
        diffusers_config: dict[str, Any] = json.loads(module.to_json_string())
        return diffusers_config
    raise TypeError(f"not a diffusers or transformers model: {type(module).__name__}")


def encoder_kind(module: torch.nn.Module) -> EncoderKind:
    """Which tiny encoder family a text-encoder module belongs to, by class and width."""
    if isinstance(module, T5EncoderModel):
        return "t5"
    if isinstance(module, CLIPTextModelWithProjection):
        return "clip_g"
    if isinstance(module, CLIPTextModel):
        return "clip_h" if module.config.hidden_size == ENCODER_HIDDEN_SIZE["clip_h"] else "clip_l"
    raise TypeError(f"not a text encoder: {type(module).__name__}")
