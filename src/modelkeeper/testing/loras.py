"""LoRA files for the tiny UNets and CLIP text encoders, in the formats people download.

- kohya (sd-scripts): ``lora_unet_<module>.lora_down.weight`` / ``.lora_up.weight`` / ``.alpha`` and
  ``lora_te[12]_text_model_encoder_layers_0_self_attn_q_proj...``, with ``ss_*`` training metadata. SD1
  module names follow diffusers (``down_blocks_0_attentions_0_...``); SDXL ones follow the original SGM
  UNet that sd-scripts trains (``input_blocks_4_1_transformer_blocks_0_attn1_to_k``).
- diffusers / PEFT: made by peft itself (``LoraConfig`` injected, ``get_peft_model_state_dict``) and
  saved by the pipeline's ``save_lora_weights``: ``unet.<module>.lora_A.weight`` / ``.lora_B.weight``.
- LyCORIS LoHa (``hada_w1_a``, ``hada_w1_b``, ``hada_w2_a``, ``hada_w2_b``) and LoKr (``lokr_w1``,
  ``lokr_w2``) on kohya module names.
"""

from __future__ import annotations

import json
import math
from collections.abc import Iterator
from pathlib import Path
from typing import Any, Literal

import numpy as np
import torch
from diffusers.models.unets.unet_2d_condition import UNet2DConditionModel
from diffusers.pipelines.stable_diffusion.pipeline_stable_diffusion import StableDiffusionPipeline
from diffusers.pipelines.stable_diffusion_xl.pipeline_stable_diffusion_xl import StableDiffusionXLPipeline
from peft import LoraConfig, get_peft_model_state_dict, inject_adapter_in_model
from transformers import CLIPTextModel

from modelkeeper.testing.components import (
    DEFAULT_SEED,
    EncoderKind,
    TextEncoder,
    make_text_encoder,
    make_unet,
    seed_for,
)
from modelkeeper.testing.files import canonicalize_safetensors, write_safetensors
from modelkeeper.testing.original_layout import StateDict, unet_key_to_original

LoraBase = Literal["sd1", "sdxl"]
LycorisAlgo = Literal["loha", "lokr"]

DEFAULT_RANK = 4
PEFT_UNET_TARGETS = ("to_k", "to_q", "to_v", "to_out.0")
PEFT_TEXT_ENCODER_TARGETS = ("q_proj", "k_proj", "v_proj", "out_proj")
KOHYA_BASE_VERSION: dict[LoraBase, str] = {"sd1": "sd_v1", "sdxl": "sdxl_base_v1-0"}
MODELSPEC_ARCHITECTURE: dict[LoraBase, str] = {
    "sd1": "stable-diffusion-v1/lora",
    "sdxl": "stable-diffusion-xl-v1-base/lora",
}
TRIGGER_WORD = "tinystyle"


def _unet_targets(
    unet: UNet2DConditionModel, *, linear_only: bool = False
) -> Iterator[tuple[str, torch.nn.Module]]:
    """(diffusers module name, module) of every Linear / 1x1 Conv2d inside a ``Transformer2DModel``: the
    modules sd-scripts' LoRA trains by default."""
    for parent_name, parent in unet.named_modules():
        if type(parent).__name__ != "Transformer2DModel":
            continue
        for name, module in parent.named_modules():
            is_conv = isinstance(module, torch.nn.Conv2d) and module.kernel_size == (1, 1)
            if isinstance(module, torch.nn.Linear) or (is_conv and not linear_only):
                yield f"{parent_name}.{name}", module


def _text_encoder_targets(encoder: TextEncoder) -> Iterator[tuple[str, torch.nn.Linear]]:
    """(Hugging Face module name with ``text_model.``, module) of the attention and MLP Linears."""
    for name, module in encoder.named_modules():
        if isinstance(module, torch.nn.Linear) and (".self_attn." in name or ".mlp." in name):
            yield ("" if name.startswith("text_model.") else "text_model.") + name, module


