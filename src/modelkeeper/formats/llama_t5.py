"""A T5 encoder under llama.cpp's tensor names (city96's T5 GGUFs), and its transformers config.

llama.cpp's converter (``convert_hf_to_gguf.py``, architecture ``t5encoder``) renames transformers'
``T5EncoderModel`` tensors; the T5-XXL GGUFs users download beside Flux and SD3.5 transformers keep
those names. This module maps them back, and reads the config the file implies:

| llama.cpp (``enc.blk.N.`` + ...) | transformers (``encoder.block.N.`` + ...) |
| --- | --- |
| ``attn_q`` ``attn_k`` ``attn_v`` ``attn_o`` | ``layer.0.SelfAttention.q`` ``k`` ``v`` ``o`` |
| ``attn_rel_b`` (block 0 only) | ``layer.0.SelfAttention.relative_attention_bias`` |
| ``attn_norm`` | ``layer.0.layer_norm`` |
| ``ffn_gate`` ``ffn_up`` ``ffn_down`` | ``layer.1.DenseReluDense.wi_0`` ``wi_1`` ``wo`` (``ffn_up`` is ``wi`` without a gate) |
| ``ffn_norm`` | ``layer.1.layer_norm`` |

``token_embd`` is ``shared`` (``encoder.embed_tokens`` is tied to it) and ``enc.output_norm`` is
``encoder.final_layer_norm``. The config comes from the shapes (in their logical form, as a GGUF
header lists them) first, then from the file's ``t5encoder.*`` metadata where a shape is silent,
then from the config given. Names only: the tensors themselves are the worker's.
"""

from __future__ import annotations

import re
from collections.abc import Mapping, Sequence
from typing import Any

#: The key whose presence makes a tensor table a T5 encoder in llama.cpp's names.
ANCHOR = "enc.blk.0.attn_q.weight"
#: A plain (never quantized: 1-D) tensor whose width is the model's (``d_model``).
WIDTH_KEY = "enc.blk.0.attn_norm.weight"
#: llama.cpp's architecture name for a T5 encoder (``general.architecture``, the metadata prefix).
ARCH = "t5encoder"

_BLOCK = re.compile(r"enc\.blk\.(\d+)\.(\w+)\.(weight|bias)")

#: Per block: llama.cpp's tensor -> transformers' module under ``encoder.block.N.``.
BLOCK_NAMES: dict[str, str] = {
    "attn_q": "layer.0.SelfAttention.q",
    "attn_k": "layer.0.SelfAttention.k",
    "attn_v": "layer.0.SelfAttention.v",
    "attn_o": "layer.0.SelfAttention.o",
    "attn_rel_b": "layer.0.SelfAttention.relative_attention_bias",
    "attn_norm": "layer.0.layer_norm",
    "ffn_gate": "layer.1.DenseReluDense.wi_0",
    "ffn_up": "layer.1.DenseReluDense.wi_1",
    "ffn_down": "layer.1.DenseReluDense.wo",
    "ffn_norm": "layer.1.layer_norm",
}
#: Tensors outside the blocks.
TOP_NAMES: dict[str, str] = {
    "token_embd.weight": "shared.weight",
    "enc.output_norm.weight": "encoder.final_layer_norm.weight",
}
#: Tensors of a converted T5 that an encoder does not use (an LM head some conversions keep).
UNUSED = frozenset({"output.weight"})


def is_llama_t5(names: Sequence[str] | Mapping[str, Any]) -> bool:
    return ANCHOR in names


def transformers_names(names: Sequence[str] | Mapping[str, Any]) -> dict[str, str]:
    """llama.cpp name -> transformers name, for every tensor of ``names`` a ``T5EncoderModel`` holds.
    Names this module does not know are mapped to themselves, so a load names them as unexpected."""
    gated = any(n.endswith(".ffn_gate.weight") for n in names)
    out: dict[str, str] = {}
    for name in names:
        if name in UNUSED:
            continue
        if name in TOP_NAMES:
            out[name] = TOP_NAMES[name]
            continue
        m = _BLOCK.fullmatch(name)
        if m is None or m.group(2) not in BLOCK_NAMES:
            out[name] = name
            continue
        module = BLOCK_NAMES[m.group(2)]
        if m.group(2) == "ffn_up" and not gated:
            module = "layer.1.DenseReluDense.wi"  # T5 1.0's plain MLP
        out[name] = f"encoder.block.{m.group(1)}.{module}.{m.group(3)}"
    return out


