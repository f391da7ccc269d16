"""Parsed LoRA layers resolved to the weights of the target modules: by dotted or flattened (kohya)
name, sd-scripts' SGM names mapped to diffusers' UNet, sd-scripts / BFL Flux names to diffusers'
transformer (fused layers split by rows); layers whose shapes do not fit are refused. A weight kept
packed (fp8, GGUF: :mod:`modelkeeper.worker.storage`) is matched by its logical shape."""

from __future__ import annotations

import math
import re
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import torch

from modelkeeper.protocol.errors import ErrorCode
from modelkeeper.worker import storage
from modelkeeper.worker.errors import WorkerError
from modelkeeper.worker.lora.parse import DENOISER, Layer

PATCHABLE = (torch.nn.Linear, torch.nn.Conv1d, torch.nn.Conv2d, torch.nn.Conv3d)


class LoraIncompatible(WorkerError):
    """The LoRA does not fit the modules it was given: none of its keys names a layer of them, or
    the layers it names have other shapes (a LoRA made for another base, an SDXL LoRA on an SD1
    UNet). Nothing was changed. ``details`` carries ``mismatched`` / ``unmatched`` examples."""

    code = ErrorCode.INVALID_REQUEST


@dataclass(frozen=True, eq=False)
class Match:
    """``layer`` (rows ``src`` of its delta) patches rows ``dst`` of ``param`` of target ``role``;
    ``packed``: the weight is stored packed (its delta is added as the layer runs)."""

    layer: Layer
    role: str
    module: str
    param: torch.Tensor
    src: slice | None = None
    dst: slice | None = None
    packed: bool = False


_SGM_RENAMES = (
    (r"^input_blocks_0_0$", "conv_in"),
    (r"^out_2$", "conv_out"),
    (r"^input_blocks_", "down_blocks_"),
    (r"^middle_block_", "mid_block_"),
    (r"^output_blocks_", "up_blocks_"),
    (r"^time_embed_0$", "time_embedding_linear_1"),
    (r"^time_embed_2$", "time_embedding_linear_2"),
    (r"^label_emb_0_0$", "add_embedding_linear_1"),
    (r"^label_emb_0_2$", "add_embedding_linear_2"),
    (r"_in_layers_2$", "_conv1"),
    (r"_out_layers_3$", "_conv2"),
    (r"_emb_layers_1$", "_time_emb_proj"),
    (r"_skip_connection$", "_conv_shortcut"),
    (r"_op$", "_conv"),
)
_DB, _SB = "transformer_blocks.{}.", "single_transformer_blocks.{}."
#: sd-scripts / BFL Flux layer names -> diffusers FluxTransformer2DModel modules (fused ones split by rows).
FLUX_RULES: tuple[tuple[str, tuple[str, ...]], ...] = (
    (r"double_blocks_(\d+)_img_attn_qkv", (_DB + "attn.to_q", _DB + "attn.to_k", _DB + "attn.to_v")),
    (r"double_blocks_(\d+)_txt_attn_qkv", (_DB + "attn.add_q_proj", _DB + "attn.add_k_proj", _DB + "attn.add_v_proj")),
    (r"double_blocks_(\d+)_img_attn_proj", (_DB + "attn.to_out.0",)),
    (r"double_blocks_(\d+)_txt_attn_proj", (_DB + "attn.to_add_out",)),
    (r"double_blocks_(\d+)_img_mlp_0", (_DB + "ff.net.0.proj",)), (r"double_blocks_(\d+)_img_mlp_2", (_DB + "ff.net.2",)),
    (r"double_blocks_(\d+)_txt_mlp_0", (_DB + "ff_context.net.0.proj",)),
    (r"double_blocks_(\d+)_txt_mlp_2", (_DB + "ff_context.net.2",)),
    (r"double_blocks_(\d+)_img_mod_lin", (_DB + "norm1.linear",)),
    (r"double_blocks_(\d+)_txt_mod_lin", (_DB + "norm1_context.linear",)),
    (r"single_blocks_(\d+)_linear1", (_SB + "attn.to_q", _SB + "attn.to_k", _SB + "attn.to_v", _SB + "proj_mlp")),
    (r"single_blocks_(\d+)_linear2", (_SB + "proj_out",)), (r"single_blocks_(\d+)_modulation_lin", (_SB + "norm.linear",)),
    (r"img_in", ("x_embedder",)), (r"txt_in", ("context_embedder",)), (r"final_layer_linear", ("proj_out",)),
    (r"time_in_in_layer", ("time_text_embed.timestep_embedder.linear_1",)),
    (r"time_in_out_layer", ("time_text_embed.timestep_embedder.linear_2",)),
    (r"vector_in_in_layer", ("time_text_embed.text_embedder.linear_1",)),
    (r"vector_in_out_layer", ("time_text_embed.text_embedder.linear_2",)),
    (r"guidance_in_in_layer", ("time_text_embed.guidance_embedder.linear_1",)),
    (r"guidance_in_out_layer", ("time_text_embed.guidance_embedder.linear_2",)),
    (r"final_layer_adaLN_modulation_1", ("norm_out.linear", "swap")),  # BFL (shift, scale) -> (scale, shift)
)  # fmt: skip