def _kohya_unet_name(module_name: str, unet: UNet2DConditionModel, base: LoraBase) -> str:
    if base == "sdxl":
        module_name = unet_key_to_original(module_name + ".weight", unet.config).removesuffix(".weight")
    return "lora_unet_" + module_name.replace(".", "_")


def _random(rng: np.random.Generator, shape: tuple[int, ...], scale: float) -> torch.Tensor:
    """Seeded normal values times ``scale``, as float16 (LoRA files are float16)."""
    values = rng.standard_normal(shape, dtype=np.float32) * np.float32(scale)
    return torch.from_numpy(values).to(torch.float16)


def _kohya_pair(
    module: torch.nn.Module, rank: int, rng: np.random.Generator
) -> tuple[torch.Tensor, torch.Tensor]:
    tail: tuple[int, ...] = ()
    if isinstance(module, torch.nn.Conv2d):
        in_dim, out_dim, tail = module.in_channels, module.out_channels, (1, 1)
    else:
        assert isinstance(module, torch.nn.Linear)
        in_dim, out_dim = module.in_features, module.out_features
    down = _random(rng, (rank, in_dim, *tail), 1 / math.sqrt(in_dim))
    return down, _random(rng, (out_dim, rank, *tail), 0.02)


def kohya_lora_state_dict(
    base: LoraBase = "sd1",
    *,
    rank: int = DEFAULT_RANK,
    alpha: float | None = None,
    unet: UNet2DConditionModel | None = None,
    text_encoders: tuple[TextEncoder, ...] | None = None,
    seed: int = DEFAULT_SEED,
) -> StateDict:
    """A kohya-format LoRA for the tiny UNet and CLIP text encoder(s) of ``base``, as float16 tensors."""
    alpha = float(rank if alpha is None else alpha)
    unet = unet or make_unet(base, device="meta")
    if text_encoders is None:
        kinds: tuple[EncoderKind, ...] = ("clip_l", "clip_g") if base == "sdxl" else ("clip_l",)
        text_encoders = tuple(make_text_encoder(kind, device="meta") for kind in kinds)
    rng = np.random.default_rng(seed_for(f"kohya:{base}", seed))
    pairs: list[tuple[str, torch.nn.Module]] = [
        (_kohya_unet_name(name, unet, base), module) for name, module in _unet_targets(unet)
    ]
    te_prefixes = ["lora_te1_", "lora_te2_"] if base == "sdxl" else ["lora_te_"]
    for prefix, encoder in zip(te_prefixes, text_encoders, strict=True):
        pairs += [(prefix + name.replace(".", "_"), m) for name, m in _text_encoder_targets(encoder)]
    out: StateDict = {}
    for lora_name, module in pairs:
        down, up = _kohya_pair(module, rank, rng)
        out[f"{lora_name}.lora_down.weight"] = down
        out[f"{lora_name}.lora_up.weight"] = up
        out[f"{lora_name}.alpha"] = torch.tensor(alpha, dtype=torch.float16)
    return out


def kohya_metadata(
    base: LoraBase, *, rank: int, alpha: float, name: str, network_module: str = "networks.lora"
) -> dict[str, str]:
    """The ``ss_*`` / ``modelspec.*`` metadata sd-scripts writes (the subset tools read)."""
    resolution = "(64, 64)" if base == "sd1" else "(1024, 1024)"
    return {
        "ss_network_module": network_module,
        "ss_network_dim": str(rank),
        "ss_network_alpha": str(float(alpha)),
        "ss_base_model_version": KOHYA_BASE_VERSION[base],
        "ss_v2": "False",
        "ss_output_name": name,
        "ss_resolution": resolution,
        "ss_num_train_images": "12",
        "ss_num_epochs": "1",
        "ss_training_comment": "modelkeeper tiny fixture, random weights",
        "ss_sd_model_name": f"tiny-{base}.safetensors",
        "ss_tag_frequency": json.dumps({f"1_{TRIGGER_WORD}": {TRIGGER_WORD: 12, "cat": 3}}),
        "modelspec.sai_model_spec": "1.0.0",
        "modelspec.architecture": MODELSPEC_ARCHITECTURE[base],
        "modelspec.implementation": "https://github.com/kohya-ss/sd-scripts",
        "modelspec.title": name,
        "modelspec.trigger_phrase": TRIGGER_WORD,
    }


