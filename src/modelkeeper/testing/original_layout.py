"""Diffusers -> original ("LDM"/SGM, OpenCLIP) key layout, the inverse of diffusers' single-file converters.

diffusers only converts original checkpoints to its own layout
(``diffusers.loaders.single_file_utils.convert_ldm_unet_checkpoint`` and friends). Published
single-file checkpoints (A1111, ComfyUI, the Stability releases) are in the original layout, so the
fixture factory writes it with these functions; the tests prove each one is the exact inverse of the
diffusers converter, tensor for tensor.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from typing import Any, cast

import torch
from diffusers.loaders.single_file_utils import DIFFUSERS_TO_LDM_MAPPING

from modelkeeper.formats.conventions import (
    LDM_TEXT_ENCODER_PREFIX,
    SGM_EMBEDDER_0_PREFIX,
    SGM_EMBEDDER_1_PREFIX,
)

StateDict = dict[str, torch.Tensor]

# Where each text encoder sits inside a full original-layout checkpoint: its component's prefix, then
# ``transformer.`` for transformers' CLIP names or ``model.`` for open_clip's.
SD1_CLIP_PREFIX = LDM_TEXT_ENCODER_PREFIX + "transformer."
SD2_OPENCLIP_PREFIX = LDM_TEXT_ENCODER_PREFIX + "model."
SDXL_CLIP_L_PREFIX = SGM_EMBEDDER_0_PREFIX + "transformer."
SDXL_CLIP_G_PREFIX = SGM_EMBEDDER_1_PREFIX + "model."
SDXL_REFINER_CLIP_G_PREFIX = SGM_EMBEDDER_0_PREFIX + "model."

# diffusers' own table of the renamed top-level tensors, so both directions read the same data.
_LDM_MAPPING = cast(dict[str, dict[str, Any]], DIFFUSERS_TO_LDM_MAPPING)
_UNET_DIRECT: dict[str, str] = {
    **_LDM_MAPPING["unet"]["layers"],
    **_LDM_MAPPING["unet"]["class_embed_type"],
    **_LDM_MAPPING["unet"]["addition_embed_type"],
}
_VAE_DIRECT: dict[str, str] = dict(_LDM_MAPPING["vae"])

_UNET_RESNET = {
    "norm1": "in_layers.0",
    "conv1": "in_layers.2",
    "time_emb_proj": "emb_layers.1",
    "norm2": "out_layers.0",
    "conv2": "out_layers.3",
    "conv_shortcut": "skip_connection",
}
_VAE_ATTENTION = {"group_norm": "norm", "to_q": "q", "to_k": "k", "to_v": "v", "to_out.0": "proj_out"}

_DOWN = re.compile(r"down_blocks\.(\d+)\.(resnets|attentions|downsamplers)\.(\d+)\.(.+)")
_MID = re.compile(r"mid_block\.(resnets|attentions)\.(\d+)\.(.+)")
_UP = re.compile(r"up_blocks\.(\d+)\.(resnets|attentions|upsamplers)\.(\d+)\.(.+)")


def _resnet(rest: str) -> str:
    name, _, tail = rest.partition(".")
    if name not in _UNET_RESNET:
        raise ValueError(f"unexpected UNet resnet tensor {rest!r}")
    return f"{_UNET_RESNET[name]}.{tail}"


def unet_key_to_original(key: str, config: Mapping[str, Any]) -> str:
    """One diffusers ``UNet2DConditionModel`` key in the LDM/SGM layout (``input_blocks.1.1...``)."""
    layers: int = config["layers_per_block"]
    if not isinstance(layers, int):
        raise ValueError("only an integer layers_per_block has an original layout")
    per_block = layers + 1
    if key in _UNET_DIRECT:
        return _UNET_DIRECT[key]
    if m := _DOWN.fullmatch(key):
        block, part, index, rest = int(m[1]), m[2], int(m[3]), m[4]
        if part == "downsamplers":
            return f"input_blocks.{(block + 1) * per_block}.0.op.{rest.removeprefix('conv.')}"
        slot = "0." + _resnet(rest) if part == "resnets" else "1." + rest
        return f"input_blocks.{1 + block * per_block + index}.{slot}"
    if m := _MID.fullmatch(key):
        part, index, rest = m[1], int(m[2]), m[3]
        if part == "attentions":
            return f"middle_block.1.{rest}"
        return f"middle_block.{2 * index}.{_resnet(rest)}"
    if m := _UP.fullmatch(key):
        block, part, index, rest = int(m[1]), m[2], int(m[3]), m[4]
        if part == "upsamplers":
            # The upsampler follows the block's last resnet, and its attention when it has one.
            after = 2 if "CrossAttn" in config["up_block_types"][block] else 1
            return f"output_blocks.{block * per_block + layers}.{after}.{rest}"
        slot = "0." + _resnet(rest) if part == "resnets" else "1." + rest
        return f"output_blocks.{block * per_block + index}.{slot}"
    raise ValueError(f"no original-layout name for UNet tensor {key!r}")


def unet_to_original(
    state_dict: Mapping[str, torch.Tensor], config: Mapping[str, Any], *, prefix: str = ""
) -> StateDict:
    """A diffusers UNet state dict in the LDM/SGM layout; ``prefix`` is usually ``model.diffusion_model.``."""
    return {prefix + unet_key_to_original(key, config): tensor for key, tensor in state_dict.items()}


def vae_key_to_original(key: str, num_up_blocks: int) -> str:
    """One diffusers ``AutoencoderKL`` key in the LDM layout (``encoder.down.0.block.0...``), no prefix."""
    if key in _VAE_DIRECT:
        return _VAE_DIRECT[key]
    if m := re.fullmatch(r"encoder\.down_blocks\.(\d+)\.resnets\.(\d+)\.(.+)", key):
        return f"encoder.down.{m[1]}.block.{m[2]}.{m[3].replace('conv_shortcut', 'nin_shortcut')}"
    if m := re.fullmatch(r"encoder\.down_blocks\.(\d+)\.downsamplers\.0\.(.+)", key):
        return f"encoder.down.{m[1]}.downsample.{m[2]}"
    if m := re.fullmatch(r"decoder\.up_blocks\.(\d+)\.resnets\.(\d+)\.(.+)", key):
        # The decoder's levels run the other way round in the original layout.
        level = num_up_blocks - 1 - int(m[1])
        return f"decoder.up.{level}.block.{m[2]}.{m[3].replace('conv_shortcut', 'nin_shortcut')}"
    if m := re.fullmatch(r"decoder\.up_blocks\.(\d+)\.upsamplers\.0\.(.+)", key):
        return f"decoder.up.{num_up_blocks - 1 - int(m[1])}.upsample.{m[2]}"
    if m := re.fullmatch(r"(encoder|decoder)\.mid_block\.resnets\.(\d+)\.(.+)", key):
        return f"{m[1]}.mid.block_{int(m[2]) + 1}.{m[3].replace('conv_shortcut', 'nin_shortcut')}"
    m = re.fullmatch(r"(encoder|decoder)\.mid_block\.attentions\.0\.(.+)\.(weight|bias)", key)
    if m and m[2] in _VAE_ATTENTION:
        return f"{m[1]}.mid.attn_1.{_VAE_ATTENTION[m[2]]}.{m[3]}"
    raise ValueError(f"no original-layout name for VAE tensor {key!r}")


def vae_to_original(
    state_dict: Mapping[str, torch.Tensor], config: Mapping[str, Any], *, prefix: str = ""
) -> StateDict:
    """A diffusers VAE state dict in the LDM layout; ``prefix`` is usually ``first_stage_model.`` or empty.

    The mid-block attention projections become 1x1 convolutions, as in the original model.
    """
    num_up = len(config["up_block_types"])
    out: StateDict = {}
    for key, tensor in state_dict.items():
        name = vae_key_to_original(key, num_up)
        conv_1x1 = ".mid.attn_1." in name and name.endswith(".weight") and tensor.ndim == 2
        out[prefix + name] = tensor.reshape(*tensor.shape, 1, 1) if conv_1x1 else tensor
    return out


def clip_to_original(state_dict: Mapping[str, torch.Tensor], *, prefix: str = SD1_CLIP_PREFIX) -> StateDict:
    """A Hugging Face CLIP text model (``text_model.*`` keys) under an original checkpoint's prefix.

    SD1 checkpoints use ``cond_stage_model.transformer.``, SDXL ``conditioner.embedders.0.transformer.``.
    """
    out: StateDict = {}
    for key, tensor in state_dict.items():
        if not key.startswith("text_model."):
            raise ValueError(f"not a CLIP text model tensor: {key!r}")
        out[prefix + key] = tensor
    return out


_OPENCLIP_DIRECT = {
    "text_model.embeddings.token_embedding.weight": "token_embedding.weight",
    "text_model.embeddings.position_embedding.weight": "positional_embedding",
    "text_model.final_layer_norm.weight": "ln_final.weight",
    "text_model.final_layer_norm.bias": "ln_final.bias",
}
_OPENCLIP_LAYER = {
    "self_attn.out_proj": "attn.out_proj",
    "layer_norm1": "ln_1",
    "layer_norm2": "ln_2",
    "mlp.fc1": "mlp.c_fc",
    "mlp.fc2": "mlp.c_proj",
}
_HF_LAYER = re.compile(r"text_model\.encoder\.layers\.(\d+)\.(.+)\.(weight|bias)")


def clip_to_openclip(
    state_dict: Mapping[str, torch.Tensor], *, prefix: str = SDXL_CLIP_G_PREFIX
) -> StateDict:
    """A Hugging Face CLIP text model in the OpenCLIP layout (SDXL's CLIP-G, SD2's CLIP-H).

    q, k and v join into one ``attn.in_proj_weight`` / ``in_proj_bias``; ``text_projection`` is stored
    transposed (OpenCLIP multiplies ``x @ text_projection``).
    """
    out: StateDict = {}
    qkv: dict[tuple[str, str], dict[str, torch.Tensor]] = {}
    for key, tensor in state_dict.items():
        if key in _OPENCLIP_DIRECT:
            out[prefix + _OPENCLIP_DIRECT[key]] = tensor
        elif key == "text_projection.weight":
            out[prefix + "text_projection"] = tensor.T.contiguous()
        elif m := _HF_LAYER.fullmatch(key):
            layer, module, kind = m[1], m[2], m[3]
            block = f"{prefix}transformer.resblocks.{layer}."
            if qk := re.fullmatch(r"self_attn\.([qkv])_proj", module):
                qkv.setdefault((block, kind), {})[qk[1]] = tensor
            elif module in _OPENCLIP_LAYER:
                out[f"{block}{_OPENCLIP_LAYER[module]}.{kind}"] = tensor
            else:
                raise ValueError(f"no OpenCLIP name for CLIP tensor {key!r}")
        else:
            raise ValueError(f"no OpenCLIP name for CLIP tensor {key!r}")
    for (block, kind), parts in qkv.items():
        if sorted(parts) != ["k", "q", "v"]:
            raise ValueError(f"{block}: attention needs q, k and v projections, got {sorted(parts)}")
        out[f"{block}attn.in_proj_{kind}"] = torch.cat([parts["q"], parts["k"], parts["v"]], dim=0)
    return out


__all__ = [
    "SD1_CLIP_PREFIX",
    "SD2_OPENCLIP_PREFIX",
    "SDXL_CLIP_G_PREFIX",
    "SDXL_CLIP_L_PREFIX",
    "SDXL_REFINER_CLIP_G_PREFIX",
    "StateDict",
    "clip_to_openclip",
    "clip_to_original",
    "unet_key_to_original",
    "unet_to_original",
    "vae_key_to_original",
    "vae_to_original",
]
