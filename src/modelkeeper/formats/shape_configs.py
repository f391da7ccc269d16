"""The config a single file's tensor shapes imply, over the known config of its base.

A single file carries no config unless it was written with one (``modelkeeper.config`` metadata);
the registry then names the known config of the file's base (``sdxl/unet``). That is right for the
published files, and wrong for pruned or shrunk variants of them (fewer levels, fewer layers per
level, shallower attention, another width): their shapes do not fit it. ``fit_config`` reads the
architecture from the shapes of the file's tensors (keys relative to the component's prefix, in the
layout the worker detected) and writes it over the given config: the fields shapes decide are
replaced, every other field (schedules, activations, scaling factors) is kept. A file that fits
its config gets it back unchanged.

What shapes decide, per layout (the names of the worker's layout rules, ``worker.convert``):

- UNet (``unet/original``, ``unet/diffusers``): levels and their widths (``block_out_channels``), the
  block types (attention or not per level), ``layers_per_block``, ``transformer_layers_per_block``,
  the mid block, ``in_channels``, ``out_channels``, ``cross_attention_dim``, ``use_linear_projection``,
  the time embedding width and the added (SDXL) embedding's input width.
- VAE (``vae/original``, ``vae/diffusers``): levels and widths, ``layers_per_block``, ``in_channels``,
  ``out_channels``, ``latent_channels``, the quant convolutions, the mid block's attention.
- CLIP (``clip/transformers``, ``clip/openclip``): ``hidden_size``, ``intermediate_size``,
  ``num_hidden_layers``, ``max_position_embeddings``, ``vocab_size``, ``projection_dim``.
- T5 (``t5/transformers``): ``d_model``, ``num_layers``, ``num_heads`` (from the relative attention
  bias), ``d_kv``, ``d_ff``, ``vocab_size``, the relative attention buckets, gated or plain MLP.
- Flux and SD3 transformers (``transformer/diffusers``, ``flux/original``, ``sd3/original``): the
  class, the number of (single) blocks, the width as heads of the query norm's width (Flux, SD 3.5;
  else the config's head width), in and out channels, the patch, the text and pooled widths, the
  guidance embedding (Flux), the position grid, the query norm and the blocks with a second
  attention (SD 3.5). A Flux with fewer blocks (Flux lite) or an SD 3.5 Large loads with its base's
  known config fitted to its shapes.

What shapes cannot decide is kept from the config, and made consistent with the widths where the
kept value cannot build them: a number of attention heads that does not divide a width becomes one
of 64-wide heads (the width of every Stable Diffusion model), else the largest that divides it;
``norm_num_groups`` that does not divide every width becomes the largest divisor that does.
"""

from __future__ import annotations

import math
import re
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

__all__ = ["SHAPE_LAYOUTS", "Fitted", "fit_config"]

Shapes = Mapping[str, Sequence[int]]
Reader = Callable[[Shapes, Mapping[str, Any]], dict[str, Any]]

#: Heads of Stable Diffusion's attention are 64 wide (UNets and CLIP alike).
HEAD_WIDTH = 64


@dataclass(frozen=True)
class Fitted:
    """``config`` fitted to a file's shapes; ``changed`` names the fields that differ from the
    config given (empty when it fitted as it was)."""

    config: dict[str, Any]
    changed: tuple[str, ...]


def fit_config(layout: str, shapes: Shapes, config: Mapping[str, Any] | None) -> Fitted:
    """``config`` (``None``: none known) with the fields ``shapes`` decide read from them.

    ``layout`` is a layout rule's name (``SHAPE_LAYOUTS``; any other is returned unchanged) and
    ``shapes`` maps the component's keys, its prefix removed, to their shapes. Shapes that lack
    the keys a field is read from leave that field as it was: the load's own checks name what is
    wrong with such a file.
    """
    base = dict(config or {})
    if layout not in _READERS:
        return Fitted(base, ())
    reader, defaults = _READERS[layout]
    found = reader(shapes, base)
    changed = tuple(
        sorted(k for k, v in found.items() if _plain(base.get(k, defaults.get(k, _MISSING))) != _plain(v))
    )
    return Fitted({**base, **{k: found[k] for k in changed}}, changed)