def save_kohya_lora(
    path: Path,
    base: LoraBase = "sd1",
    *,
    rank: int = DEFAULT_RANK,
    alpha: float | None = None,
    seed: int = DEFAULT_SEED,
) -> Path:
    """Write a kohya-format LoRA (UNet + text encoders) of the tiny ``base`` model, with ``ss_*`` metadata."""
    alpha = float(rank if alpha is None else alpha)
    state_dict = kohya_lora_state_dict(base, rank=rank, alpha=alpha, seed=seed)
    metadata = kohya_metadata(base, rank=rank, alpha=alpha, name=path.stem)
    return write_safetensors(state_dict, path, metadata=metadata)


def _peft_layers(
    module: torch.nn.Module, targets: tuple[str, ...], rank: int, alpha: float, rng: np.random.Generator
) -> tuple[StateDict, LoraConfig]:
    """peft's LoRA state dict for ``module`` (its structure only, on the meta device), with seeded values."""
    # peft annotates lora_alpha as int; any number works, and kohya alphas are often fractional.
    lora_alpha: Any = alpha
    config = LoraConfig(r=rank, lora_alpha=lora_alpha, target_modules=list(targets), init_lora_weights=True)
    inject_adapter_in_model(config, module)
    peft_layers = get_peft_model_state_dict(module)
    layers: StateDict = {key: _random(rng, tuple(value.shape), 0.02) for key, value in peft_layers.items()}
    if type(module) is CLIPTextModel:
        # Published diffusers LoRAs name CLIP-L modules ``text_model.encoder...`` (transformers 4 layout).
        layers = {k if k.startswith("text_model.") else "text_model." + k: v for k, v in layers.items()}
    return layers, config


def _adapter_metadata(config: LoraConfig) -> dict[str, object]:
    """``config`` as diffusers stores it in the file, with ``target_modules`` (a set in peft) sorted so that
    the file is the same in every process."""
    data: dict[str, object] = config.to_dict()
    targets = data.get("target_modules")
    if isinstance(targets, list | set | tuple):
        data["target_modules"] = sorted(targets)
    return data


def save_peft_lora(
    path: Path,
    base: LoraBase = "sd1",
    *,
    rank: int = DEFAULT_RANK,
    alpha: float | None = None,
    text_encoder: bool = True,
    seed: int = DEFAULT_SEED,
) -> Path:
    """Write a diffusers/PEFT LoRA for the tiny ``base`` model: peft injects ``LoraConfig`` adapters into
    fresh tiny modules, and the pipeline class's ``save_lora_weights`` writes them (``unet.*``,
    ``text_encoder.*``, ``text_encoder_2.*`` keys with ``lora_A`` / ``lora_B``)."""
    alpha = float(rank if alpha is None else alpha)
    rng = np.random.default_rng(seed_for(f"peft:{base}", seed))
    unet = make_unet(base, device="meta")
    unet_layers, unet_config = _peft_layers(unet, PEFT_UNET_TARGETS, rank, alpha, rng)
    layers: dict[str, StateDict | None] = {"text_encoder": None, "text_encoder_2": None}
    configs: dict[str, dict[str, object] | None] = {"text_encoder": None, "text_encoder_2": None}
    if text_encoder:
        encoders: tuple[tuple[str, EncoderKind], ...] = (
            (("text_encoder", "clip_l"), ("text_encoder_2", "clip_g"))
            if base == "sdxl"
            else (("text_encoder", "clip_l"),)
        )
        for name, kind in encoders:
            encoder = make_text_encoder(kind, device="meta")
            layers[name], config = _peft_layers(encoder, PEFT_TEXT_ENCODER_TARGETS, rank, alpha, rng)
            configs[name] = _adapter_metadata(config)
    path.parent.mkdir(parents=True, exist_ok=True)
    arguments: dict[str, Any] = {
        "unet_lora_layers": unet_layers,
        "text_encoder_lora_layers": layers["text_encoder"],
        "weight_name": path.name,
        "unet_lora_adapter_metadata": _adapter_metadata(unet_config),
        "text_encoder_lora_adapter_metadata": configs["text_encoder"],
    }
    if base == "sdxl":
        arguments["text_encoder_2_lora_layers"] = layers["text_encoder_2"]
        arguments["text_encoder_2_lora_adapter_metadata"] = configs["text_encoder_2"]
        StableDiffusionXLPipeline.save_lora_weights(path.parent, **arguments)
    else:
        StableDiffusionPipeline.save_lora_weights(path.parent, **arguments)
    return canonicalize_safetensors(path)


