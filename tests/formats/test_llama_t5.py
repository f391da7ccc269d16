"""llama.cpp's T5 encoder names (city96's T5 GGUFs) to transformers' names, and the config a file implies."""

from __future__ import annotations

from typing import Any

from modelkeeper.formats.known_configs import load_known_config
from modelkeeper.formats.llama_t5 import config_from_metadata, llama_names, t5_config, transformers_names


def xxl_shapes(layers: int = 24, *, gated: bool = True) -> dict[str, tuple[int, ...]]:
    """The logical shapes of a T5 v1.1 XXL encoder in llama.cpp's names, as a GGUF header lists them."""
    shapes: dict[str, tuple[int, ...]] = {
        "token_embd.weight": (32128, 4096),
        "enc.output_norm.weight": (4096,),
    }
    for i in range(layers):
        for part in ("attn_q", "attn_k", "attn_v", "attn_o"):
            shapes[f"enc.blk.{i}.{part}.weight"] = (4096, 4096)
        shapes[f"enc.blk.{i}.attn_norm.weight"] = (4096,)
        shapes[f"enc.blk.{i}.ffn_norm.weight"] = (4096,)
        shapes[f"enc.blk.{i}.ffn_up.weight"] = (10240, 4096)
        shapes[f"enc.blk.{i}.ffn_down.weight"] = (4096, 10240)
        if gated:
            shapes[f"enc.blk.{i}.ffn_gate.weight"] = (10240, 4096)
    shapes["enc.blk.0.attn_rel_b.weight"] = (32, 64)
    return shapes


def test_every_llama_cpp_name_has_its_transformers_name() -> None:
    names = transformers_names([*xxl_shapes(2), "output.weight"])
    assert "output.weight" not in names  # an LM head an encoder does not use
    assert {k: v for k, v in names.items() if not k.startswith("enc.blk.1.")} == {
        "token_embd.weight": "shared.weight",
        "enc.output_norm.weight": "encoder.final_layer_norm.weight",
        "enc.blk.0.attn_q.weight": "encoder.block.0.layer.0.SelfAttention.q.weight",
        "enc.blk.0.attn_k.weight": "encoder.block.0.layer.0.SelfAttention.k.weight",
        "enc.blk.0.attn_v.weight": "encoder.block.0.layer.0.SelfAttention.v.weight",
        "enc.blk.0.attn_o.weight": "encoder.block.0.layer.0.SelfAttention.o.weight",
        "enc.blk.0.attn_rel_b.weight": "encoder.block.0.layer.0.SelfAttention.relative_attention_bias.weight",
        "enc.blk.0.attn_norm.weight": "encoder.block.0.layer.0.layer_norm.weight",
        "enc.blk.0.ffn_gate.weight": "encoder.block.0.layer.1.DenseReluDense.wi_0.weight",
        "enc.blk.0.ffn_up.weight": "encoder.block.0.layer.1.DenseReluDense.wi_1.weight",
        "enc.blk.0.ffn_down.weight": "encoder.block.0.layer.1.DenseReluDense.wo.weight",
        "enc.blk.0.ffn_norm.weight": "encoder.block.0.layer.1.layer_norm.weight",
    }
    plain = transformers_names(xxl_shapes(1, gated=False))
    assert plain["enc.blk.0.ffn_up.weight"] == "encoder.block.0.layer.1.DenseReluDense.wi.weight"
    assert transformers_names(["enc.blk.0.something_new.weight"]) == {
        "enc.blk.0.something_new.weight": "enc.blk.0.something_new.weight"  # named as unexpected by the load
    }


def test_the_names_go_back_and_forth() -> None:
    shapes = xxl_shapes(3)
    forward = transformers_names(shapes)
    assert llama_names(forward.values()) == {v: k for k, v in forward.items()}
    assert "encoder.embed_tokens.weight" not in llama_names(["encoder.embed_tokens.weight"])


def test_a_real_xxl_file_fits_the_known_t5_xxl_config() -> None:
    known = load_known_config("flux_dev", "text_encoder_2")
    assert t5_config(xxl_shapes(), {}, known) == known | {
        "is_encoder_decoder": known.get("is_encoder_decoder", False)
    }


def test_shapes_decide_over_the_given_config_and_metadata_fills_the_rest() -> None:
    known = load_known_config("flux_dev", "text_encoder_2")
    shapes: dict[str, Any] = {
        "token_embd.weight": (152, 32),
        "enc.blk.0.attn_q.weight": (32, 32),
        "enc.blk.0.attn_rel_b.weight": (32, 4),
        "enc.blk.0.ffn_gate.weight": (64, 32),
        "enc.blk.0.ffn_up.weight": (64, 32),
    }
    metadata = {"t5encoder.attention.layer_norm_epsilon": 9.999999974752427e-07, "t5encoder.block_count": 7,
                "t5encoder.attention.key_length": 99, "general.name": "x"}  # fmt: skip
    config = t5_config(shapes, metadata, known)
    assert {k: config[k] for k in ("vocab_size", "d_model", "num_layers", "num_heads", "d_kv", "d_ff")} == {
        "vocab_size": 152, "d_model": 32, "num_layers": 1, "num_heads": 4, "d_kv": 8, "d_ff": 64}  # fmt: skip
    assert config["layer_norm_epsilon"] == 1e-6 and config["feed_forward_proj"] == known["feed_forward_proj"]
    no_bias = {k: v for k, v in shapes.items() if "rel_b" not in k}
    assert t5_config(no_bias, metadata | {"t5encoder.attention.head_count": 2}, {})["num_heads"] == 2
    plain = t5_config({"enc.blk.0.ffn_up.weight": (64, 32)}, {}, known)
    assert plain["feed_forward_proj"] == "relu" and plain["model_type"] == "t5"
    assert config_from_metadata({"t5encoder.block_count": True}) == {}