_MISSING = object()

#: The class's defaults of the fields a published config may leave out (older UNet configs do).
_UNET_DEFAULTS: dict[str, Any] = {
    "mid_block_type": "UNetMidBlock2DCrossAttn",
    "time_embedding_dim": None,
    "transformer_layers_per_block": 1,
    "use_linear_projection": False,
    "addition_embed_type": None,
}


def _plain(value: Any) -> Any:
    """JSON's view of a value: tuples and lists compare equal."""
    if isinstance(value, list | tuple):
        return [_plain(v) for v in value]
    return value


# ------------------------------------------------------------------------------------------ helpers


def _indices(shapes: Shapes, prefix: str) -> list[int]:
    """The distinct numbers right after ``prefix`` in the keys (``down_blocks.`` -> 0, 1, 2)."""
    pattern = re.compile(re.escape(prefix) + r"(\d+)\.")
    return sorted({int(m.group(1)) for k in shapes if (m := pattern.match(k))})


def _has(shapes: Shapes, prefix: str) -> bool:
    return any(k.startswith(prefix) for k in shapes)


def _dim(shapes: Shapes, key: str, axis: int) -> int | None:
    shape = shapes.get(key)
    return int(shape[axis]) if shape is not None and len(shape) > axis else None


def _first_dim(shapes: Shapes, suffix: str, axis: int) -> int | None:
    """``axis`` of the first key (in sorted order) ending with ``suffix``."""
    for key in sorted(shapes):
        if key.endswith(suffix):
            return _dim(shapes, key, axis)
    return None


def _one_or_list(values: Sequence[int]) -> int | list[int]:
    return values[0] if len(set(values)) == 1 else list(values)


def _per_level(value: Any, levels: int, default: int) -> list[int]:
    """A per-level setting as a list of ``levels`` (an int repeated; a list cut or padded with its last)."""
    if isinstance(value, int):
        return [value] * levels
    if isinstance(value, list | tuple) and value:
        items = [int(v) for v in value]
        return (items + [items[-1]] * levels)[:levels]
    return [default] * levels


def _heads(width: int, known: int) -> int:
    """``known`` when it divides ``width``, else 64-wide heads, else the largest count that divides it."""
    if known > 0 and width % known == 0:
        return known
    if width % HEAD_WIDTH == 0:
        return width // HEAD_WIDTH
    return max(d for d in range(1, min(known, width) + 1) if width % d == 0) if known > 0 else 1


def _groups(widths: Sequence[int], known: int) -> int:
    """``known`` when it divides every width, else the largest divisor of all of them below it."""
    common = math.gcd(*widths)
    if known > 0 and common % known == 0:
        return known
    return max(d for d in range(1, max(1, min(known, common)) + 1) if common % d == 0)


# -------------------------------------------------------------------------------------------- UNets


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
    known = _per_level(given, count, 8)
    heads = [_heads(w, h) for w, h in zip(levels.widths, known, strict=True)]
    fits = known == heads and (not isinstance(given, list | tuple) or len(given) == count)
    out[field] = given if fits and given is not None else _one_or_list(heads)
    out["norm_num_groups"] = _groups(levels.widths, int(base.get("norm_num_groups") or 32))
    return out


def _fit_depths(depths: list[int], read: list[int], base: Mapping[str, Any]) -> int | list[int]:
    """``transformer_layers_per_block`` for ``depths``; the given value kept when it builds the same
    blocks (its entries for levels without attention are never used)."""
    given = base.get("transformer_layers_per_block", 1)
    as_given = _per_level(given, len(depths), 1)
    same = (
        all(g == d for g, d, r in zip(as_given, depths, read, strict=True) if r)
        and as_given[-1] == depths[-1]
    )
    if same and (not isinstance(given, list | tuple) or len(given) == len(depths)):
        return given  # type: ignore[no-any-return]
    return _one_or_list(depths)


