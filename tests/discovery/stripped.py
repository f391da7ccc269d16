"""Stripped real models: the real header (key names, shapes, dtypes) of public models, with a
zero-filled sparse data section, so that identification is tested on what real files say.

Names and shapes come from the real architectures instantiated on the meta device from the shipped
configs (``modelkeeper.formats.known_configs``); the original layout comes from the converters of
``modelkeeper.testing.original_layout``; the layouts no converter covers (BFL Flux, MMDiT SD3, kohya
and LyCORIS LoRAs) are written from their published key lists. Each file is the 8-byte length and
the JSON header, then ``os.truncate`` to the full size: a hole that costs no disk.
"""

from __future__ import annotations

import inspect
import json
import os
import re
import struct
from collections.abc import Callable, Iterable, Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass, field
from functools import cache
from pathlib import Path
from typing import Any

import torch
from diffusers import (
    AutoencoderKL,
    ControlNetModel,
    FluxTransformer2DModel,
    SD3Transformer2DModel,
    UNet2DConditionModel,
)
from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection, T5Config, T5EncoderModel

from modelkeeper.formats.known_configs import load_known_config
from modelkeeper.testing.original_layout import (
    SD1_CLIP_PREFIX,
    SD2_OPENCLIP_PREFIX,
    SDXL_CLIP_G_PREFIX,
    SDXL_CLIP_L_PREFIX,
    SDXL_REFINER_CLIP_G_PREFIX,
    clip_to_openclip,
    clip_to_original,
    unet_key_to_original,
    unet_to_original,
    vae_to_original,
)

Shapes = dict[str, tuple[str, tuple[int, ...]]]  # name -> (safetensors dtype, shape)

_DTYPES = {torch.float32: "F32", torch.float16: "F16", torch.bfloat16: "BF16", torch.int64: "I64"}
_SIZES = {"F32": 4, "F16": 2, "BF16": 2, "I64": 8, "F8_E4M3": 1, "U8": 1}


def write_stripped(path: Path, tensors: Shapes, metadata: Mapping[str, str] | None = None) -> Path:
    """A safetensors file with this header and a sparse, zero-filled data section."""
    header: dict[str, Any] = {}
    offset = 0
    for name, (dtype, shape) in tensors.items():
        n = _SIZES[dtype]
        for d in shape:
            n *= d
        header[name] = {"dtype": dtype, "shape": list(shape), "data_offsets": [offset, offset + n]}
        offset += n
    if metadata:
        header["__metadata__"] = dict(metadata)
    raw = json.dumps(header, separators=(",", ":")).encode()
    raw += b" " * (-len(raw) % 8)
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "wb") as f:
        f.write(struct.pack("<Q", len(raw)))
        f.write(raw)
    os.truncate(path, 8 + len(raw) + offset)
    return path


def shapes_of(state: Mapping[str, torch.Tensor], dtype: str | None = None, prefix: str = "") -> Shapes:
    return {prefix + k: (dtype or _DTYPES[v.dtype], tuple(v.shape)) for k, v in state.items()}


# ----------------------------------------------------------------------------- real architectures on meta


@contextmanager
def _meta_without_init() -> Iterator[None]:
    """Build modules on the meta device without running their (pointless, slow) weight init."""
    names = [n for n in dir(torch.nn.init) if n.endswith("_") and not n.startswith("_")]
    saved = {n: getattr(torch.nn.init, n) for n in names}
    try:
        for n in names:
            setattr(torch.nn.init, n, lambda tensor, *a, **k: tensor)
        with torch.device("meta"):
            yield
    finally:
        for n, f in saved.items():
            setattr(torch.nn.init, n, f)


@cache
def diffusers_state(cls_name: str, base: str, component: str) -> dict[str, torch.Tensor]:
    classes: dict[str, Any] = {
        "unet": UNet2DConditionModel,
        "vae": AutoencoderKL,
        "sd3": SD3Transformer2DModel,
        "flux": FluxTransformer2DModel,
    }
    config = load_known_config(base, component)
    with _meta_without_init():
        model = classes[cls_name].from_config(config)
    return dict(model.state_dict())