def llama_names(names: Sequence[str] | Mapping[str, Any]) -> dict[str, str]:
    """transformers name -> llama.cpp name (the inverse of :func:`transformers_names`), for writers
    of files in llama.cpp's names; ``encoder.embed_tokens`` (tied to ``shared``) is left out."""
    inverse_block = {v: k for k, v in BLOCK_NAMES.items()} | {"layer.1.DenseReluDense.wi": "ffn_up"}
    inverse_top = {v: k for k, v in TOP_NAMES.items()}
    pattern = re.compile(r"encoder\.block\.(\d+)\.(.+)\.(weight|bias)")
    out: dict[str, str] = {}
    for name in names:
        if name in inverse_top:
            out[name] = inverse_top[name]
        elif (m := pattern.fullmatch(name)) is not None and m.group(2) in inverse_block:
            out[name] = f"enc.blk.{m.group(1)}.{inverse_block[m.group(2)]}.{m.group(3)}"
    return out


#: ``t5encoder.*`` metadata keys (llama.cpp's) -> the T5Config field each states.
METADATA_FIELDS: dict[str, str] = {
    "embedding_length": "d_model",
    "feed_forward_length": "d_ff",
    "block_count": "num_layers",
    "attention.head_count": "num_heads",
    "attention.key_length": "d_kv",
    "attention.relative_buckets_count": "relative_attention_num_buckets",
    "attention.layer_norm_epsilon": "layer_norm_epsilon",
    "attention.layer_norm_rms_epsilon": "layer_norm_epsilon",
}


def config_from_metadata(metadata: Mapping[str, Any]) -> dict[str, Any]:
    """The T5Config fields a GGUF file's ``t5encoder.*`` metadata states (empty when it has none)."""
    out: dict[str, Any] = {}
    for key, field in METADATA_FIELDS.items():
        value = metadata.get(f"{ARCH}.{key}")
        if isinstance(value, float):
            out[field] = float(f"{value:.7g}")  # stored as float32: 1e-6 reads back as 9.9999999e-07
        elif isinstance(value, int) and not isinstance(value, bool):
            out[field] = value
    return out


def config_from_shapes(shapes: Mapping[str, Sequence[int]]) -> dict[str, Any]:
    """The T5Config fields the logical shapes of a file in llama.cpp's names decide."""
    out: dict[str, Any] = {}
    embed = shapes.get("token_embd.weight")
    if embed is not None and len(embed) == 2:
        out["vocab_size"], out["d_model"] = int(embed[0]), int(embed[1])
    blocks = {int(m.group(1)) for n in shapes if (m := _BLOCK.fullmatch(n))}
    if blocks:
        out["num_layers"] = max(blocks) + 1
    bias = shapes.get("enc.blk.0.attn_rel_b.weight")
    query = shapes.get(ANCHOR)
    if bias is not None and len(bias) == 2:
        out["relative_attention_num_buckets"], out["num_heads"] = int(bias[0]), int(bias[1])
        if query is not None and int(bias[1]):
            out["d_kv"] = int(query[0]) // int(bias[1])
    gate = shapes.get("enc.blk.0.ffn_gate.weight")
    up = shapes.get("enc.blk.0.ffn_up.weight")
    if (gate or up) is not None:
        out["d_ff"] = int((gate or up)[0])  # type: ignore[index]
    return out


def t5_config(
    shapes: Mapping[str, Sequence[int]], metadata: Mapping[str, Any], given: Mapping[str, Any] | None = None
) -> dict[str, Any]:
    """The ``T5EncoderModel`` config of a file in llama.cpp's names: ``given`` (a known T5-XXL config,
    say) with what the metadata states and, over both, what the shapes decide."""
    gated = "enc.blk.0.ffn_gate.weight" in shapes
    config = {
        **dict(given or {}),
        **config_from_metadata(metadata),
        **config_from_shapes(shapes),
        "model_type": "t5",
    }
    proj = str(config.get("feed_forward_proj") or "")
    if proj.startswith("gated-") != gated:
        config["feed_forward_proj"] = "gated-gelu" if gated else "relu"
    config.setdefault("architectures", ["T5EncoderModel"])
    config.setdefault("is_encoder_decoder", False)
    return config


__all__ = [
    "ANCHOR",
    "ARCH",
    "BLOCK_NAMES",
    "TOP_NAMES",
    "WIDTH_KEY",
    "config_from_metadata",
    "config_from_shapes",
    "is_llama_t5",
    "llama_names",
    "t5_config",
    "transformers_names",
]
