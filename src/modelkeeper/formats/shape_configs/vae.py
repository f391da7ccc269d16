"""A VAE's (``AutoencoderKL``) config from its shapes, in the LDM layout or the diffusers one."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from modelkeeper.formats.shape_configs.read import Readers, Shapes, dim, group_count, has, indices


def _vae_fields(
    shapes: Shapes,
    base: Mapping[str, Any],
    widths: list[int],
    layers: int,
    names: dict[str, str],
    mid_attention: bool,
) -> dict[str, Any]:
    out: dict[str, Any] = {
        "block_out_channels": widths,
        "layers_per_block": layers,
        "down_block_types": ["DownEncoderBlock2D"] * len(widths),
        "up_block_types": ["UpDecoderBlock2D"] * len(widths),
        "norm_num_groups": group_count(widths, int(base.get("norm_num_groups") or 32)),
    }
    for field, (key, axis) in (
        ("in_channels", (names["conv_in"], 1)),
        ("out_channels", (names["conv_out"], 0)),
        ("latent_channels", (names["latent"], 1)),
    ):
        value = dim(shapes, key, axis)
        if value is not None:
            out[field] = value
    # absent from the published configs means "yes": only a file without them says otherwise
    if base.get("use_quant_conv", True) != ("quant_conv.weight" in shapes):
        out["use_quant_conv"] = "quant_conv.weight" in shapes
    if base.get("use_post_quant_conv", True) != ("post_quant_conv.weight" in shapes):
        out["use_post_quant_conv"] = "post_quant_conv.weight" in shapes
    if base.get("mid_block_add_attention", True) != mid_attention:
        out["mid_block_add_attention"] = mid_attention
    return out


def _vae_diffusers(shapes: Shapes, base: Mapping[str, Any]) -> dict[str, Any]:
    levels = indices(shapes, "encoder.down_blocks.")
    if not levels:
        return {}
    widths = [dim(shapes, f"encoder.down_blocks.{i}.resnets.0.conv1.weight", 0) or 0 for i in levels]
    layers = len(indices(shapes, "encoder.down_blocks.0.resnets."))
    names = {"conv_in": "encoder.conv_in.weight", "conv_out": "decoder.conv_out.weight",
             "latent": "decoder.conv_in.weight"}  # fmt: skip
    return _vae_fields(shapes, base, widths, layers, names, has(shapes, "encoder.mid_block.attentions."))


def _vae_original(shapes: Shapes, base: Mapping[str, Any]) -> dict[str, Any]:
    levels = indices(shapes, "encoder.down.")
    if not levels:
        return {}
    widths = [dim(shapes, f"encoder.down.{i}.block.0.conv1.weight", 0) or 0 for i in levels]
    layers = len(indices(shapes, "encoder.down.0.block."))
    names = {"conv_in": "encoder.conv_in.weight", "conv_out": "decoder.conv_out.weight",
             "latent": "decoder.conv_in.weight"}  # fmt: skip
    return _vae_fields(shapes, base, widths, layers, names, has(shapes, "encoder.mid.attn_1."))


READERS: Readers = {"vae/original": (_vae_original, {}), "vae/diffusers": (_vae_diffusers, {})}
