"""A text encoder's config from its shapes: CLIP (transformers' or OpenCLIP's names) and T5."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

from modelkeeper.formats.shape_configs.read import HEAD_WIDTH, Readers, Shapes, dim, head_count, indices


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
    out["num_attention_heads"] = head_count(
        hidden, int(base.get("num_attention_heads") or hidden // HEAD_WIDTH)
    )
    return out


def _clip_transformers(shapes: Shapes, base: Mapping[str, Any]) -> dict[str, Any]:
    return _clip_fields(
        base,
        vocab=shapes.get("text_model.embeddings.token_embedding.weight"),
        positions=shapes.get("text_model.embeddings.position_embedding.weight"),
        layers=len(indices(shapes, "text_model.encoder.layers.")),
        inner=dim(shapes, "text_model.encoder.layers.0.mlp.fc1.weight", 0),
        projection=dim(shapes, "text_projection.weight", 0),
    )


def _clip_openclip(shapes: Shapes, base: Mapping[str, Any]) -> dict[str, Any]:
    layers = len(indices(shapes, "transformer.resblocks."))
    known = base.get("num_hidden_layers")
    if known == layers - 1:
        layers = known  # SD 2's text encoder is used up to its penultimate block (the last is dropped)
    return _clip_fields(
        base,
        vocab=shapes.get("token_embedding.weight"),
        positions=shapes.get("positional_embedding"),
        layers=layers,
        inner=dim(shapes, "transformer.resblocks.0.mlp.c_fc.weight", 0),
        projection=dim(shapes, "text_projection", 1),
    )


def _t5(shapes: Shapes, base: Mapping[str, Any]) -> dict[str, Any]:
    embed = shapes.get("shared.weight") or shapes.get("encoder.embed_tokens.weight")
    query = shapes.get("encoder.block.0.layer.0.SelfAttention.q.weight")
    if embed is None or query is None:
        return {}
    out: dict[str, Any] = {"vocab_size": int(embed[0]), "d_model": int(embed[1]),
                           "num_layers": len(indices(shapes, "encoder.block.")), "model_type": "t5"}  # fmt: skip
    bias = shapes.get("encoder.block.0.layer.0.SelfAttention.relative_attention_bias.weight")
    if bias is not None:
        out["relative_attention_num_buckets"] = int(bias[0])
        out["num_heads"] = int(bias[1])
        out["d_kv"] = int(query[0]) // int(bias[1])
    mlp = "encoder.block.0.layer.1.DenseReluDense."
    gated = f"{mlp}wi_0.weight" in shapes
    out["d_ff"] = dim(shapes, f"{mlp}wi_0.weight" if gated else f"{mlp}wi.weight", 0) or base.get("d_ff")
    known = str(base.get("feed_forward_proj") or "")
    if known.startswith("gated-") != gated:
        out["feed_forward_proj"] = "gated-gelu" if gated else "relu"
    return out


READERS: Readers = {
    "clip/transformers": (_clip_transformers, {}),
    "clip/openclip": (_clip_openclip, {}),
    "t5/transformers": (_t5, {}),
}
