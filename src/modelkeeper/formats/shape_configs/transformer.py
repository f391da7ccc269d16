"""A Flux or SD3 transformer's config from its shapes, in the diffusers layout or the original one."""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from modelkeeper.formats.shape_configs.read import Readers, Shapes, dim, has, indices


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
        "num_layers": len(indices(shapes, double)),
        "num_single_layers": len(indices(shapes, single)),
        "guidance_embeds": has(shapes, guidance),
    }
    if out.get("out_channels") == t.in_channels:
        out["out_channels"] = base.get("out_channels")  # None: the same as in_channels
    return out


def _sd3(
    t: _Transformer, shapes: Shapes, blocks: str, positions: Sequence[int] | None, norm: str, second: str
) -> dict[str, Any]:
    count = indices(shapes, blocks)
    out: dict[str, Any] = {
        "_class_name": "SD3Transformer2DModel",
        "num_layers": len(count),
        "qk_norm": "rms_norm" if t.head is not None else None,
        "dual_attention_layers": [i for i in count if has(shapes, f"{blocks}{i}.{second}")],
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
            dim(shapes, "transformer_blocks.0.attn.norm_q.weight", 0), shapes.get("context_embedder.weight"),
            shapes.get("time_text_embed.text_embedder.linear_1.weight"),
        )  # fmt: skip
        return _flux(t, shapes, base, "transformer_blocks.", "single_transformer_blocks.",
                     "time_text_embed.guidance_embedder.")  # fmt: skip
    conv = shapes.get("pos_embed.proj.weight")
    if conv is None or len(conv) != 4:
        return {}
    t = _Transformer(
        int(conv[0]), int(conv[1]), int(conv[2]), shapes.get("proj_out.weight"),
        dim(shapes, "transformer_blocks.0.attn.norm_q.weight", 0), shapes.get("context_embedder.weight"),
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
        dim(shapes, "double_blocks.0.img_attn.norm.query_norm.scale", 0), shapes.get("txt_in.weight"),
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
        dim(shapes, "joint_blocks.0.x_block.attn.ln_q.weight", 0), shapes.get("context_embedder.weight"),
        shapes.get("y_embedder.mlp.0.weight"),
    )  # fmt: skip
    fields = _transformer_fields(t, base)
    return fields | _sd3(
        t, shapes, "joint_blocks.", shapes.get("pos_embed"), "x_block.attn.ln_q", "x_block.attn2."
    )


#: The transformer classes' defaults of the fields their published configs leave out.
TRANSFORMER_DEFAULTS: dict[str, Any] = {"qk_norm": None, "dual_attention_layers": [], "out_channels": None,
                                         "guidance_embeds": False}  # fmt: skip


READERS: Readers = {
    "transformer/diffusers": (_transformer_diffusers, TRANSFORMER_DEFAULTS),
    "flux/original": (_flux_original, TRANSFORMER_DEFAULTS),
    "sd3/original": (_sd3_original, TRANSFORMER_DEFAULTS),
}
