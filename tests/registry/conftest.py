"""Fixtures of the registry tests: a small library of stripped real models (headers of SD1.5, its
VAE, CLIP-L, a kohya LoRA, an SD1.5 diffusers pipeline), scanned into a fresh registry file."""

from __future__ import annotations

import json
import os
import shutil
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).parents[1] / "discovery"))
from stripped import MODELS, diffusers_state, shapes_of, transformers_state, write_stripped

from modelkeeper.discovery.scanner import Scanner
from modelkeeper.formats.known_configs import load_known_config, model_index
from modelkeeper.registry.store import Registry

KOHYA_META = {"ss_network_module": "networks.lora", "ss_network_dim": "32", "ss_network_alpha": "16"}
PICK = {
    "checkpoints/sdxl_base_1.0.safetensors": "checkpoints/sd15.safetensors",  # an SD1.5 checkpoint
    "vae/vae-ft-mse-840000-ema-pruned.safetensors": "vae/vae-ft-mse.safetensors",
    "clip/clip_l.safetensors": "clip/clip_l.safetensors",
    "loras/sdxl-lightning-lora.safetensors": "loras/style.safetensors",  # an SD1.5 kohya LoRA
    "embeddings/easynegative.safetensors": "embeddings/easynegative.safetensors",
    "unet/flux1-dev.safetensors": "unet/flux1-dev.safetensors",
}


def write_pipeline(folder: Path, base: str = "sd1") -> Path:
    """A diffusers pipeline folder: the shipped configs and stripped weights of each component."""
    folder.mkdir(parents=True)
    (folder / "model_index.json").write_text(json.dumps(model_index(base)))
    (folder / "scheduler").mkdir()
    (folder / "scheduler" / "scheduler_config.json").write_text(
        json.dumps(load_known_config(base, "scheduler"))
    )
    for slot, kind in (("unet", "unet"), ("vae", "vae")):
        (folder / slot).mkdir()
        (folder / slot / "config.json").write_text(json.dumps(load_known_config(base, slot)))
        write_stripped(
            folder / slot / "diffusion_pytorch_model.fp16.safetensors",
            shapes_of(diffusers_state(kind, base, slot), "F16"),
        )
    (folder / "text_encoder").mkdir()
    (folder / "text_encoder" / "config.json").write_text(json.dumps(load_known_config(base, "text_encoder")))
    write_stripped(
        folder / "text_encoder" / "model.fp16.safetensors",
        shapes_of(transformers_state(base, "text_encoder"), "F16"),
    )
    return folder


@pytest.fixture(scope="session")
def library(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("library")
    for model in MODELS:
        if model.rel in PICK:
            write_stripped(root / PICK[model.rel], model.tensors(), model.metadata)
    write_pipeline(root / "diffusers" / "stable-diffusion-v1-5")
    return root


@pytest.fixture
def registry(tmp_path: Path, library: Path) -> Iterator[Registry]:
    """A registry file with the library scanned into it (a copy of the library: tests may change it)."""
    root = tmp_path / "models"
    shutil.copytree(library, root, symlinks=True, copy_function=os.link)  # links keep the files sparse
    reg = Registry.open(tmp_path / "registry.sqlite3")
    Scanner(reg, [root]).scan()
    yield reg
    reg.close()


@pytest.fixture
def models_root(registry: Registry, tmp_path: Path) -> Path:
    return tmp_path / "models"
