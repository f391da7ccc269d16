"""A UNet's config from its shapes, in the LDM / SGM layout or the diffusers one."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from modelkeeper.formats.shape_configs.read import (
    Readers,
    Shapes,
    dim,
    first_dim,
    group_count,
    has,
    head_count,
    indices,
    ndim_of,
    one_or_list,
    per_level,
)


@dataclass
class _UNetLevels:
    """A UNet's structure as read from either layout."""

    widths: list[int]
    layers: int
    depths: list[int]  # transformer blocks per level (0: no attention)
    has_mid: bool
    mid_depth: int | None  # None: no attention in the mid block
    in_channels: int | None
    out_channels: int | None
    cross_attention_dim: int | None
    linear_projection: bool | None
    time_embed_dim: int | None
    added_embed_input: int | None


def _unet_fields(levels: _UNetLevels, base: Mapping[str, Any]) -> dict[str, Any]:
    count = len(levels.widths)
    out: dict[str, Any] = {
        "block_out_channels": levels.widths,
        "layers_per_block": levels.layers,
        "down_block_types": ["CrossAttnDownBlock2D" if d else "DownBlock2D" for d in levels.depths],
        "up_block_types": ["CrossAttnUpBlock2D" if d else "UpBlock2D" for d in reversed(levels.depths)],
    }
    depths = [d or 1 for d in levels.depths]  # levels without attention never read theirs
    if levels.mid_depth is not None:
        out["mid_block_type"] = "UNetMidBlock2DCrossAttn"
        depths[-1] = levels.mid_depth  # diffusers builds the mid block with the last level's depth
    elif not levels.has_mid:
        out["mid_block_type"] = None
    elif base.get("mid_block_type", "UNetMidBlock2DCrossAttn") == "UNetMidBlock2DCrossAttn":
        out["mid_block_type"] = "UNetMidBlock2D"
    out["transformer_layers_per_block"] = _fit_depths(depths, levels.depths, base)
    for field, value in (
        ("in_channels", levels.in_channels),
        ("out_channels", levels.out_channels),
        ("cross_attention_dim", levels.cross_attention_dim),
        ("use_linear_projection", levels.linear_projection),
    ):
        if value is not None:
            out[field] = value
    if levels.time_embed_dim is not None:
        default = levels.widths[0] * 4
        out["time_embedding_dim"] = None if levels.time_embed_dim == default else levels.time_embed_dim
    if levels.added_embed_input is not None:
        out["projection_class_embeddings_input_dim"] = levels.added_embed_input
        if base.get("addition_embed_type") is None and base.get("class_embed_type") is None:
            out["addition_embed_type"] = "text_time"  # SDXL's pooled text and size embedding
        if base.get("addition_time_embed_dim") is None:
            out["addition_time_embed_dim"] = 256  # each size is embedded 256 wide (SDXL, its refiner)
    # heads: diffusers reads the per-level head count from num_attention_heads, else (the legacy
    # name the published configs use) from attention_head_dim
    field = "num_attention_heads" if base.get("num_attention_heads") is not None else "attention_head_dim"
    given = base.get(field)
    known = per_level(given, count, 8)
    counts = [head_count(w, h) for w, h in zip(levels.widths, known, strict=True)]
    fits = known == counts and (not isinstance(given, list | tuple) or len(given) == count)
    out[field] = given if fits and given is not None else one_or_list(counts)
    out["norm_num_groups"] = group_count(levels.widths, int(base.get("norm_num_groups") or 32))
    return out


def _fit_depths(depths: list[int], read: list[int], base: Mapping[str, Any]) -> int | list[int]:
    """``transformer_layers_per_block`` for ``depths``; the given value kept when it builds the same
    blocks (its entries for levels without attention are never used)."""
    given = base.get("transformer_layers_per_block", 1)
    as_given = per_level(given, len(depths), 1)
    same = (
        all(g == d for g, d, r in zip(as_given, depths, read, strict=True) if r)
        and as_given[-1] == depths[-1]
    )
    if same and (not isinstance(given, list | tuple) or len(given) == len(depths)):
        return given  # type: ignore[no-any-return]
    return one_or_list(depths)


def _unet_diffusers(shapes: Shapes, base: Mapping[str, Any]) -> dict[str, Any]:
    levels = indices(shapes, "down_blocks.")
    if not levels or "conv_in.weight" not in shapes:
        return {}
    widths = [dim(shapes, f"down_blocks.{i}.resnets.0.conv1.weight", 0) or 0 for i in levels]
    layers = len(indices(shapes, "down_blocks.0.resnets."))
    depths = [len(indices(shapes, f"down_blocks.{i}.attentions.0.transformer_blocks.")) for i in levels]
    mid = indices(shapes, "mid_block.attentions.0.transformer_blocks.")
    proj = ndim_of(shapes, ".proj_in.weight")
    return _unet_fields(
        _UNetLevels(
            widths, layers, depths, has(shapes, "mid_block."), len(mid) if mid else None,
            dim(shapes, "conv_in.weight", 1), dim(shapes, "conv_out.weight", 0),
            first_dim(shapes, ".attn2.to_k.weight", 1), None if proj is None else proj == 2,
            dim(shapes, "time_embedding.linear_1.weight", 0), dim(shapes, "add_embedding.linear_1.weight", 1),
        ),
        base,
    )  # fmt: skip


def _unet_original(shapes: Shapes, base: Mapping[str, Any]) -> dict[str, Any]:
    """LDM / SGM names: ``input_blocks.N`` is conv_in (0), then per level its resnets (each with its
    attention at ``.1``) and a downsampler (``.0.op``) between levels."""
    if "input_blocks.0.0.weight" not in shapes:
        return {}
    widths: list[int] = []
    depths: list[int] = []
    per_level: list[int] = [0]
    for n in indices(shapes, "input_blocks."):
        if n == 0:
            continue
        if has(shapes, f"input_blocks.{n}.0.op."):
            per_level.append(0)
            continue
        if per_level[-1] == 0:
            widths.append(dim(shapes, f"input_blocks.{n}.0.out_layers.3.weight", 0) or 0)
            depths.append(len(indices(shapes, f"input_blocks.{n}.1.transformer_blocks.")))
        per_level[-1] += 1
    if not widths:
        return {}
    mid = indices(shapes, "middle_block.1.transformer_blocks.")
    proj = ndim_of(shapes, ".proj_in.weight")
    return _unet_fields(
        _UNetLevels(
            widths, per_level[0], depths, has(shapes, "middle_block."), len(mid) if mid else None,
            dim(shapes, "input_blocks.0.0.weight", 1), dim(shapes, "out.2.weight", 0),
            first_dim(shapes, ".attn2.to_k.weight", 1), None if proj is None else proj == 2,
            dim(shapes, "time_embed.0.weight", 0), dim(shapes, "label_emb.0.0.weight", 1),
        ),
        base,
    )  # fmt: skip


#: The class's defaults of the fields a published config may leave out (older UNet configs do).
UNET_DEFAULTS: dict[str, Any] = {
    "mid_block_type": "UNetMidBlock2DCrossAttn",
    "time_embedding_dim": None,
    "transformer_layers_per_block": 1,
    "use_linear_projection": False,
    "addition_embed_type": None,
}

READERS: Readers = {
    "unet/original": (_unet_original, UNET_DEFAULTS),
    "unet/diffusers": (_unet_diffusers, UNET_DEFAULTS),
}
