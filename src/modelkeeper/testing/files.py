"""Writing tiny components to disk in the forms found in the wild.

- single ``.safetensors`` files of one component, in diffusers or original key layout;
- full single-file checkpoints (UNet + VAE + text encoders, original layout, A1111/ComfyUI style);
- diffusers component folders (``config.json`` + weights, optional ``fp16`` variant);
- diffusers pipeline folders (``model_index.json`` and one folder per component).

Single files written here carry a ``modelkeeper.config`` metadata entry (see :data:`CONFIG_METADATA_KEY`)
unless asked not to; published files never have it, so loaders must not need it.
"""

from __future__ import annotations

import json
import struct
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any, Literal

import torch
from diffusers.models.modeling_utils import ModelMixin
from diffusers.models.unets.unet_2d_condition import UNet2DConditionModel
from diffusers.pipelines.pipeline_utils import DiffusionPipeline
from diffusers.pipelines.stable_diffusion.pipeline_stable_diffusion import StableDiffusionPipeline
from diffusers.pipelines.stable_diffusion.pipeline_stable_diffusion_inpaint import (
    StableDiffusionInpaintPipeline,
)
from diffusers.pipelines.stable_diffusion_xl.pipeline_stable_diffusion_xl import StableDiffusionXLPipeline
from diffusers.pipelines.stable_diffusion_xl.pipeline_stable_diffusion_xl_img2img import (
    StableDiffusionXLImg2ImgPipeline,
)
from diffusers.schedulers.scheduling_utils import SchedulerMixin
from safetensors.torch import save_file
from transformers import CLIPTokenizer, PreTrainedModel, T5Tokenizer

from modelkeeper.formats.conventions import CONFIG_METADATA_KEY, LDM_DENOISER_PREFIX, LDM_VAE_PREFIX
from modelkeeper.testing.components import (
    DEFAULT_SEED,
    Base,
    Component,
    EncoderKind,
    TextEncoder,
    component_config,
    encoder_kind,
    make_scheduler,
    make_text_encoder,
    make_unet,
    make_vae,
    state_dict_for_save,
)
from modelkeeper.testing.original_layout import (
    SD1_CLIP_PREFIX,
    SD2_OPENCLIP_PREFIX,
    SDXL_CLIP_G_PREFIX,
    SDXL_CLIP_L_PREFIX,
    SDXL_REFINER_CLIP_G_PREFIX,
    StateDict,
    clip_to_openclip,
    clip_to_original,
    unet_to_original,
    vae_to_original,
)
from modelkeeper.testing.tokenizer import make_clip_tokenizer, save_clip_tokenizer, save_t5_tokenizer

Layout = Literal["diffusers", "original"]
ComponentKind = Literal["unet", "vae", "clip_l", "clip_g", "clip_h", "t5"]
PipelineBase = Literal["sd1", "sd1_inpaint", "sd2", "sdxl", "sdxl_refiner"]

DIFFUSERS_WEIGHTS = "diffusion_pytorch_model.safetensors"
TRANSFORMERS_WEIGHTS = "model.safetensors"

ORIGINAL_PREFIX: dict[ComponentKind, str] = {  # where a full checkpoint keeps each component
    "unet": LDM_DENOISER_PREFIX,
    "vae": LDM_VAE_PREFIX,
    "clip_l": SD1_CLIP_PREFIX,
    "clip_g": SDXL_CLIP_G_PREFIX,
    "clip_h": SD2_OPENCLIP_PREFIX,
    "t5": "",
}


def component_kind(module: torch.nn.Module) -> ComponentKind:
    """``unet``, ``vae`` or the encoder family of a tiny component module."""
    if isinstance(module, UNet2DConditionModel):
        return "unet"
    if isinstance(module, ModelMixin) and type(module).__name__ == "AutoencoderKL":
        return "vae"
    kind: EncoderKind = encoder_kind(module)
    return kind


def to_original_layout(
    kind: ComponentKind,
    state_dict: Mapping[str, torch.Tensor],
    config: Mapping[str, Any],
    *,
    prefix: str | None = None,
) -> StateDict:
    """A component's diffusers-layout state dict in the original layout, under ``prefix``
    (default: where a full checkpoint keeps it, e.g. ``model.diffusion_model.`` for a UNet)."""
    prefix = ORIGINAL_PREFIX[kind] if prefix is None else prefix
    if kind == "unet":
        return unet_to_original(state_dict, config, prefix=prefix)
    if kind == "vae":
        return vae_to_original(state_dict, config, prefix=prefix)
    if kind == "clip_l":
        return clip_to_original(state_dict, prefix=prefix)
    if kind in ("clip_g", "clip_h"):
        return clip_to_openclip(state_dict, prefix=prefix)
    return {prefix + key: tensor for key, tensor in state_dict.items()}


