"""Installing from the (fake) Hub: what lands where, revisions, errors that write nothing."""

from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
from pathlib import Path

import pytest
from huggingface_hub import hf_hub_download

from modelkeeper.install import (
    AccessDenied,
    ChecksumMismatch,
    DestinationExists,
    Installer,
    InstallProgress,
    RemoteNotFound,
    UnsafeSource,
)
from modelkeeper.testing.hubserver import FakeHub
from tests.install.conftest import CHECKPOINT, files_under, make_installer


def sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def test_diffusers_repo_lands_as_one_folder(
    hub: FakeHub, installer: Installer, root: Path, demo_small: Path
) -> None:
    source = demo_small / "diffusers" / "tiny-sd15"
    events: list[InstallProgress] = []
    result = installer.install("tiny/sd15", root, progress=events.append)
    assert result.path == root / "diffusers" / "sd15"
    assert result.kind == "hub" and result.model_type == "main"
    assert result.revision == hub.repos["tiny/sd15"].commit
    expected = sorted(p.relative_to(source).as_posix() for p in source.rglob("*") if p.is_file())
    assert sorted(f.relative for f in result.files) == expected
    for f in result.files:
        assert f.path.read_bytes() == (source / f.relative).read_bytes()
        assert f.sha256 == sha256(source / f.relative) and not f.reused
    assert files_under(root, partials=True) == sorted(f"diffusers/sd15/{n}" for n in expected)
    done = [e.done_bytes for e in events]
    assert done == sorted(done) and events[-1].phase == "done"
    assert events[-1].done_bytes == events[-1].total_bytes == result.size


def test_single_file_repo_goes_to_the_folder_of_its_type(
    installer: Installer, root: Path, demo_small: Path
) -> None:
    result = installer.install("tiny/checkpoint", root)
    assert result.path == root / "checkpoints" / CHECKPOINT
    assert result.path.read_bytes() == (demo_small / "checkpoints" / CHECKPOINT).read_bytes()
    lora = installer.install("tiny/lora", root)  # the repo's "lora" tag
    assert lora.model_type == "lora" and lora.path == root / "loras" / "tiny-sd15-kohya.safetensors"


def test_subfolder_and_single_file_of_a_repo(installer: Installer, root: Path, demo_small: Path) -> None:
    vae = installer.install("tiny/sd15:vae", root)
    assert vae.path == root / "diffusers" / "sd15-vae"
    assert sorted(f.relative for f in vae.files) == ["config.json", "diffusion_pytorch_model.safetensors"]
    unet = installer.install(
        "tiny/sd15:unet/diffusion_pytorch_model.safetensors",
        root,
        model_type="unet",
        name="sd15-unet.safetensors",
    )
    assert unet.path == root / "unet" / "sd15-unet.safetensors"
    assert (
        unet.path.read_bytes()
        == (demo_small / "diffusers/tiny-sd15/unet/diffusion_pytorch_model.safetensors").read_bytes()
    )


def test_configurable_folders(hub: FakeHub, tmp_path: Path, root: Path) -> None:
    with make_installer(hub, None, tmp_path, folders={"main": "Stable-diffusion"}) as installer:
        assert installer.install("tiny/checkpoint", root).path == root / "Stable-diffusion" / CHECKPOINT


def test_pinned_revision_and_a_missing_one(hub: FakeHub, installer: Installer, root: Path) -> None:
    commit = hub.repos["tiny/checkpoint"].commit
    assert installer.install(f"tiny/checkpoint@{commit}", root).revision == commit
    with pytest.raises(RemoteNotFound, match=r"tiny/checkpoint: revision 'nope' not found"):
        installer.install("tiny/checkpoint@nope", root / "other")
    assert not (root / "other").exists()


def test_missing_repo_and_file(hub: FakeHub, tmp_path: Path, installer: Installer, root: Path) -> None:
    # Anonymous: the Hub answers 401 for a missing repo as for a private one.
    with pytest.raises(AccessDenied, match=r"tiny/nope: not found, or private \(401\)"):
        installer.install("tiny/nope", root)
    with (
        make_installer(hub, None, tmp_path, hub_token=hub.token) as authed,
        pytest.raises(RemoteNotFound, match="tiny/nope: repository not found"),
    ):
        authed.install("tiny/nope", root)
    with pytest.raises(
        RemoteNotFound, match=r"tiny/sd15:nope.safetensors: no file or folder 'nope.safetensors'"
    ):
        installer.install("tiny/sd15:nope.safetensors", root)
    assert files_under(root, partials=True) == []


