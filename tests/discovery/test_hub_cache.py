"""A Hugging Face Hub cache scans as one model per repo, named org/name, with its revision; an
install's staging folder is never scanned. The cache is written by huggingface_hub itself
(``hf_hub_download`` / ``snapshot_download``) from the fake Hub, so the layout is the real one."""

from __future__ import annotations

import shutil
from pathlib import Path

from huggingface_hub import hf_hub_download, snapshot_download

from modelkeeper.discovery.walker import hub_origin
from modelkeeper.formats.conventions import INSTALL_STAGING_DIR
from modelkeeper.registry.store import Registry
from modelkeeper.testing.demo import write_demo_models
from modelkeeper.testing.hubserver import FakeHub

from .conftest import scan


def test_hub_cache_is_one_model_per_repo_at_its_current_revision(tmp_path: Path, registry: Registry) -> None:
    demo = tmp_path / "demo"
    write_demo_models(demo, only=["sd15-pipeline", "sd15-vae", "sd15-lora-kohya"])
    cache = tmp_path / "hub"
    with FakeHub() as hub:
        hub.add_repo("tiny/sd15", demo / "diffusers" / "tiny-sd15")
        hub.add_repo("tiny/lora", {"lora.safetensors": demo / "loras" / "tiny-sd15-kohya.safetensors"})
        snapshot_download("tiny/sd15", endpoint=hub.url, cache_dir=cache, token=False)
        hf_hub_download("tiny/lora", "lora.safetensors", endpoint=hub.url, cache_dir=cache, token=False)
        old = hub.repos["tiny/lora"].commit
        # A new revision of the LoRA repo: a second snapshot; refs/main moves to it.
        hub.add_repo("tiny/lora", {"lora.safetensors": demo / "vae" / "tiny-sd15-vae.safetensors"})
        hf_hub_download("tiny/lora", "lora.safetensors", endpoint=hub.url, cache_dir=cache, token=False)
        new = hub.repos["tiny/lora"].commit
    assert new != old and (cache / "models--tiny--lora" / "snapshots" / old).is_dir()

    report = scan(registry, cache)
    ok = {e.path: e for e in report.entries if e.status == "ok"}
    assert sorted(ok) == [
        f"models--tiny--lora/snapshots/{new}/lora.safetensors",
        f"models--tiny--sd15/snapshots/{hub.repos['tiny/sd15'].commit}",
    ]
    by_name = {registry.get(e.model_id).name: registry.get(e.model_id) for e in ok.values() if e.model_id}
    assert sorted(by_name) == ["tiny/lora", "tiny/sd15"]
    assert by_name["tiny/lora"].meta.found["hub"] == {"repo": "tiny/lora", "revision": new}
    assert by_name["tiny/lora"].type == "vae"  # the current revision's content, not the old LoRA
    assert by_name["tiny/sd15"].meta.found["hub"]["revision"] == hub.repos["tiny/sd15"].commit


def test_hub_origin_of_paths() -> None:
    origin = hub_origin("hub/models--org--name/snapshots/abc123/unet/model.safetensors")
    assert origin is not None
    assert (origin.repo_id, origin.revision, origin.inner) == ("org/name", "abc123", "unet/model.safetensors")
    assert hub_origin("loras/models--x.safetensors") is None


def test_install_staging_folder_is_not_scanned(tmp_path: Path, registry: Registry) -> None:
    demo = tmp_path / "demo"
    write_demo_models(demo, only=["sd15-vae"])
    root = tmp_path / "models"
    staged = root / INSTALL_STAGING_DIR / "k" / "files"
    staged.mkdir(parents=True)
    shutil.copy(demo / "vae" / "tiny-sd15-vae.safetensors", staged / "vae.safetensors")
    (root / "vae").mkdir()
    shutil.copy(demo / "vae" / "tiny-sd15-vae.safetensors", root / "vae" / "done.safetensors")
    assert [e.path for e in scan(registry, root).entries] == ["vae/done.safetensors"]
