"""Fixtures of the install tests: a subset of the demo models published on a fake Hub and a fake
CivitAI (real HTTP on 127.0.0.1), and an installer pointed at them with no token."""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path

import pytest

from modelkeeper.install import PARTIAL_DIR, Installer
from modelkeeper.testing.civitaiserver import FakeCivitai
from modelkeeper.testing.hubserver import FakeHub

DEMO_ENTRIES = ("sd15-pipeline", "sd15-checkpoint", "sd15-lora-kohya", "sd15-vae")
CHECKPOINT = "tiny-sd15.safetensors"
MiB = 1024 * 1024


@pytest.fixture(scope="session")
def demo_small(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A few demo models (a diffusers pipeline, a checkpoint, a LoRA, a VAE), written once."""
    from modelkeeper.testing import write_demo_models

    root = tmp_path_factory.mktemp("install-demo")
    write_demo_models(root, only=DEMO_ENTRIES)
    return root


@pytest.fixture
def hub(demo_small: Path) -> Iterator[FakeHub]:
    with FakeHub() as server:
        server.add_repo("tiny/sd15", demo_small / "diffusers" / "tiny-sd15")
        server.add_repo("tiny/checkpoint", {CHECKPOINT: demo_small / "checkpoints" / CHECKPOINT})
        server.add_repo(
            "tiny/lora",
            {"tiny-sd15-kohya.safetensors": demo_small / "loras" / "tiny-sd15-kohya.safetensors"},
            tags=["lora"],
        )
        server.add_repo("tiny/gated", {CHECKPOINT: demo_small / "checkpoints" / CHECKPOINT}, gated=True)
        server.add_repo("tiny/private", {CHECKPOINT: demo_small / "checkpoints" / CHECKPOINT}, private=True)
        yield server


@pytest.fixture
def civitai(demo_small: Path) -> Iterator[FakeCivitai]:
    with FakeCivitai() as server:
        server.add_version(
            123, demo_small / "loras" / "tiny-sd15-kohya.safetensors", model_id=1230, model_type="LORA"
        )
        server.add_version(
            124, demo_small / "vae" / "tiny-sd15-vae.safetensors", model_id=1230, model_type="VAE"
        )
        server.add_version(
            200, demo_small / "checkpoints" / CHECKPOINT, model_type="Checkpoint", token_required=True
        )
        yield server


def make_installer(hub: FakeHub, civitai: FakeCivitai | None, tmp_path: Path, **options: object) -> Installer:
    settings: dict[str, object] = {
        "hub_endpoint": hub.url,
        "hub_token": False,
        "hub_cache_dir": tmp_path / "hf-cache",
        "civitai_endpoint": civitai.url if civitai is not None else "http://127.0.0.1:9",
        "civitai_token": False,
        "reserve_bytes": 0,
        "retry_delay_s": 0.0,
    }
    settings.update(options)
    return Installer(**settings)  # type: ignore[arg-type]


@pytest.fixture
def installer(hub: FakeHub, civitai: FakeCivitai, tmp_path: Path) -> Iterator[Installer]:
    with make_installer(hub, civitai, tmp_path) as inst:
        yield inst


@pytest.fixture
def root(tmp_path: Path) -> Path:
    path = tmp_path / "models"
    path.mkdir()
    return path


def files_under(root: Path, *, partials: bool = False) -> list[str]:
    """Every file under ``root`` (relative), without the staging folder unless ``partials``."""
    found = []
    for folder, _dirs, names in os.walk(root):
        rel = os.path.relpath(folder, root)
        if not partials and (rel == PARTIAL_DIR or rel.startswith(PARTIAL_DIR + os.sep)):
            continue
        found += [os.path.normpath(os.path.join(rel, n)) for n in names]
    return sorted(found)