def test_gated_and_private_repos_need_a_token(
    hub: FakeHub, tmp_path: Path, installer: Installer, root: Path
) -> None:
    with pytest.raises(AccessDenied, match="tiny/gated: gated repo") as gated:
        installer.install("tiny/gated", root)
    assert gated.value.code == "INVALID_REQUEST"
    with pytest.raises(AccessDenied, match="tiny/private"):
        installer.install("tiny/private", root)
    assert files_under(root, partials=True) == []
    with make_installer(hub, None, tmp_path, hub_token=hub.token) as authed:
        assert authed.install("tiny/gated", root).path.is_file()
        assert authed.install("tiny/private", root / "b").path.is_file()


def test_token_never_in_errors_logs_or_progress(
    hub: FakeHub, tmp_path: Path, root: Path, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.DEBUG)
    hub.fault(CHECKPOINT).flip_byte_at = 10
    events: list[InstallProgress] = []
    with make_installer(hub, None, tmp_path, hub_token=hub.token) as authed:
        plan = authed.resolve("tiny/gated")
        with pytest.raises(ChecksumMismatch) as failure:
            authed.install("tiny/gated", root, progress=events.append)
    serialised = json.dumps(dataclasses.asdict(plan), default=str)
    assert "SecretHeaders(" in serialised
    shown = [
        serialised,
        str(failure.value),
        repr(failure.value),
        repr(failure.value.__dict__),
        repr(plan),
        caplog.text,
        *map(repr, events),
    ]
    assert all(hub.token not in text for text in shown)
    assert any(r.headers.get("authorization") == f"Bearer {hub.token}" for r in hub.requests)


def test_hostile_listing_writes_nothing(hub: FakeHub, installer: Installer, root: Path) -> None:
    for name in ("../evil.safetensors", "/etc/evil.safetensors", "a/../../evil.safetensors"):
        hub.repos["tiny/sd15"].extra_listing = [{"rfilename": name, "size": 4, "blobId": "0" * 40}]
        with pytest.raises(UnsafeSource, match="tiny/sd15"):
            installer.install("tiny/sd15", root)
    assert files_under(root, partials=True) == []


def test_redirect_to_another_scheme_is_refused(hub: FakeHub, installer: Installer, root: Path) -> None:
    hub.fault(CHECKPOINT).redirect_to = "ftp://127.0.0.1/tiny-sd15.safetensors"
    with pytest.raises(UnsafeSource, match=r"redirect .* to a ftp: URL refused"):
        installer.install("tiny/checkpoint", root)
    assert files_under(root, partials=True) == []


def test_destination_with_other_content_is_kept(installer: Installer, root: Path) -> None:
    target = root / "checkpoints" / CHECKPOINT
    target.parent.mkdir()
    target.write_bytes(b"someone else's file")
    with pytest.raises(DestinationExists, match=str(target)):
        installer.install("tiny/checkpoint", root)
    assert target.read_bytes() == b"someone else's file"


def test_huggingface_hub_itself_downloads_from_the_fake_hub(
    hub: FakeHub, tmp_path: Path, demo_small: Path
) -> None:
    """The fake speaks the contract huggingface_hub relies on (HEAD metadata, CDN redirect, ranges)."""
    path = hf_hub_download(
        "tiny/sd15", "unet/config.json", endpoint=hub.url, cache_dir=tmp_path / "c", token=False
    )
    assert Path(path).read_bytes() == (demo_small / "diffusers/tiny-sd15/unet/config.json").read_bytes()
    path = hf_hub_download(
        "tiny/checkpoint", CHECKPOINT, endpoint=hub.url, cache_dir=tmp_path / "c", token=False
    )
    assert Path(path).read_bytes() == (demo_small / "checkpoints" / CHECKPOINT).read_bytes()
    assert f"/models--tiny--checkpoint/snapshots/{hub.repos['tiny/checkpoint'].commit}/" in path
