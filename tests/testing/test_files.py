"""Single files, checkpoints and diffusers folders: what they hold, and that the libraries load them."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from diffusers import AutoencoderKL, UNet2DConditionModel
from safetensors.torch import load_file
from transformers import CLIPTextModel, CLIPTextModelWithProjection, T5EncoderModel

from modelkeeper.testing import (
    CONFIG_METADATA_KEY,
    DemoManifest,
    component_config,
    make_text_encoder,
    make_unet,
    make_vae,
    save_checkpoint,
    save_component_folder,
    save_single_file,
    state_dict_for_save,
)
from modelkeeper.testing.files import canonicalize_safetensors, write_safetensors
from tests.testing.conftest import GROUP, assert_bitwise_equal, read_config_metadata, read_metadata

pytestmark = GROUP


def test_single_file_diffusers_layout_with_and_without_config(tmp_path: Path) -> None:
    unet = make_unet("sd1")
    with_config = save_single_file(unet, tmp_path / "unet.safetensors")
    without = save_single_file(unet, tmp_path / "plain.safetensors", with_config_metadata=False)
    assert read_config_metadata(with_config) == json.loads(json.dumps(component_config(unet)))
    assert read_metadata(without) == {"format": "pt"}
    a, b = load_file(with_config), load_file(without)
    assert_bitwise_equal(a, b)
    assert all(t.dtype == torch.float16 for t in a.values())
    assert_bitwise_equal({k: v.float() for k, v in a.items()}, state_dict_for_save(unet))


def test_single_file_from_a_state_dict_needs_kind_and_config(tmp_path: Path) -> None:
    vae = make_vae("flux")
    state_dict = state_dict_for_save(vae)
    with pytest.raises(ValueError, match="needs its component kind"):
        save_single_file(state_dict, tmp_path / "a.safetensors")
    with pytest.raises(ValueError, match="needs its config"):
        save_single_file(state_dict, tmp_path / "a.safetensors", kind="vae", layout="original")
    path = save_single_file(
        state_dict,
        tmp_path / "a.safetensors",
        kind="vae",
        layout="original",
        config=component_config(vae),
        prefix="",
    )
    assert "encoder.down.0.block.0.norm1.weight" in load_file(path)
    assert read_config_metadata(path) is not None
    bare = save_single_file(
        state_dict_for_save(make_text_encoder("clip_l")), tmp_path / "b.safetensors", kind="clip_l",
        layout="original", with_config_metadata=False,
    )  # fmt: skip
    assert next(iter(load_file(bare))).startswith("cond_stage_model.transformer.text_model.")


def test_checkpoint_config_metadata_names_every_component(tmp_path: Path) -> None:
    unet, vae = make_unet("sdxl_refiner", device="meta"), make_vae("sdxl", device="meta")
    encoder = make_text_encoder("clip_g", dtype=torch.float16)
    with pytest.raises(ValueError, match="needs text encoders"):
        save_checkpoint(tmp_path / "x.safetensors", base="sdxl", unet=unet, vae=vae, text_encoders=[encoder])
    unet, vae = make_unet("sdxl_refiner", dtype=torch.float16), make_vae("sdxl", dtype=torch.float16)
    path = save_checkpoint(
        tmp_path / "r.safetensors", base="sdxl_refiner", unet=unet, vae=vae, text_encoders=[encoder]
    )
    config = read_config_metadata(path)
    assert config is not None and config["_class_name"] == "StableDiffusionXLImg2ImgPipeline"
    assert set(config) == {"_class_name", "unet", "vae", "text_encoder_2"}
    keys = set(load_file(path))
    assert "conditioner.embedders.0.model.transformer.resblocks.0.attn.in_proj_weight" in keys
    assert (
        "model.diffusion_model.label_emb.0.0.weight" in keys
        and "first_stage_model.decoder.conv_out.weight" in keys
    )
    plain = save_checkpoint(
        tmp_path / "p.safetensors", base="sdxl_refiner", unet=unet, vae=vae, text_encoders=[encoder],
        with_config_metadata=False,
    )  # fmt: skip
    assert CONFIG_METADATA_KEY not in read_metadata(plain)


def test_headers_are_reproducible(tmp_path: Path) -> None:
    tensors = {"b": torch.ones(2), "a": torch.zeros(3, dtype=torch.float16)}
    metadata = {f"key{i}": str(i) for i in range(20)}
    one = write_safetensors(tensors, tmp_path / "1.safetensors", metadata=metadata)
    two = write_safetensors(dict(reversed(tensors.items())), tmp_path / "2.safetensors", metadata=metadata)
    assert one.read_bytes() == two.read_bytes()
    before = one.read_bytes()
    assert canonicalize_safetensors(one).read_bytes() == before
    assert read_metadata(one) == {"format": "pt", **metadata}
    assert_bitwise_equal(load_file(one), tensors)


def test_component_folders_load_with_from_pretrained(tmp_path: Path) -> None:
    unet = make_unet("sd1")
    folder = save_component_folder(unet, tmp_path / "unet", dtype=torch.float32, variants=("fp16",))
    assert {p.name for p in folder.iterdir()} == {
        "config.json", "diffusion_pytorch_model.safetensors", "diffusion_pytorch_model.fp16.safetensors",
    }  # fmt: skip
    loaded = UNet2DConditionModel.from_pretrained(folder, local_files_only=True)
    assert_bitwise_equal(loaded.state_dict(), unet.state_dict())
    half = UNet2DConditionModel.from_pretrained(folder, variant="fp16", torch_dtype=torch.float16)
    assert half.dtype == torch.float16
    assert_bitwise_equal({k: v.float() for k, v in half.state_dict().items()}, unet.state_dict())
    encoder = make_text_encoder("clip_l")
    loaded_encoder = CLIPTextModel.from_pretrained(save_component_folder(encoder, tmp_path / "te"))
    assert loaded_encoder.dtype == torch.float32
    assert_bitwise_equal(loaded_encoder.state_dict(), encoder.state_dict())


def test_every_demo_folder_loads(demo: DemoManifest) -> None:
    classes = {
        "UNet2DConditionModel": UNet2DConditionModel,
        "AutoencoderKL": AutoencoderKL,
        "CLIPTextModel": CLIPTextModel,
        "CLIPTextModelWithProjection": CLIPTextModelWithProjection,
        "T5EncoderModel": T5EncoderModel,
    }
    folders = [e for e in demo.select(format="diffusers") if e.type != "main"]
    for entry in folders:
        folder = demo.root / entry.path
        model = classes[str(entry.class_name)].from_pretrained(folder, local_files_only=True)
        assert model.dtype == torch.float32, entry.name
        for variant in entry.weights_variants:
            classes[str(entry.class_name)].from_pretrained(folder, variant=variant, local_files_only=True)
    # Every component folder of every pipeline loads on its own too.
    for entry in demo.select(type="main", format="diffusers"):
        index = json.loads((demo.root / entry.path / "model_index.json").read_text())
        for name, spec in index.items():
            if isinstance(spec, list) and spec[1] in classes:
                model = classes[spec[1]].from_pretrained(demo.root / entry.path / name, local_files_only=True)
                assert model.dtype == torch.float32, (entry.name, name)
    assert len(folders) >= 3