def _factor(dim: int) -> tuple[int, int]:
    """``dim`` as ``a * b``, ``a <= b`` as close as can be (LyCORIS' ``factorization``, factor -1)."""
    a = math.isqrt(dim)
    while dim % a:
        a -= 1
    return a, dim // a


def lycoris_state_dict(
    algo: LycorisAlgo = "loha",
    *,
    rank: int = DEFAULT_RANK,
    alpha: float | None = None,
    unet: UNet2DConditionModel | None = None,
    seed: int = DEFAULT_SEED,
) -> StateDict:
    """A LyCORIS LoHa or LoKr for the tiny SD1 UNet's attention and feed-forward Linears, float16.

    LoHa: ``dW = (w1_a @ w1_b) * (w2_a @ w2_b) * alpha / rank``. LoKr: ``dW = kron(w1, w2)``, both factors
    full (no ``w2_a`` / ``w2_b`` split at these sizes).
    """
    alpha = float(rank if alpha is None else alpha)
    unet = unet or make_unet("sd1", device="meta")
    rng = np.random.default_rng(seed_for(f"lycoris:{algo}", seed))
    out: StateDict = {}
    for name, module in _unet_targets(unet, linear_only=True):
        assert isinstance(module, torch.nn.Linear)
        key = _kohya_unet_name(name, unet, "sd1")
        out_dim, in_dim = module.out_features, module.in_features
        tensors: dict[str, torch.Tensor]
        if algo == "loha":
            tensors = {
                "hada_w1_a": _random(rng, (out_dim, rank), 0.1),
                "hada_w1_b": _random(rng, (rank, in_dim), 0.1),
                "hada_w2_a": _random(rng, (out_dim, rank), 0.1),
                "hada_w2_b": _random(rng, (rank, in_dim), 0.1),
            }
        else:
            (out_l, out_k), (in_m, in_n) = _factor(out_dim), _factor(in_dim)
            tensors = {
                "lokr_w1": _random(rng, (out_l, in_m), 0.1),
                "lokr_w2": _random(rng, (out_k, in_n), 0.1),
            }
        for suffix, tensor in tensors.items():
            out[f"{key}.{suffix}"] = tensor
        out[f"{key}.alpha"] = torch.tensor(alpha, dtype=torch.float16)
    return out


def save_lycoris(
    path: Path,
    algo: LycorisAlgo = "loha",
    *,
    rank: int = DEFAULT_RANK,
    alpha: float | None = None,
    seed: int = DEFAULT_SEED,
) -> Path:
    """Write a LyCORIS LoHa or LoKr file for the tiny SD1 UNet, with LyCORIS' kohya-style metadata."""
    alpha = float(rank if alpha is None else alpha)
    metadata = kohya_metadata("sd1", rank=rank, alpha=alpha, name=path.stem, network_module="lycoris.kohya")
    metadata["ss_network_args"] = json.dumps({"algo": algo, "preset": "attn-mlp"})
    return write_safetensors(
        lycoris_state_dict(algo, rank=rank, alpha=alpha, seed=seed), path, metadata=metadata
    )


__all__ = [
    "DEFAULT_RANK",
    "TRIGGER_WORD",
    "LoraBase",
    "LycorisAlgo",
    "kohya_lora_state_dict",
    "kohya_metadata",
    "lycoris_state_dict",
    "save_kohya_lora",
    "save_lycoris",
    "save_peft_lora",
]