def _unet_diffusers(shapes: Shapes, base: Mapping[str, Any]) -> dict[str, Any]:
    levels = _indices(shapes, "down_blocks.")
    if not levels or "conv_in.weight" not in shapes:
        return {}
    widths = [_dim(shapes, f"down_blocks.{i}.resnets.0.conv1.weight", 0) or 0 for i in levels]
    layers = len(_indices(shapes, "down_blocks.0.resnets."))
    depths = [len(_indices(shapes, f"down_blocks.{i}.attentions.0.transformer_blocks.")) for i in levels]
    mid = _indices(shapes, "mid_block.attentions.0.transformer_blocks.")
    proj = _first_dim_count(shapes, ".proj_in.weight")
    return _unet_fields(
        _UNetLevels(
            widths, layers, depths, _has(shapes, "mid_block."), len(mid) if mid else None,
            _dim(shapes, "conv_in.weight", 1), _dim(shapes, "conv_out.weight", 0),
            _first_dim(shapes, ".attn2.to_k.weight", 1), None if proj is None else proj == 2,
            _dim(shapes, "time_embedding.linear_1.weight", 0), _dim(shapes, "add_embedding.linear_1.weight", 1),
        ),
        base,
    )  # fmt: skip


def _first_dim_count(shapes: Shapes, suffix: str) -> int | None:
    """How many dimensions the first key ending with ``suffix`` has."""
    for key in sorted(shapes):
        if key.endswith(suffix):
            return len(shapes[key])
    return None


def _unet_original(shapes: Shapes, base: Mapping[str, Any]) -> dict[str, Any]:
    """LDM / SGM names: ``input_blocks.N`` is conv_in (0), then per level its resnets (each with its
    attention at ``.1``) and a downsampler (``.0.op``) between levels."""
    if "input_blocks.0.0.weight" not in shapes:
        return {}
    widths: list[int] = []
    depths: list[int] = []
    per_level: list[int] = [0]
    for n in _indices(shapes, "input_blocks."):
        if n == 0:
            continue
        if _has(shapes, f"input_blocks.{n}.0.op."):
            per_level.append(0)
            continue
        if per_level[-1] == 0:
            widths.append(_dim(shapes, f"input_blocks.{n}.0.out_layers.3.weight", 0) or 0)
            depths.append(len(_indices(shapes, f"input_blocks.{n}.1.transformer_blocks.")))
        per_level[-1] += 1
    if not widths:
        return {}
    mid = _indices(shapes, "middle_block.1.transformer_blocks.")
    proj = _first_dim_count(shapes, ".proj_in.weight")
    return _unet_fields(
        _UNetLevels(
            widths, per_level[0], depths, _has(shapes, "middle_block."), len(mid) if mid else None,
            _dim(shapes, "input_blocks.0.0.weight", 1), _dim(shapes, "out.2.weight", 0),
            _first_dim(shapes, ".attn2.to_k.weight", 1), None if proj is None else proj == 2,
            _dim(shapes, "time_embed.0.weight", 0), _dim(shapes, "label_emb.0.0.weight", 1),
        ),
        base,
    )  # fmt: skip