@cache
def controlnet_state(base: str) -> dict[str, torch.Tensor]:
    config = load_known_config(base, "unet")
    accepted = set(inspect.signature(ControlNetModel.__init__).parameters)
    with _meta_without_init():
        net = ControlNetModel(**{k: v for k, v in config.items() if k in accepted})
    return dict(net.state_dict())


@cache
def transformers_state(base: str, component: str) -> dict[str, torch.Tensor]:
    config = load_known_config(base, component)
    arch = config["architectures"][0]
    with _meta_without_init():
        if arch == "T5EncoderModel":
            model: Any = T5EncoderModel(T5Config(**config))
        elif arch == "CLIPTextModelWithProjection":
            model = CLIPTextModelWithProjection(CLIPTextConfig(**config))
        else:
            model = CLIPTextModel(CLIPTextConfig(**config))
    # As published files store them: CLIPTextModel under text_model. (transformers 5 dropped the
    # prefix from the module), T5's tied embedding once, as shared.weight.
    prefix = "text_model." if arch == "CLIPTextModel" else ""
    return {prefix + k: v for k, v in model.state_dict().items() if k != "encoder.embed_tokens.weight"}


def unet_original(base: str, prefix: str = "model.diffusion_model.") -> dict[str, torch.Tensor]:
    return unet_to_original(
        diffusers_state("unet", base, "unet"), load_known_config(base, "unet"), prefix=prefix
    )


def vae_original(base: str, prefix: str = "first_stage_model.") -> dict[str, torch.Tensor]:
    return vae_to_original(diffusers_state("vae", base, "vae"), load_known_config(base, "vae"), prefix=prefix)