class _Index:
    """The patchable layers of a target module by dotted and by flattened (kohya) name."""

    def __init__(self, module: torch.nn.Module) -> None:
        self.module = module
        self.dotted: dict[str, str] = {}
        self.flat: dict[str, str] = {}
        for name, sub in module.named_modules():
            if isinstance(sub, PATCHABLE):
                other = (
                    name.removeprefix("text_model.")
                    if name.startswith("text_model.")
                    else "text_model." + name
                )
                for alias in (name, other):
                    self.dotted.setdefault(alias, name)
                    self.flat.setdefault(alias.replace(".", "_"), name)
        config = getattr(module, "config", None)
        self.unet_config = config if hasattr(config, "layers_per_block") else None
        self.flux = hasattr(module, "single_transformer_blocks")
        self.logical = storage.logical_shapes(module)  # packed weights: the shapes they stand for

    def weight(self, name: str) -> torch.Tensor:
        weight = self.module.get_submodule(name).weight
        assert isinstance(weight, torch.Tensor)
        return weight

    def shape(self, name: str) -> tuple[int, ...]:
        """The logical shape of layer ``name``'s weight (a GGUF weight is stored as bytes)."""
        return self.logical.get(f"{name}.weight") or tuple(self.weight(name).shape)

    def packed(self, name: str) -> bool:
        return f"{name}.weight" in self.logical

    def find(self, name: str) -> str | None:
        return self.dotted.get(name) or self.flat.get(name.replace(".", "_"))

    def locate(self, name: str) -> list[tuple[str, slice | None, slice | None]]:
        """Target modules of a source layer, with row slices for fused (split) layers."""
        found = self.find(name)
        if found:
            return [(found, None, None)]
        flat = name.replace(".", "_")
        if self.unet_config is not None:
            found = self.find(_sgm_to_diffusers(flat, self.unet_config))
            return [(found, None, None)] if found else []
        if self.flux:
            for pattern, modules in FLUX_RULES:
                hit = re.fullmatch(pattern, flat)
                if hit:
                    return self._split([m.format(*hit.groups()) for m in modules])
        return []

    def _split(self, modules: list[str]) -> list[tuple[str, slice | None, slice | None]]:
        names = [self.find(m) for m in modules if m != "swap"]
        if any(n is None for n in names):
            return []
        rows = [self.shape(str(n))[0] for n in names]
        if modules[-1] == "swap":
            half = rows[0] // 2
            return [
                (str(names[0]), slice(half, 2 * half), slice(0, half)),
                (str(names[0]), slice(0, half), slice(half, 2 * half)),
            ]
        if len(names) == 1:
            return [(str(names[0]), None, None)]
        starts = [sum(rows[:i]) for i in range(len(rows))]
        return [(str(n), slice(s, s + r), None) for n, s, r in zip(names, starts, rows, strict=True)]


def _sgm_to_diffusers(flat: str, config: Any) -> str:
    """sd-scripts' SGM UNet names (SDXL) -> diffusers names: diffusers' block mapping, then the
    layer renames inside blocks."""
    from diffusers.loaders.lora_conversion_utils import _maybe_map_sgm_blocks_to_diffusers

    name = flat
    if re.match(r"(input_blocks_\d+_\d+|middle_block_\d+|output_blocks_\d+_\d+)_", flat) and not (
        flat.startswith("input_blocks_0_0")
    ):
        try:
            (key,) = _maybe_map_sgm_blocks_to_diffusers({f"lora_unet_{flat}.w": 0}, config)
        except (ValueError, IndexError, KeyError):
            return flat
        name = key[len("lora_unet_") : -len(".w")]
    for pattern, replacement in _SGM_RENAMES:
        name = re.sub(pattern, replacement, name)
    return name