# --------------------------------------------------------------------------------------------- VAEs


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
        "norm_num_groups": _groups(widths, int(base.get("norm_num_groups") or 32)),
    }
    for field, (key, axis) in (
        ("in_channels", (names["conv_in"], 1)),
        ("out_channels", (names["conv_out"], 0)),
        ("latent_channels", (names["latent"], 1)),
    ):
        value = _dim(shapes, key, axis)
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
    levels = _indices(shapes, "encoder.down_blocks.")
    if not levels:
        return {}
    widths = [_dim(shapes, f"encoder.down_blocks.{i}.resnets.0.conv1.weight", 0) or 0 for i in levels]
    layers = len(_indices(shapes, "encoder.down_blocks.0.resnets."))
    names = {"conv_in": "encoder.conv_in.weight", "conv_out": "decoder.conv_out.weight",
             "latent": "decoder.conv_in.weight"}  # fmt: skip
    return _vae_fields(shapes, base, widths, layers, names, _has(shapes, "encoder.mid_block.attentions."))


def _vae_original(shapes: Shapes, base: Mapping[str, Any]) -> dict[str, Any]:
    levels = _indices(shapes, "encoder.down.")
    if not levels:
        return {}
    widths = [_dim(shapes, f"encoder.down.{i}.block.0.conv1.weight", 0) or 0 for i in levels]
    layers = len(_indices(shapes, "encoder.down.0.block."))
    names = {"conv_in": "encoder.conv_in.weight", "conv_out": "decoder.conv_out.weight",
             "latent": "decoder.conv_in.weight"}  # fmt: skip
    return _vae_fields(shapes, base, widths, layers, names, _has(shapes, "encoder.mid.attn_1."))


# ---------------------------------------------------------------------------------- text encoders