def _cast(state_dict: Mapping[str, torch.Tensor], dtype: torch.dtype | None) -> StateDict:
    out: StateDict = {}
    for key, tensor in state_dict.items():
        cast = tensor.to(dtype) if dtype is not None and tensor.is_floating_point() else tensor
        out[key] = cast.contiguous()
    return out


def write_safetensors(
    state_dict: Mapping[str, torch.Tensor], path: Path, *, metadata: Mapping[str, str] | None = None
) -> Path:
    """Write ``state_dict`` (made contiguous) to ``path`` with ``{"format": "pt"}`` plus ``metadata``,
    byte-for-byte reproducibly (see :func:`canonicalize_safetensors`)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    save_file(_cast(state_dict, None), str(path), metadata={"format": "pt", **(metadata or {})})
    return canonicalize_safetensors(path)


def canonicalize_safetensors(path: Path) -> Path:
    """Rewrite a safetensors file's JSON header in a fixed order (metadata first, its keys sorted, then the
    tensors in data order), so that equal contents give equal bytes. The safetensors writer emits the
    metadata in hash-map order, which changes from one process to the next. Tensor data is untouched."""
    blob = path.read_bytes()
    (length,) = struct.unpack("<Q", blob[:8])
    header: dict[str, Any] = json.loads(blob[8 : 8 + length])
    ordered: dict[str, Any] = {}
    metadata = header.pop("__metadata__", None)
    if metadata:
        ordered["__metadata__"] = dict(sorted(metadata.items()))
    for name in sorted(header, key=lambda n: (header[n]["data_offsets"][0], n)):
        ordered[name] = header[name]
    text = json.dumps(ordered, separators=(",", ":"), ensure_ascii=False).encode()
    text += b" " * (-len(text) % 8)
    path.write_bytes(struct.pack("<Q", len(text)) + text + blob[8 + length :])
    return path


def save_single_file(
    source: Component | Mapping[str, torch.Tensor],
    path: Path,
    *,
    layout: Layout = "diffusers",
    kind: ComponentKind | None = None,
    config: Mapping[str, Any] | None = None,
    prefix: str | None = None,
    with_config_metadata: bool = True,
    dtype: torch.dtype | None = torch.float16,
    metadata: Mapping[str, str] | None = None,
) -> Path:
    """Write one component as a single ``.safetensors`` file.

    ``source`` is a module, or a diffusers-layout state dict with its ``kind`` and ``config``. In the
    ``original`` layout ``prefix`` defaults to the component's place in a full checkpoint; pass ``""``
    for a bare file (as ComfyUI's ``unet/`` and ``vae/`` files often are). ``dtype`` None keeps the
    tensors' own dtype. ``with_config_metadata=False`` writes no :data:`CONFIG_METADATA_KEY`, like a
    published file.
    """
    if isinstance(source, torch.nn.Module):
        kind = kind or component_kind(source)
        config = config if config is not None else component_config(source)
        state_dict = state_dict_for_save(source)
    elif isinstance(source, Mapping):
        state_dict = dict(source)
    else:
        raise TypeError(f"cannot save a {type(source).__name__} as a component")
    if kind is None:
        raise ValueError("a state dict needs its component kind")
    if config is None and (with_config_metadata or (layout == "original" and kind in ("unet", "vae"))):
        raise ValueError(f"a {kind} state dict needs its config here")
    if layout == "original":
        assert config is not None or kind not in ("unet", "vae")
        state_dict = to_original_layout(kind, state_dict, config or {}, prefix=prefix)
    elif prefix:
        state_dict = {prefix + key: tensor for key, tensor in state_dict.items()}
    extra = dict(metadata or {})
    if with_config_metadata:
        extra[CONFIG_METADATA_KEY] = json.dumps(config, sort_keys=True)
    return write_safetensors(_cast(state_dict, dtype), path, metadata=extra)


_CHECKPOINT_ENCODER_PREFIX: dict[tuple[PipelineBase, EncoderKind], str] = {
    ("sd1", "clip_l"): SD1_CLIP_PREFIX,
    ("sd1_inpaint", "clip_l"): SD1_CLIP_PREFIX,
    ("sd2", "clip_h"): SD2_OPENCLIP_PREFIX,
    ("sdxl", "clip_l"): SDXL_CLIP_L_PREFIX,
    ("sdxl", "clip_g"): SDXL_CLIP_G_PREFIX,
    ("sdxl_refiner", "clip_g"): SDXL_REFINER_CLIP_G_PREFIX,
}
PIPELINE_CLASS: dict[PipelineBase, type[DiffusionPipeline]] = {
    "sd1": StableDiffusionPipeline,
    "sd1_inpaint": StableDiffusionInpaintPipeline,
    "sd2": StableDiffusionPipeline,
    "sdxl": StableDiffusionXLPipeline,
    "sdxl_refiner": StableDiffusionXLImg2ImgPipeline,
}
PIPELINE_ENCODERS: dict[PipelineBase, tuple[EncoderKind, ...]] = {
    "sd1": ("clip_l",),
    "sd1_inpaint": ("clip_l",),
    "sd2": ("clip_h",),
    "sdxl": ("clip_l", "clip_g"),
    "sdxl_refiner": ("clip_g",),
}


def save_checkpoint(
    path: Path,
    *,
    base: PipelineBase,
    unet: UNet2DConditionModel,
    vae: ModelMixin,
    text_encoders: Sequence[TextEncoder],
    with_config_metadata: bool = True,
    dtype: torch.dtype | None = torch.float16,
    metadata: Mapping[str, str] | None = None,
) -> Path:
    """Write a full original-layout checkpoint (``model.diffusion_model.*``, ``first_stage_model.*`` and the
    text encoders under ``cond_stage_model.*`` / ``conditioner.embedders.N.*``), as A1111 and ComfyUI load."""
    if [encoder_kind(e) for e in text_encoders] != list(PIPELINE_ENCODERS[base]):
        raise ValueError(f"a {base} checkpoint needs text encoders {PIPELINE_ENCODERS[base]}")
    state_dict = to_original_layout("unet", state_dict_for_save(unet), component_config(unet))
    state_dict.update(to_original_layout("vae", state_dict_for_save(vae), component_config(vae)))
    for encoder in text_encoders:
        kind = encoder_kind(encoder)
        prefix = _CHECKPOINT_ENCODER_PREFIX[(base, kind)]
        state_dict.update(to_original_layout(kind, state_dict_for_save(encoder), {}, prefix=prefix))
    extra = dict(metadata or {})
    if with_config_metadata:
        configs = checkpoint_config(base, unet=unet, vae=vae, text_encoders=text_encoders)
        extra[CONFIG_METADATA_KEY] = json.dumps(configs, sort_keys=True)
    return write_safetensors(_cast(state_dict, dtype), path, metadata=extra)


def checkpoint_config(
    base: PipelineBase, *, unet: UNet2DConditionModel, vae: ModelMixin, text_encoders: Sequence[TextEncoder]
) -> dict[str, Any]:
    """The :data:`CONFIG_METADATA_KEY` value of a full checkpoint: the pipeline class and each component's
    config under its diffusers pipeline name (``unet``, ``vae``, ``text_encoder``, ``text_encoder_2``)."""
    configs: dict[str, Any] = {"_class_name": PIPELINE_CLASS[base].__name__}
    configs.update(unet=component_config(unet), vae=component_config(vae))
    for name, encoder in zip(_text_encoder_names(base), text_encoders, strict=True):
        configs[name] = component_config(encoder)
    return configs


def _text_encoder_names(base: PipelineBase) -> tuple[str, ...]:
    if base == "sdxl":
        return ("text_encoder", "text_encoder_2")
    if base == "sdxl_refiner":
        return ("text_encoder_2",)
    return ("text_encoder",)


def save_component_folder(
    module: torch.nn.Module,
    folder: Path,
    *,
    dtype: torch.dtype | None = torch.float16,
    variants: Sequence[str] = (),
) -> Path:
    """Write a diffusers / transformers component folder: ``config.json`` and the weights
    (``diffusion_pytorch_model.safetensors`` or ``model.safetensors``) in ``dtype``, plus one
    ``<name>.<variant>.safetensors`` per variant (only ``fp16`` and ``bf16`` are known)."""
    folder.mkdir(parents=True, exist_ok=True)
    weights = TRANSFORMERS_WEIGHTS if isinstance(module, PreTrainedModel) else DIFFUSERS_WEIGHTS
    config = component_config(module)
    (folder / "config.json").write_text(json.dumps(config, indent=2, sort_keys=True) + "\n", encoding="utf-8")
    state_dict = state_dict_for_save(module)
    write_safetensors(_cast(state_dict, dtype), folder / weights)
    variant_dtypes = {"fp16": torch.float16, "bf16": torch.bfloat16}
    for variant in variants:
        if variant not in variant_dtypes:
            raise ValueError(f"unknown weights variant {variant!r}")
        stem, suffix = weights.rsplit(".", 1)
        write_safetensors(_cast(state_dict, variant_dtypes[variant]), folder / f"{stem}.{variant}.{suffix}")
    return folder


def make_pipeline(
    base: PipelineBase = "sd1", *, seed: int = DEFAULT_SEED, dtype: torch.dtype = torch.float32
) -> DiffusionPipeline:
    """A tiny in-memory pipeline of ``base`` (SD1, SD1 inpaint, SD2 v-prediction, SDXL, SDXL refiner)."""
    vae_kind: Literal["sd1", "sdxl"] = "sdxl" if base.startswith("sdxl") else "sd1"
    return assemble_pipeline(
        base,
        unet=make_unet(base, seed=seed, dtype=dtype),
        vae=make_vae(vae_kind, seed=seed, dtype=dtype),
        text_encoders=[make_text_encoder(kind, seed=seed, dtype=dtype) for kind in PIPELINE_ENCODERS[base]],
    )


def assemble_pipeline(
    base: PipelineBase,
    *,
    unet: torch.nn.Module,
    vae: torch.nn.Module,
    text_encoders: Sequence[torch.nn.Module],
) -> DiffusionPipeline:
    """The diffusers pipeline of ``base`` around the given modules, with the tiny tokenizers and the
    scheduler the real pipeline ships (no safety checker)."""
    parts: dict[str, Any] = {
        "unet": unet,
        "vae": vae,
        "scheduler": make_scheduler("sd1" if base == "sd1_inpaint" else base),
    }
    for name, encoder in zip(_text_encoder_names(base), text_encoders, strict=True):
        parts[name] = encoder
        parts[name.replace("text_encoder", "tokenizer")] = make_clip_tokenizer()
    if base == "sdxl_refiner":
        parts.update(text_encoder=None, tokenizer=None, requires_aesthetics_score=True)
    elif base != "sdxl":
        parts.update(safety_checker=None, feature_extractor=None, requires_safety_checker=False)
    pipeline: DiffusionPipeline = PIPELINE_CLASS[base](**parts)
    return pipeline


def save_pipeline_folder(
    pipeline: DiffusionPipeline, folder: Path, *, dtype: torch.dtype | None = torch.float16
) -> Path:
    """Write ``pipeline`` as a diffusers folder that ``<Pipeline>.from_pretrained(folder)`` loads offline.

    Weights are stored in ``dtype`` (float16 by default, to stay small); every config says float32, so a
    plain ``from_pretrained`` gives float32 modules.
    """
    folder.mkdir(parents=True, exist_ok=True)
    pipeline.save_config(folder)
    for name, part in pipeline.components.items():
        target = folder / name
        if isinstance(part, ModelMixin | PreTrainedModel):
            save_component_folder(part, target, dtype=dtype)
        elif isinstance(part, SchedulerMixin):
            part.save_pretrained(target)
        elif isinstance(part, CLIPTokenizer):
            save_clip_tokenizer(target, part)
        elif isinstance(part, T5Tokenizer):
            save_t5_tokenizer(target, part)
        elif part is not None:
            raise TypeError(f"cannot save pipeline component {name}: {type(part).__name__}")
    return folder


__all__ = [
    "CONFIG_METADATA_KEY",
    "DIFFUSERS_WEIGHTS",
    "ORIGINAL_PREFIX",
    "PIPELINE_CLASS",
    "PIPELINE_ENCODERS",
    "TRANSFORMERS_WEIGHTS",
    "Base",
    "ComponentKind",
    "Layout",
    "PipelineBase",
    "assemble_pipeline",
    "canonicalize_safetensors",
    "checkpoint_config",
    "component_kind",
    "make_pipeline",
    "save_checkpoint",
    "save_component_folder",
    "save_pipeline_folder",
    "save_single_file",
    "to_original_layout",
    "write_safetensors",
]