def _target_role(role: str, targets: Mapping[str, torch.nn.Module]) -> str | None:
    if role in targets:
        return role
    if role in DENOISER or (role == "" and len(targets) > 1):
        return next((r for r in DENOISER if r in targets), None)
    return next(iter(targets)) if role == "" else None


def resolve(
    layers: list[Layer], targets: Mapping[str, torch.nn.Module]
) -> tuple[list[Match], list[str], set[str], list[str]]:
    """Match layers to the targets' weights: ``(matches, unmatched keys, roles without a target,
    shape mismatches)``."""
    indexes: dict[str, _Index] = {}
    matches: list[Match] = []
    unmatched: list[str] = []
    skipped: set[str] = set()
    mismatched: list[str] = []
    for layer in layers:
        role = _target_role(layer.role, targets)
        if role is None:
            skipped.add(layer.role or "(no prefix)")
            continue
        index = indexes.get(role) or indexes.setdefault(role, _Index(targets[role]))
        located = index.locate(layer.name)
        if not located:
            unmatched.extend(layer.keys)
        for module, src, dst in located:
            param, packed = index.weight(module), index.packed(module)
            problem = _misfit(
                layer.factors.shape, index.shape(module), None if packed else param.dtype, src, dst
            )
            if problem:
                mismatched.append(f"{layer.keys[0]} -> {role}.{module}: {problem}")
            else:
                matches.append(Match(layer, role, module, param, src, dst, packed))
    return matches, unmatched, skipped, mismatched


def _misfit(
    shape: tuple[int, ...],
    target: tuple[int, ...],
    dtype: torch.dtype | None,
    src: slice | None,
    dst: slice | None,
) -> str | None:
    """Why a delta of ``shape`` cannot patch a weight of ``target`` shape and ``dtype`` (None: a
    packed weight, decoded to its compute dtype as it runs), or None when it can."""
    if dtype is not None and dtype not in (torch.float32, torch.float16, torch.bfloat16):
        return f"weights of dtype {dtype} cannot be patched"
    rows = (src.stop - src.start) if src else shape[0]
    target_rows = (dst.stop - dst.start) if dst else target[0]
    cols, target_cols = math.prod(shape[1:]), math.prod(target[1:])
    kernel_differs = len(shape) > 2 and len(target) > 2 and shape[2:] != target[2:]
    if rows != target_rows or cols != target_cols or kernel_differs or (src and src.stop > shape[0]):
        return f"delta {shape} vs weight {target}"
    return None


def refuse_unfit(
    label: str,
    layers: list[Layer],
    matches: list[Match],
    unmatched: list[str],
    mismatched: list[str],
    targets: Mapping[str, torch.nn.Module],
    min_match: float,
) -> None:
    given = ", ".join(f"{role}={type(module).__name__}" for role, module in targets.items())
    if mismatched:
        raise LoraIncompatible(
            f"{label}: {len(mismatched)} layer(s) do not fit the modules given ({given}); the LoRA is for "
            f"another base model: {'; '.join(mismatched[:3])}",
            mismatched=mismatched[:20],
        )
    if not matches:
        roles = ", ".join(sorted({layer.role or "(no prefix)" for layer in layers}))
        example = ", ".join(unmatched[:3]) or layers[0].keys[0]
        raise LoraIncompatible(
            f"{label}: none of its {len(layers)} layers (roles: {roles}) matches a layer of the modules given "
            f"({given}); e.g. {example}",
            unmatched=unmatched[:20],
        )
    matched = sum(len(layer.keys) for layer in {id(m.layer): m.layer for m in matches}.values())
    if unmatched and matched < min_match * (matched + len(unmatched)):
        raise LoraIncompatible(
            f"{label}: only {matched} of {matched + len(unmatched)} keys match a layer of the modules given "
            f"({given}; at least {min_match:.0%} must): {', '.join(unmatched[:3])} ...",
            unmatched=unmatched[:20],
        )
