"""LoRA and textual-inversion files have the key structures their tools write."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file

from modelkeeper.testing import (
    embedding_state_dict,
    kohya_lora_state_dict,
    lycoris_state_dict,
    make_unet,
    save_kohya_lora,
    save_lycoris,
    save_peft_lora,
)
from tests.testing.conftest import GROUP

pytestmark = GROUP


def _modules(state_dict: dict[str, torch.Tensor]) -> set[str]:
    return {key.split(".")[0] for key in state_dict}


def test_kohya_sd1_names_and_shapes() -> None:
    sd = kohya_lora_state_dict("sd1", rank=8, alpha=4)
    q = "lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn1_to_q"
    assert sd[f"{q}.lora_down.weight"].shape == (8, 32) and sd[f"{q}.lora_up.weight"].shape == (32, 8)
    assert sd[f"{q}.alpha"].item() == 4.0 and sd[f"{q}.alpha"].dim() == 0
    k2 = "lora_unet_up_blocks_1_attentions_0_transformer_blocks_0_attn2_to_k"
    assert sd[f"{k2}.lora_down.weight"].shape == (8, 768)  # cross-attention reads the 768-wide text
    conv = "lora_unet_down_blocks_0_attentions_0_proj_in"  # a 1x1 conv in SD1
    assert sd[f"{conv}.lora_down.weight"].shape == (8, 32, 1, 1)
    te = "lora_te_text_model_encoder_layers_0_self_attn_q_proj"
    assert sd[f"{te}.lora_down.weight"].shape == (8, 768)
    assert "lora_te_text_model_encoder_layers_0_mlp_fc1.lora_up.weight" in sd
    assert all(t.dtype == torch.float16 for t in sd.values())
    assert all(m.startswith(("lora_unet_", "lora_te_")) for m in _modules(sd))


def test_kohya_sdxl_uses_sgm_unet_names_and_two_text_encoders() -> None:
    modules = _modules(kohya_lora_state_dict("sdxl"))
    assert "lora_unet_input_blocks_3_1_transformer_blocks_0_attn1_to_k" in modules
    assert "lora_unet_middle_block_1_transformer_blocks_0_attn2_to_v" in modules
    assert "lora_unet_output_blocks_0_1_proj_out" in modules
    assert not any("down_blocks" in m or "up_blocks" in m for m in modules)
    assert "lora_te1_text_model_encoder_layers_0_self_attn_k_proj" in modules
    assert "lora_te2_text_model_encoder_layers_0_mlp_fc2" in modules


def test_kohya_file_metadata(tmp_path: Path) -> None:
    path = save_kohya_lora(tmp_path / "style.safetensors", "sdxl", rank=2, alpha=1)
    with safe_open(str(path), framework="pt") as handle:
        metadata = handle.metadata()
    assert metadata["ss_network_module"] == "networks.lora"
    assert (metadata["ss_network_dim"], metadata["ss_network_alpha"]) == ("2", "1.0")
    assert metadata["ss_base_model_version"] == "sdxl_base_v1-0"
    assert metadata["ss_output_name"] == "style"
    assert "tinystyle" in json.loads(metadata["ss_tag_frequency"])["1_tinystyle"]


def test_peft_lora_keys(tmp_path: Path) -> None:
    sd = load_file(save_peft_lora(tmp_path / "sd1.safetensors", "sd1", rank=2))
    assert "unet.down_blocks.0.attentions.0.transformer_blocks.0.attn1.to_q.lora_A.weight" in sd
    assert sd["unet.down_blocks.0.attentions.0.transformer_blocks.0.attn2.to_k.lora_A.weight"].shape == (
        2,
        768,
    )
    assert "text_encoder.text_model.encoder.layers.0.self_attn.q_proj.lora_B.weight" in sd
    xl = load_file(save_peft_lora(tmp_path / "xl.safetensors", "sdxl", text_encoder=True))
    assert {k.split(".")[0] for k in xl} == {"unet", "text_encoder", "text_encoder_2"}
    assert xl["text_encoder_2.text_model.encoder.layers.0.self_attn.v_proj.lora_A.weight"].shape == (4, 1280)
    bare = load_file(save_peft_lora(tmp_path / "bare.safetensors", "sd1", text_encoder=False))
    assert {k.split(".")[0] for k in bare} == {"unet"}
    with safe_open(str(tmp_path / "sd1.safetensors"), framework="pt") as handle:
        adapter = json.loads(handle.metadata()["lora_adapter_metadata"])
    assert adapter["unet.r"] == 2 and adapter["unet.target_modules"] == sorted(adapter["unet.target_modules"])


@pytest.mark.parametrize("algo", ["loha", "lokr"])
def test_lycoris_keys_and_shapes(tmp_path: Path, algo: str) -> None:
    unet = make_unet("sd1", device="meta")
    sd = lycoris_state_dict(algo, unet=unet)  # type: ignore[arg-type]
    name = "lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn2_to_k"
    target = unet.get_submodule("down_blocks.0.attentions.0.transformer_blocks.0.attn2.to_k").weight
    if algo == "loha":
        assert {f"{name}.hada_w{i}_{ab}" for i in (1, 2) for ab in "ab"} <= set(sd)
        delta = (sd[f"{name}.hada_w1_a"].float() @ sd[f"{name}.hada_w1_b"].float()) * (
            sd[f"{name}.hada_w2_a"].float() @ sd[f"{name}.hada_w2_b"].float()
        )
    else:
        delta = torch.kron(sd[f"{name}.lokr_w1"].float(), sd[f"{name}.lokr_w2"].float())
    assert delta.shape == target.shape == (32, 768)
    path = save_lycoris(tmp_path / f"{algo}.safetensors", algo)  # type: ignore[arg-type]
    with safe_open(str(path), framework="pt") as handle:
        metadata = handle.metadata()
    assert metadata["ss_network_module"] == "lycoris.kohya"
    assert json.loads(metadata["ss_network_args"])["algo"] == algo


def test_embedding_layouts() -> None:
    assert embedding_state_dict("a1111")["emb_params"].shape == (2, 768)
    assert embedding_state_dict("a1111", base="sd2", vectors=3)["emb_params"].shape == (3, 1024)
    assert embedding_state_dict("diffusers", token="<x>")["<x>"].shape == (2, 768)
    sdxl = embedding_state_dict("sdxl", base="sdxl")
    assert sdxl["clip_l"].shape == (2, 768) and sdxl["clip_g"].shape == (2, 1280)
    with pytest.raises(ValueError, match="SDXL embeddings"):
        embedding_state_dict("a1111", base="sdxl")