def _projected(state: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """A CLIPTextModelWithProjection state as the OpenCLIP converter takes it."""
    return {
        k if k.startswith(("text_model.", "text_projection")) else "text_model." + k: v
        for k, v in state.items()
    }


# ----------------------------------------------------------------------------- layouts written from key lists


def flux_bfl(*, guidance: bool, prefix: str = "", dtype: str = "BF16") -> Shapes:
    """Black Forest Labs' layout of flux1-dev / flux1-schnell.safetensors (19 double, 38 single blocks)."""
    h, mlp = 3072, 12288
    out: Shapes = {}

    def lin(name: str, o: int, i: int) -> None:
        out[f"{prefix}{name}.weight"] = (dtype, (o, i))
        out[f"{prefix}{name}.bias"] = (dtype, (o,))

    lin("img_in", h, 64)
    lin("time_in.in_layer", h, 256)
    lin("time_in.out_layer", h, h)
    lin("vector_in.in_layer", h, 768)
    lin("vector_in.out_layer", h, h)
    if guidance:
        lin("guidance_in.in_layer", h, 256)
        lin("guidance_in.out_layer", h, h)
    lin("txt_in", h, 4096)
    for i in range(19):
        for s in ("img", "txt"):
            b = f"double_blocks.{i}.{s}"
            lin(f"{b}_mod.lin", 6 * h, h)
            lin(f"{b}_attn.qkv", 3 * h, h)
            out[f"{prefix}{b}_attn.norm.query_norm.scale"] = (dtype, (128,))
            out[f"{prefix}{b}_attn.norm.key_norm.scale"] = (dtype, (128,))
            lin(f"{b}_attn.proj", h, h)
            lin(f"{b}_mlp.0", mlp, h)
            lin(f"{b}_mlp.2", h, mlp)
    for i in range(38):
        b = f"single_blocks.{i}"
        lin(f"{b}.linear1", 3 * h + mlp, h)
        lin(f"{b}.linear2", h, h + mlp)
        out[f"{prefix}{b}.norm.query_norm.scale"] = (dtype, (128,))
        out[f"{prefix}{b}.norm.key_norm.scale"] = (dtype, (128,))
        lin(f"{b}.modulation.lin", 3 * h, h)
    lin("final_layer.linear", 64, h)
    lin("final_layer.adaLN_modulation.1", 2 * h, h)
    return out


def sd3_mmdit(*, depth: int = 24, prefix: str = "model.diffusion_model.", dtype: str = "F16") -> Shapes:
    """Stability's MMDiT layout of sd3_medium*.safetensors (24 joint blocks, hidden 1536)."""
    h = 64 * depth
    out: Shapes = {}

    def lin(name: str, o: int, i: int) -> None:
        out[f"{prefix}{name}.weight"] = (dtype, (o, i))
        out[f"{prefix}{name}.bias"] = (dtype, (o,))

    out[f"{prefix}pos_embed"] = (dtype, (1, 192 * 192, h))
    out[f"{prefix}x_embedder.proj.weight"] = (dtype, (h, 16, 2, 2))
    out[f"{prefix}x_embedder.proj.bias"] = (dtype, (h,))
    lin("t_embedder.mlp.0", h, 256)
    lin("t_embedder.mlp.2", h, h)
    lin("y_embedder.mlp.0", h, 2048)
    lin("y_embedder.mlp.2", h, h)
    lin("context_embedder", h, 4096)
    for i in range(depth):
        for part in ("context_block", "x_block"):
            b = f"joint_blocks.{i}.{part}"
            last = part == "context_block" and i == depth - 1
            lin(f"{b}.adaLN_modulation.1", (2 if last else 6) * h, h)
            lin(f"{b}.attn.qkv", 3 * h, h)
            if not last:
                lin(f"{b}.attn.proj", h, h)
                lin(f"{b}.mlp.fc1", 4 * h, h)
                lin(f"{b}.mlp.fc2", h, 4 * h)
    lin("final_layer.linear", 64, h)
    lin("final_layer.adaLN_modulation.1", 2 * h, h)
    return out


def _lora_targets(
    state: Mapping[str, torch.Tensor], keep: Callable[[str], bool]
) -> list[tuple[str, int, int]]:
    """(module, in, out) of the 2-D (or 1x1 conv) weights a LoRA trainer targets."""
    out = []
    for k, v in state.items():
        if k.endswith(".weight") and keep(k) and (v.ndim == 2 or (v.ndim == 4 and v.shape[2:] == (1, 1))):
            out.append((k.removesuffix(".weight"), int(v.shape[1]), int(v.shape[0])))
    return out


def _attn_modules(key: str) -> bool:
    return ".attentions." in key and (
        "attn" in key or "ff.net" in key or "proj_in" in key or "proj_out" in key
    )


def _te_modules(key: str) -> bool:
    return bool(re.search(r"layers\.\d+\.(self_attn\.(q|k|v|out)_proj|mlp\.fc[12])\.weight$", key))


def kohya_lora(
    base: str, *, rank: int = 32, original_names: bool = False, te: Iterable[tuple[str, str]] = ()
) -> Shapes:
    """kohya sd-scripts LoRA: lora_unet_* / lora_te*_ modules with lora_down, lora_up and alpha."""
    out: Shapes = {}

    def add(name: str, i: int, o: int) -> None:
        out[f"{name}.lora_down.weight"] = ("F16", (rank, i))
        out[f"{name}.lora_up.weight"] = ("F16", (o, rank))
        out[f"{name}.alpha"] = ("F16", ())

    config = load_known_config(base, "unet")
    for module, i, o in _lora_targets(diffusers_state("unet", base, "unet"), _attn_modules):
        name = (
            unet_key_to_original(module + ".weight", config).removesuffix(".weight")
            if original_names
            else module
        )
        add("lora_unet_" + name.replace(".", "_"), i, o)
    for te_prefix, component in te:
        for module, i, o in _lora_targets(transformers_state(base, component), _te_modules):
            add(te_prefix + module.replace(".", "_"), i, o)
    return out


def loha(base: str, rank: int = 16) -> Shapes:
    out: Shapes = {}
    for module, i, o in _lora_targets(diffusers_state("unet", base, "unet"), _attn_modules):
        n = "lora_unet_" + module.replace(".", "_")
        out[f"{n}.hada_w1_a"] = ("F16", (o, rank))
        out[f"{n}.hada_w1_b"] = ("F16", (rank, i))
        out[f"{n}.hada_w2_a"] = ("F16", (o, rank))
        out[f"{n}.hada_w2_b"] = ("F16", (rank, i))
        out[f"{n}.alpha"] = ("F16", ())
    return out


def lokr(base: str, factor: int = 8, rank: int = 8) -> Shapes:
    """LyCORIS LoKr with the second Kronecker factor decomposed (lokr_w2_a @ lokr_w2_b)."""
    out: Shapes = {}
    config = load_known_config(base, "unet")
    for module, i, o in _lora_targets(diffusers_state("unet", base, "unet"), _attn_modules):
        n = "lora_unet_" + unet_key_to_original(module + ".weight", config).removesuffix(".weight").replace(
            ".", "_"
        )
        out[f"{n}.lokr_w1"] = ("F16", (factor, factor))
        out[f"{n}.lokr_w2_a"] = ("F16", (o // factor, rank))
        out[f"{n}.lokr_w2_b"] = ("F16", (rank, i // factor))
        out[f"{n}.alpha"] = ("F16", ())
    return out


def diffusers_attn_lora(base: str, rank: int = 4) -> Shapes:
    """diffusers' pre-PEFT attention-processor LoRA (pytorch_lora_weights from train_text_to_image_lora)."""
    out: Shapes = {}
    for module, i, o in _lora_targets(
        diffusers_state("unet", base, "unet"), lambda k: ".attn" in k and "to_" in k
    ):
        m = re.fullmatch(r"(.*)\.(to_q|to_k|to_v|to_out\.0)", module)
        if not m:
            continue
        proc = f"unet.{m[1]}.processor.{m[2].replace('.0', '')}_lora"
        out[f"{proc}.down.weight"] = ("F32", (rank, i))
        out[f"{proc}.up.weight"] = ("F32", (o, rank))
    return out


def peft_flux_lora(rank: int = 16) -> Shapes:
    out: Shapes = {}
    state = diffusers_state("flux", "flux_dev", "transformer")
    for module, i, o in _lora_targets(state, lambda k: ".attn.to_" in k or ".attn.add_" in k):
        out[f"transformer.{module}.lora_A.weight"] = ("BF16", (rank, i))
        out[f"transformer.{module}.lora_B.weight"] = ("BF16", (o, rank))
    return out


def kohya_flux_lora(rank: int = 16) -> Shapes:
    out: Shapes = {}
    for name, (_, shape) in flux_bfl(guidance=True).items():
        if name.endswith(".weight") and len(shape) == 2 and ("_attn." in name or "linear" in name):
            n = "lora_unet_" + name.removesuffix(".weight").replace(".", "_")
            out[f"{n}.lora_down.weight"] = ("BF16", (rank, shape[1]))
            out[f"{n}.lora_up.weight"] = ("BF16", (shape[0], rank))
            out[f"{n}.alpha"] = ("BF16", ())
    return out


def controlnet_original(base: str) -> Shapes:
    """lllyasviel's ControlNet layout (control_model.*), from the diffusers model's names."""
    config = load_known_config(base, "unet")
    out: Shapes = {}
    for k, v in controlnet_state(base).items():
        if m := re.fullmatch(
            r"controlnet_cond_embedding\.(conv_in|conv_out|blocks\.(\d+))\.(weight|bias)", k
        ):
            idx = 0 if m[1] == "conv_in" else 14 if m[1] == "conv_out" else 2 * int(m[2]) + 2
            name = f"input_hint_block.{idx}.{m[3]}"
        elif m := re.fullmatch(r"controlnet_down_blocks\.(\d+)\.(weight|bias)", k):
            name = f"zero_convs.{m[1]}.0.{m[2]}"
        elif m := re.fullmatch(r"controlnet_mid_block\.(weight|bias)", k):
            name = f"middle_block_out.0.{m[1]}"
        else:
            name = unet_key_to_original(k, config)
        out["control_model." + name] = ("F16", tuple(v.shape))
    return out


# ----------------------------------------------------------------------------- the set


@dataclass(frozen=True)
class Expected:
    """What identification must answer for one stripped file."""

    type: str
    base: str
    variant: str = "normal"
    encoder: str | None = None
    lora_format: str | None = None
    rank: int | None = None
    components: tuple[str, ...] = ()
    layout: str | None = None
    compatible: tuple[str, ...] = ()  # when the header allows several bases, the true one is among these
    tensor_count: int | None = None


@dataclass(frozen=True)
class StrippedModel:
    rel: str  # path under the stripped root; several names are misleading on purpose
    tensors: Callable[[], Shapes]
    expected: Expected
    metadata: Mapping[str, str] | None = None


@dataclass
class StrippedSet:
    root: Path
    expected: dict[str, Expected] = field(default_factory=dict)  # relative path -> answer


def _main(unet_base: str, vae_base: str, encoders: Callable[[], Shapes]) -> Callable[[], Shapes]:
    return lambda: {
        **shapes_of(unet_original(unet_base), "F16"),
        **shapes_of(vae_original(vae_base), "F16"),
        **encoders(),
    }


def _sd1_clip() -> Shapes:
    out = shapes_of(
        clip_to_original(transformers_state("sd1", "text_encoder"), prefix=SD1_CLIP_PREFIX), "F16"
    )
    out["cond_stage_model.transformer.text_model.embeddings.position_ids"] = ("I64", (1, 77))
    return out


def _sd2_clip() -> Shapes:
    return shapes_of(
        clip_to_openclip(transformers_state("sd2", "text_encoder"), prefix=SD2_OPENCLIP_PREFIX), "F16"
    )


def _sdxl_clips() -> Shapes:
    return {
        **shapes_of(
            clip_to_original(transformers_state("sdxl", "text_encoder"), prefix=SDXL_CLIP_L_PREFIX), "F16"
        ),
        **shapes_of(
            clip_to_openclip(
                _projected(transformers_state("sdxl", "text_encoder_2")), prefix=SDXL_CLIP_G_PREFIX
            ),
            "F16",
        ),
    }


def _refiner_clip() -> Shapes:
    state = _projected(transformers_state("sdxl_refiner", "text_encoder_2"))
    return shapes_of(clip_to_openclip(state, prefix=SDXL_REFINER_CLIP_G_PREFIX), "F16")


def _sd3_encoders() -> Shapes:
    return {
        **shapes_of(transformers_state("sd3", "text_encoder"), "F16", "text_encoders.clip_l.transformer."),
        **shapes_of(transformers_state("sd3", "text_encoder_2"), "F16", "text_encoders.clip_g.transformer."),
        **shapes_of(
            transformers_state("sd3", "text_encoder_3"), "F8_E4M3", "text_encoders.t5xxl.transformer."
        ),
    }


def _sd3_main(encoders: bool) -> Callable[[], Shapes]:
    return lambda: {
        **sd3_mmdit(),
        **shapes_of(vae_original("sd3"), "F16"),
        **(_sd3_encoders() if encoders else {}),
    }


def _state(kind: str, base: str, component: str, dtype: str) -> Callable[[], Shapes]:
    return lambda: shapes_of(diffusers_state(kind, base, component), dtype)


def _encoder(base: str, component: str) -> Callable[[], Shapes]:
    return lambda: shapes_of(transformers_state(base, component), "F16")


SD_FAMILY = ("sd1", "sd2", "sdxl", "sdxl_refiner")
_SD1_MAIN = ("unet", "vae", "text_encoder")
_KOHYA_META = {"ss_network_module": "networks.lora", "ss_network_dim": "32", "ss_network_alpha": "16"}

MODELS: tuple[StrippedModel, ...] = (
    # Full checkpoints, original layout. Misleading names on purpose: the header decides.
    StrippedModel(
        "checkpoints/sdxl_base_1.0.safetensors",
        _main("sd1", "sd1", _sd1_clip),
        Expected("main", "sd1", components=_SD1_MAIN, layout="original"),
    ),
    StrippedModel(
        "checkpoints/sd15-inpainting.safetensors",
        _main("sd1_inpaint", "sd1", _sd1_clip),
        Expected("main", "sd1", "inpaint", components=_SD1_MAIN),
    ),
    StrippedModel(
        "checkpoints/v2-1_768-ema-pruned.safetensors",
        _main("sd2", "sd2", _sd2_clip),
        Expected("main", "sd2", "v_prediction", components=_SD1_MAIN),
    ),
    StrippedModel(
        "checkpoints/sd_xl_base_1.0.safetensors",
        _main("sdxl", "sdxl", _sdxl_clips),
        Expected("main", "sdxl", components=("unet", "vae", "text_encoder", "text_encoder")),
    ),
    StrippedModel(
        "checkpoints/sd_xl_refiner_1.0.safetensors",
        _main("sdxl_refiner", "sdxl_refiner", _refiner_clip),
        Expected("main", "sdxl_refiner", components=_SD1_MAIN),
    ),
    StrippedModel(
        "checkpoints/sd3_medium_incl_clips_t5xxlfp8.safetensors",
        _sd3_main(True),
        Expected(
            "main",
            "sd3",
            "medium",
            components=("transformer", "vae", "text_encoder", "text_encoder", "text_encoder"),
        ),
    ),
    StrippedModel(
        "checkpoints/sd3_medium.safetensors",
        _sd3_main(False),
        Expected("main", "sd3", "medium", components=("transformer", "vae")),
    ),
    # Denoisers alone.
    StrippedModel(
        "unet/flux1-dev.safetensors",
        lambda: flux_bfl(guidance=True),
        Expected("transformer", "flux", "dev", layout="original"),
    ),
    StrippedModel(
        "unet/flux1-schnell.safetensors",
        lambda: flux_bfl(guidance=False),
        Expected("transformer", "flux", "schnell", layout="original"),
    ),
    StrippedModel(
        "unet/flux1-dev-diffusers.safetensors",
        _state("flux", "flux_dev", "transformer", "BF16"),
        Expected("transformer", "flux", "dev", layout="diffusers"),
    ),
    StrippedModel(
        "unet/flux1-schnell-diffusers.safetensors",
        _state("flux", "flux_schnell", "transformer", "BF16"),
        Expected("transformer", "flux", "schnell", layout="diffusers"),
    ),
    StrippedModel(
        "unet/sd3_medium_transformer.safetensors",
        _state("sd3", "sd3", "transformer", "F16"),
        Expected("transformer", "sd3", "medium", layout="diffusers"),
    ),
    StrippedModel(
        "unet/sdxl_unet_diffusers.safetensors",
        _state("unet", "sdxl", "unet", "F16"),
        Expected("unet", "sdxl", layout="diffusers", tensor_count=1680),
    ),
    StrippedModel(
        "unet/sd15_unet_diffusers.safetensors",
        _state("unet", "sd1", "unet", "F16"),
        Expected("unet", "sd1", layout="diffusers", tensor_count=686),
    ),
    StrippedModel(
        "unet/sd15_inpaint_unet.safetensors",
        lambda: shapes_of(unet_original("sd1_inpaint", prefix=""), "F16"),
        Expected("unet", "sd1", "inpaint", layout="original", tensor_count=686),
    ),
    # VAEs: the shapes do not tell SD1 from SDXL, nor SD3 from Flux.
    StrippedModel(
        "vae/vae-ft-mse-840000-ema-pruned.safetensors",
        lambda: shapes_of(vae_original("sd1", prefix=""), "F32"),
        Expected("vae", "sd1", layout="original", compatible=SD_FAMILY),
    ),
    StrippedModel(
        "vae/sdxl_vae.safetensors",
        lambda: shapes_of(vae_original("sdxl", prefix=""), "F32"),
        Expected("vae", "sdxl", layout="original", compatible=SD_FAMILY),
    ),
    StrippedModel(
        "vae/ae.safetensors",
        lambda: shapes_of(vae_original("flux_dev", prefix=""), "F32"),
        Expected("vae", "flux", layout="original", compatible=("flux", "sd3")),
    ),
    StrippedModel(
        "vae/sd3_vae_diffusers.safetensors",
        _state("vae", "sd3", "vae", "F16"),
        Expected("vae", "sd3", layout="diffusers", compatible=("flux", "sd3")),
    ),
    # Text encoders, as ComfyUI's models/clip has them.
    StrippedModel(
        "clip/clip_l.safetensors",
        _encoder("flux_dev", "text_encoder"),
        Expected("text_encoder", "any", encoder="clip_l", compatible=("sd1", "sdxl", "sd3", "flux")),
    ),
    StrippedModel(
        "clip/clip_g.safetensors",
        _encoder("sd3", "text_encoder_2"),
        Expected("text_encoder", "any", encoder="clip_g", compatible=("sdxl", "sdxl_refiner", "sd3")),
    ),
    StrippedModel(
        "clip/t5xxl_fp16.safetensors",
        _encoder("flux_dev", "text_encoder_2"),
        Expected("text_encoder", "any", encoder="t5_xxl", compatible=("sd3", "flux")),
    ),
    StrippedModel(
        "clip/open_clip_vit_h.safetensors",
        lambda: shapes_of(clip_to_openclip(transformers_state("sd2", "text_encoder"), prefix=""), "F16"),
        Expected("text_encoder", "sd2", encoder="clip_h", layout="original"),
    ),
    # LoRAs.
    StrippedModel(
        "loras/sdxl-lightning-lora.safetensors",
        lambda: kohya_lora("sd1", rank=32, te=(("lora_te_", "text_encoder"),)),
        Expected("lora", "sd1", lora_format="kohya", rank=32),
        _KOHYA_META,
    ),
    StrippedModel(
        "loras/kohya_sdxl.safetensors",
        lambda: kohya_lora(
            "sdxl",
            rank=16,
            original_names=True,
            te=(("lora_te1_", "text_encoder"), ("lora_te2_", "text_encoder_2")),
        ),
        Expected("lora", "sdxl", lora_format="kohya", rank=16),
    ),
    StrippedModel(
        "loras/kohya_sd2.safetensors",
        lambda: kohya_lora("sd2", rank=8),
        Expected("lora", "sd2", lora_format="kohya", rank=8),
    ),
    StrippedModel(
        "loras/kohya_flux.safetensors",
        kohya_flux_lora,
        Expected("lora", "flux", lora_format="kohya", rank=16),
    ),
    StrippedModel(
        "loras/loha_sd15.safetensors",
        lambda: loha("sd1"),
        Expected("lora", "sd1", lora_format="loha", rank=16),
    ),
    StrippedModel(
        "loras/lokr_sdxl.safetensors",
        lambda: lokr("sdxl"),
        Expected("lora", "sdxl", lora_format="lokr", rank=8),
    ),
    StrippedModel(
        "loras/pytorch_lora_weights.safetensors",
        lambda: diffusers_attn_lora("sd1"),
        Expected("lora", "sd1", lora_format="diffusers", rank=4),
    ),
    StrippedModel(
        "loras/flux_peft.safetensors", peft_flux_lora, Expected("lora", "flux", lora_format="peft", rank=16)
    ),
    # ControlNets.
    StrippedModel(
        "controlnet/control_v11p_sd15_canny.safetensors",
        lambda: controlnet_original("sd1"),
        Expected("controlnet", "sd1", layout="original"),
    ),
    StrippedModel(
        "controlnet/controlnet-canny-sdxl-1.0.safetensors",
        lambda: shapes_of(controlnet_state("sdxl"), "F16"),
        Expected("controlnet", "sdxl", layout="diffusers"),
    ),
    # Embeddings.
    StrippedModel(
        "embeddings/easynegative.safetensors",
        lambda: {"emb_params": ("F32", (8, 768))},
        Expected("textual_inversion", "sd1"),
    ),
    StrippedModel(
        "embeddings/sd2_negative.safetensors",
        lambda: {"emb_params": ("F32", (16, 1024))},
        Expected("textual_inversion", "sd2"),
    ),
    StrippedModel(
        "embeddings/sdxl_embedding.safetensors",
        lambda: {"clip_g": ("F32", (4, 1280)), "clip_l": ("F32", (4, 768))},
        Expected("textual_inversion", "sdxl"),
    ),
    StrippedModel(
        "embeddings/learned_embeds.safetensors",
        lambda: {"<cat-toy>": ("F32", (768,))},
        Expected("textual_inversion", "sd1"),
    ),
)


def build(root: Path) -> StrippedSet:
    """Write every stripped model under ``root`` (seconds, and no real disk use)."""
    s = StrippedSet(root)
    for model in MODELS:
        write_stripped(root / model.rel, model.tensors(), model.metadata)
        s.expected[model.rel] = model.expected
    return s