def _clip_fields(
    base: Mapping[str, Any],
    *,
    vocab: Sequence[int] | None,
    positions: Sequence[int] | None,
    layers: int,
    inner: int | None,
    projection: int | None,
) -> dict[str, Any]:
    if vocab is None:
        return {}
    hidden = int(vocab[1])
    out: dict[str, Any] = {"vocab_size": int(vocab[0]), "hidden_size": hidden, "num_hidden_layers": layers,
                           "model_type": base.get("model_type") or "clip_text_model"}  # fmt: skip
    if positions is not None:
        out["max_position_embeddings"] = int(positions[0])
    if inner is not None:
        out["intermediate_size"] = inner
    if projection is not None:
        out["projection_dim"] = projection
    out["num_attention_heads"] = _heads(hidden, int(base.get("num_attention_heads") or hidden // HEAD_WIDTH))
    return out


def _clip_transformers(shapes: Shapes, base: Mapping[str, Any]) -> dict[str, Any]:
    return _clip_fields(
        base,
        vocab=shapes.get("text_model.embeddings.token_embedding.weight"),
        positions=shapes.get("text_model.embeddings.position_embedding.weight"),
        layers=len(_indices(shapes, "text_model.encoder.layers.")),
        inner=_dim(shapes, "text_model.encoder.layers.0.mlp.fc1.weight", 0),
        projection=_dim(shapes, "text_projection.weight", 0),
    )


def _clip_openclip(shapes: Shapes, base: Mapping[str, Any]) -> dict[str, Any]:
    layers = len(_indices(shapes, "transformer.resblocks."))
    known = base.get("num_hidden_layers")
    if known == layers - 1:
        layers = known  # SD 2's text encoder is used up to its penultimate block (the last is dropped)
    return _clip_fields(
        base,
        vocab=shapes.get("token_embedding.weight"),
        positions=shapes.get("positional_embedding"),
        layers=layers,
        inner=_dim(shapes, "transformer.resblocks.0.mlp.c_fc.weight", 0),
        projection=_dim(shapes, "text_projection", 1),
    )


def _t5(shapes: Shapes, base: Mapping[str, Any]) -> dict[str, Any]:
    embed = shapes.get("shared.weight") or shapes.get("encoder.embed_tokens.weight")
    query = shapes.get("encoder.block.0.layer.0.SelfAttention.q.weight")
    if embed is None or query is None:
        return {}
    out: dict[str, Any] = {"vocab_size": int(embed[0]), "d_model": int(embed[1]),
                           "num_layers": len(_indices(shapes, "encoder.block.")), "model_type": "t5"}  # fmt: skip
    bias = shapes.get("encoder.block.0.layer.0.SelfAttention.relative_attention_bias.weight")
    if bias is not None:
        out["relative_attention_num_buckets"] = int(bias[0])
        out["num_heads"] = int(bias[1])
        out["d_kv"] = int(query[0]) // int(bias[1])
    mlp = "encoder.block.0.layer.1.DenseReluDense."
    gated = f"{mlp}wi_0.weight" in shapes
    out["d_ff"] = _dim(shapes, f"{mlp}wi_0.weight" if gated else f"{mlp}wi.weight", 0) or base.get("d_ff")
    known = str(base.get("feed_forward_proj") or "")
    if known.startswith("gated-") != gated:
        out["feed_forward_proj"] = "gated-gelu" if gated else "relu"
    return out


# ------------------------------------------------------------------------------------- transformers


@dataclass
class _Transformer:
    """A Flux or SD3 transformer as read from either layout (None: a key it is read from is absent)."""

    inner: int
    in_channels: int
    patch_size: int | None
    final: Sequence[int] | None  # the output projection: (patch * patch * out_channels, inner)
    head: int | None  # from a query norm's width (Flux; SD 3.5)
    joint: Sequence[int] | None  # the context embedder: (width, joint_attention_dim)
    pooled: Sequence[int] | None  # the pooled text embedder: (inner, pooled_projection_dim)


def _transformer_fields(t: _Transformer, base: Mapping[str, Any]) -> dict[str, Any]:
    head = t.head or int(base.get("attention_head_dim") or 64)
    out: dict[str, Any] = {"in_channels": t.in_channels, "attention_head_dim": head,
                           "num_attention_heads": t.inner // head}  # fmt: skip
    patch = t.patch_size or int(base.get("patch_size") or 1)
    if t.patch_size is not None:
        out["patch_size"] = t.patch_size
    if t.final is not None:
        out["out_channels"] = int(t.final[0]) // (patch * patch)
    if t.joint is not None:
        out["joint_attention_dim"] = int(t.joint[1])
    if t.pooled is not None:
        out["pooled_projection_dim"] = int(t.pooled[1])
    return out


def _flux(
    t: _Transformer, shapes: Shapes, base: Mapping[str, Any], double: str, single: str, guidance: str
) -> dict[str, Any]:
    out = _transformer_fields(t, base) | {
        "_class_name": "FluxTransformer2DModel",
        "num_layers": len(_indices(shapes, double)),
        "num_single_layers": len(_indices(shapes, single)),
        "guidance_embeds": _has(shapes, guidance),
    }
    if out.get("out_channels") == t.in_channels:
        out["out_channels"] = base.get("out_channels")  # None: the same as in_channels
    return out


def _sd3(
    t: _Transformer, shapes: Shapes, blocks: str, positions: Sequence[int] | None, norm: str, second: str
) -> dict[str, Any]:
    count = _indices(shapes, blocks)
    out: dict[str, Any] = {
        "_class_name": "SD3Transformer2DModel",
        "num_layers": len(count),
        "qk_norm": "rms_norm" if t.head is not None else None,
        "dual_attention_layers": [i for i in count if _has(shapes, f"{blocks}{i}.{second}")],
    }
    if t.joint is not None:
        out["caption_projection_dim"] = int(t.joint[0])
    if positions is not None and len(positions) == 3 and math.isqrt(positions[1]) ** 2 == positions[1]:
        out["pos_embed_max_size"] = math.isqrt(positions[1])
    return out


def _transformer_diffusers(shapes: Shapes, base: Mapping[str, Any]) -> dict[str, Any]:
    """Flux (``x_embedder`` a linear layer) or SD3 (``pos_embed.proj`` a patch convolution)."""
    flux = shapes.get("x_embedder.weight")
    if flux is not None:
        t = _Transformer(
            int(flux[0]), int(flux[1]), None, shapes.get("proj_out.weight"),
            _dim(shapes, "transformer_blocks.0.attn.norm_q.weight", 0), shapes.get("context_embedder.weight"),
            shapes.get("time_text_embed.text_embedder.linear_1.weight"),
        )  # fmt: skip
        return _flux(t, shapes, base, "transformer_blocks.", "single_transformer_blocks.",
                     "time_text_embed.guidance_embedder.")  # fmt: skip
    conv = shapes.get("pos_embed.proj.weight")
    if conv is None or len(conv) != 4:
        return {}
    t = _Transformer(
        int(conv[0]), int(conv[1]), int(conv[2]), shapes.get("proj_out.weight"),
        _dim(shapes, "transformer_blocks.0.attn.norm_q.weight", 0), shapes.get("context_embedder.weight"),
        shapes.get("time_text_embed.text_embedder.linear_1.weight"),
    )  # fmt: skip
    fields = _transformer_fields(t, base)
    return fields | _sd3(
        t, shapes, "transformer_blocks.", shapes.get("pos_embed.pos_embed"), "attn.norm_q", "attn2."
    )


def _flux_original(shapes: Shapes, base: Mapping[str, Any]) -> dict[str, Any]:
    """Black Forest Labs' names: ``img_in``, ``double_blocks.N``, ``single_blocks.N``."""
    img = shapes.get("img_in.weight")
    if img is None:
        return {}
    t = _Transformer(
        int(img[0]), int(img[1]), None, shapes.get("final_layer.linear.weight"),
        _dim(shapes, "double_blocks.0.img_attn.norm.query_norm.scale", 0), shapes.get("txt_in.weight"),
        shapes.get("vector_in.in_layer.weight"),
    )  # fmt: skip
    return _flux(t, shapes, base, "double_blocks.", "single_blocks.", "guidance_in.")


def _sd3_original(shapes: Shapes, base: Mapping[str, Any]) -> dict[str, Any]:
    """Stability's MMDiT names: ``x_embedder.proj``, ``joint_blocks.N.{x_block,context_block}``."""
    conv = shapes.get("x_embedder.proj.weight")
    if conv is None or len(conv) != 4:
        return {}
    t = _Transformer(
        int(conv[0]), int(conv[1]), int(conv[2]), shapes.get("final_layer.linear.weight"),
        _dim(shapes, "joint_blocks.0.x_block.attn.ln_q.weight", 0), shapes.get("context_embedder.weight"),
        shapes.get("y_embedder.mlp.0.weight"),
    )  # fmt: skip
    fields = _transformer_fields(t, base)
    return fields | _sd3(
        t, shapes, "joint_blocks.", shapes.get("pos_embed"), "x_block.attn.ln_q", "x_block.attn2."
    )


#: The transformer classes' defaults of the fields their published configs leave out.
_TRANSFORMER_DEFAULTS: dict[str, Any] = {"qk_norm": None, "dual_attention_layers": [], "out_channels": None,
                                         "guidance_embeds": False}  # fmt: skip

_READERS: dict[str, tuple[Reader, Mapping[str, Any]]] = {
    "unet/original": (_unet_original, _UNET_DEFAULTS),
    "unet/diffusers": (_unet_diffusers, _UNET_DEFAULTS),
    "vae/original": (_vae_original, {}),
    "vae/diffusers": (_vae_diffusers, {}),
    "clip/transformers": (_clip_transformers, {}),
    "clip/openclip": (_clip_openclip, {}),
    "t5/transformers": (_t5, {}),
    "transformer/diffusers": (_transformer_diffusers, _TRANSFORMER_DEFAULTS),
    "flux/original": (_flux_original, _TRANSFORMER_DEFAULTS),
    "sd3/original": (_sd3_original, _TRANSFORMER_DEFAULTS),
}

#: The layouts whose configs shapes decide (the worker's layout rule names).
SHAPE_LAYOUTS = tuple(_READERS)
