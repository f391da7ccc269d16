"""The demo set on disk agrees with its manifest, stays small, and is the same bytes every time."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import pytest
from safetensors import safe_open

from modelkeeper.testing import (
    CONFIG_METADATA_KEY,
    MANIFEST_NAME,
    DemoEntry,
    DemoManifest,
    demo_entry_names,
    write_demo_models,
)
from modelkeeper.testing.demo import PACKED_ENTRY_NAMES
from tests.testing.conftest import GROUP, read_config_metadata, read_metadata

pytestmark = GROUP

MB = 1_000_000


def test_manifest_round_trips(demo: DemoManifest) -> None:
    loaded = DemoManifest.load(demo.root)
    assert loaded == demo
    assert DemoManifest.load(demo.root / MANIFEST_NAME) == demo
    data = json.loads((demo.root / MANIFEST_NAME).read_text())
    assert data["version"] == 1 and data["total_bytes"] == demo.total_bytes
    assert [e.name for e in demo] == demo_entry_names()
    assert len({e.name for e in demo}) == len(demo) and len({e.path for e in demo}) == len(demo)
    with pytest.raises(KeyError):
        demo["nope"]
    with pytest.raises(ValueError, match="unknown manifest entry fields"):
        DemoEntry.from_json({**demo.entries[0].to_json(), "colour": "red"})


def test_files_match_their_entries(demo: DemoManifest) -> None:
    for entry in demo:
        path = demo.root / entry.path
        if entry.format == "safetensors":
            assert path.is_file(), entry.name
            assert path.stat().st_size == entry.size_bytes, entry.name
            assert hashlib.sha256(path.read_bytes()).hexdigest() == entry.sha256, entry.name
            with safe_open(str(path), framework="pt") as handle:
                keys = list(handle.keys())
            assert len(keys) == entry.tensor_count, entry.name
            assert (CONFIG_METADATA_KEY in read_metadata(path)) == entry.config_metadata, entry.name
            if entry.config_metadata:
                assert read_config_metadata(path) == entry.config, entry.name
            if entry.prefix:
                assert all(k.startswith(entry.prefix) for k in keys), entry.name
        else:
            assert path.is_dir(), entry.name
            assert sum(p.stat().st_size for p in path.rglob("*") if p.is_file()) == entry.size_bytes, (
                entry.name
            )
        if entry.format == "diffusers":
            marker = "model_index.json" if entry.type == "main" else "config.json"
            assert (path / marker).is_file(), entry.name


def test_what_the_manifest_promises(demo: DemoManifest) -> None:
    types = {e.type for e in demo}
    assert types == {"main", "unet", "vae", "text_encoder", "lora", "textual_inversion", "tokenizer"}
    assert {e.layout for e in demo.select(type="lora")} == {"kohya", "peft", "loha", "lokr"}
    assert {e.layout for e in demo.select(type="textual_inversion")} == {"a1111", "diffusers", "sdxl"}
    assert {e.base for e in demo.select(type="unet")} == {"sd1", "sd2", "sdxl", "sdxl_refiner"}
    assert (
        demo["sd15-inpaint-unet"].dims["in_channels"] == 9 and demo["sd15-inpaint-unet"].variant == "inpaint"
    )
    assert demo["flux-vae"].dims["latent_channels"] == 16 and demo["sd15-vae"].dims["latent_channels"] == 4
    cross = {e.base: e.dims["cross_attention_dim"] for e in demo.select(type="unet")}
    assert cross == {"sd1": 768, "sd2": 1024, "sdxl": 2048, "sdxl_refiner": 1280}
    assert demo["sdxl-unet"].dims["addition_embed_input_dim"] == 2816
    assert demo["sdxl-refiner-unet"].dims["addition_embed_input_dim"] == 2560
    assert demo["clip-g"].dims == {"hidden_size": 1280, "projection_dim": 1280}
    assert demo["sd15-unet-folder"].weights_variants == ("fp16",)
    assert (demo.path("sd15-unet-folder") / "diffusion_pytorch_model.fp16.safetensors").is_file()
    assert {e.layout for e in demo.select(format="safetensors", type="unet")} == {"diffusers", "original"}
    assert any(not e.config_metadata for e in demo.select(layout="original"))  # like published files
    with safe_open(str(demo.path("sd15-lora-kohya")), framework="pt") as handle:
        metadata = handle.metadata()
    assert metadata["ss_network_dim"] == "4" and metadata["ss_base_model_version"] == "sd_v1"


def test_sizes_stay_small(demo: DemoManifest) -> None:
    assert demo.total_bytes < 135 * MB
    for entry in demo:
        limit = 31 * MB if entry.name.startswith("sdxl-") and entry.type == "main" else 19 * MB
        assert entry.size_bytes < limit, (entry.name, entry.size_bytes)
    assert demo["sd15-checkpoint"].size_bytes < 10 * MB
    assert all(e.size_bytes < MB for e in demo.select(type="lora"))


def test_writing_is_reproducible_and_selectable(demo: DemoManifest, tmp_path: Path) -> None:
    lines: list[str] = []
    names = [
        "sd15-unet",
        "sd15-lora-peft",
        "sdxl-lora-kohya",
        "flux-vae",
        "t5-tokenizer",
        "sd15-embedding-a1111",
    ]
    again = write_demo_models(tmp_path / "again", only=names, progress=lines.append)
    assert [e.name for e in again] == [n for n in demo_entry_names() if n in names]
    assert len(lines) == len(names) and "unet/tiny-sd15-unet.safetensors" in lines[0]
    for entry in again:
        assert entry == demo[entry.name]
        if entry.format == "safetensors":
            assert (tmp_path / "again" / entry.path).read_bytes() == demo.path(entry.name).read_bytes()
    with pytest.raises(ValueError, match="unknown demo entries"):
        write_demo_models(tmp_path / "bad", only=["nope"])
    assert DemoManifest.load(tmp_path / "again").entries == again.entries


def test_extras(tmp_path: Path) -> None:
    extras = set(demo_entry_names(extras=True)) - set(demo_entry_names())
    assert extras == {"sd2-pipeline", "sd2-checkpoint", "sd15-inpaint-checkpoint", *PACKED_ENTRY_NAMES}
    manifest = write_demo_models(tmp_path, only=["sd2-checkpoint", "sd15-inpaint-checkpoint"])
    assert manifest["sd2-checkpoint"].components == ("unet", "vae", "clip_h")
    assert manifest["sd15-inpaint-checkpoint"].variant == "inpaint"
    with safe_open(str(manifest.path("sd2-checkpoint")), framework="pt") as handle:
        keys = set(handle.keys())
    assert "cond_stage_model.model.transformer.resblocks.0.attn.in_proj_weight" in keys


def test_packed_forms(tmp_path: Path) -> None:
    """The fp8, scaled fp8 and GGUF files hold what their manifest entries say, and scan agrees."""
    from modelkeeper.discovery.tables import read_gguf_table, read_safetensors_table, storage_form

    manifest = write_demo_models(tmp_path, only=PACKED_ENTRY_NAMES)
    assert len(manifest) == len(PACKED_ENTRY_NAMES) == 2 + 3 * 3 + 2 + 1 + 2 * 7
    for entry in manifest:
        path = manifest.root / entry.path
        gguf = entry.format == "gguf"
        table = read_gguf_table(path) if gguf else read_safetensors_table(path)
        assert storage_form(table, gguf=gguf) == (entry.quant or (None if not gguf else entry.quant)), (
            entry.name
        )
        # the T5 GGUF is written as city96's are: llama.cpp's names and numbers, no modelkeeper.config
        assert entry.config_metadata == (entry.name != "t5-q8_0") and entry.size_bytes == path.stat().st_size
    flux = manifest["flux-transformer-fp8-scaled"]
    with safe_open(str(manifest.root / flux.path), framework="pt") as handle:
        assert "scaled_fp8" in set(handle.keys())
        assert "transformer_blocks.0.attn.to_q.scale_weight" in set(handle.keys())
