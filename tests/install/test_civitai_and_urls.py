"""Installing from the (fake) CivitAI and from plain URLs."""

from __future__ import annotations

import socket
from pathlib import Path

import pytest

from modelkeeper.install import (
    AccessDenied,
    ChecksumMismatch,
    DownloadFailed,
    Installer,
    InsufficientDisk,
    RemoteNotFound,
    SourceUnreachable,
    UnsafeSource,
)
from modelkeeper.protocol.errors import ErrorCode
from modelkeeper.testing.civitaiserver import FakeCivitai
from modelkeeper.testing.hubserver import FakeHub, sha256_of
from tests.install.conftest import CHECKPOINT, MiB, files_under, make_installer

LORA = "tiny-sd15-kohya.safetensors"


def test_version_id_installs_the_primary_file_by_type(
    civitai: FakeCivitai, installer: Installer, root: Path
) -> None:
    result = installer.install("civitai:123", root)
    assert result.kind == "civitai" and result.revision == "123" and result.model_type == "lora"
    assert result.path == root / "loras" / LORA
    assert result.files[0].sha256 == civitai.versions[123].sha256
    assert result.path.read_bytes() == civitai.versions[123].local.read_bytes()


def test_model_page_urls(civitai: FakeCivitai, installer: Installer, root: Path) -> None:
    pinned = installer.install(f"{civitai.url}/models/1230/tiny?modelVersionId=123", root)
    assert pinned.revision == "123"
    latest = installer.install(f"{civitai.url}/models/1230", root)  # newest version: the VAE
    assert latest.revision == "124" and latest.path == root / "vae" / "tiny-sd15-vae.safetensors"


def test_missing_version_and_model(installer: Installer, root: Path) -> None:
    with pytest.raises(RemoteNotFound, match="civitai:999: not found"):
        installer.install("civitai:999", root)
    with pytest.raises(RemoteNotFound, match="CivitAI model 5: not found"):
        installer.install("https://civitai.com/models/5", root)


def test_token_required(
    civitai: FakeCivitai, hub: FakeHub, tmp_path: Path, installer: Installer, root: Path
) -> None:
    with pytest.raises(AccessDenied, match=r"civitai:200: access denied \(401\)"):
        installer.install("civitai:200", root)
    assert files_under(root, partials=True) == []
    with make_installer(hub, civitai, tmp_path, civitai_token=civitai.token) as authed:
        civitai.fault(CHECKPOINT).flip_byte_at = 5
        with pytest.raises(ChecksumMismatch) as failure:
            authed.install("civitai:200", root)
        assert civitai.token not in str(failure.value) and civitai.token not in repr(failure.value.details)
        civitai.faults.clear()
        assert authed.install("civitai:200", root).path == root / "checkpoints" / CHECKPOINT
    # the token went to the API host only, not to the storage host the download redirects to
    assert all("authorization" not in r.headers for r in civitai.requests if r.path.startswith("/storage/"))


def test_declared_hash_that_does_not_match(
    civitai: FakeCivitai, installer: Installer, root: Path, demo_small: Path
) -> None:
    civitai.add_version(300, demo_small / "loras" / LORA, model_type="LORA", sha256="ab" * 32)
    with pytest.raises(
        ChecksumMismatch,
        match=f"civitai:300: SHA-256 mismatch: expected {'ab' * 32}, got {civitai.versions[123].sha256}",
    ):
        installer.install("civitai:300", root)
    assert files_under(root, partials=True) == []


def test_download_redirect_to_another_scheme(civitai: FakeCivitai, installer: Installer, root: Path) -> None:
    civitai.fault(LORA).redirect_to = "file:///etc/passwd"
    with pytest.raises(UnsafeSource, match="to a file: URL refused"):
        installer.install("civitai:123", root)


def blob_url(hub: FakeHub, repo: str, name: str) -> str:
    """A file of the fake Hub as a plain URL (its "CDN" host is no Hub host)."""
    return f"{hub.cdn_url}/cdn/{hub.repos[repo].files[name].sha256}"


def test_plain_url_with_and_without_a_checksum(
    hub: FakeHub, installer: Installer, root: Path, demo_small: Path
) -> None:
    url = blob_url(hub, "tiny/lora", LORA)
    local = demo_small / "loras" / LORA
    result = installer.install(url, root)
    assert result.kind == "url" and result.model_type == "main" and result.revision is None
    assert result.path == root / "checkpoints" / LORA and result.path.read_bytes() == local.read_bytes()
    checked = installer.install(url, root, model_type="lora", sha256=sha256_of(local))
    assert checked.path == root / "loras" / LORA
    with pytest.raises(ChecksumMismatch):
        installer.install(url, root / "x", sha256="00" * 32)


def test_plain_url_resumes_with_if_range(hub: FakeHub, tmp_path: Path, root: Path) -> None:
    url = blob_url(hub, "tiny/checkpoint", CHECKPOINT)
    size = hub.repos["tiny/checkpoint"].files[CHECKPOINT].size
    hub.fault(CHECKPOINT).drop_after = size // 2
    with make_installer(hub, None, tmp_path, retries=0) as installer:
        with pytest.raises(DownloadFailed, match="connection failed"):
            installer.install(url, root, name=CHECKPOINT)
        mark = len(hub.requests)
        installer.install(url, root, name=CHECKPOINT)
    assert sum(r.served for r in hub.requests[mark:]) <= size - size // 2 + MiB
    assert any(r.headers.get("if-range") for r in hub.requests)


def test_url_with_another_scheme(installer: Installer, root: Path) -> None:
    with pytest.raises(UnsafeSource):
        installer.install("ftp://127.0.0.1/x.safetensors", root)


def test_url_without_a_size_is_bounded_by_the_free_disk(hub: FakeHub, tmp_path: Path, root: Path) -> None:
    hub.fault(CHECKPOINT).no_length = True  # neither HEAD nor GET says how long it is
    url = blob_url(hub, "tiny/checkpoint", CHECKPOINT)
    with make_installer(hub, None, tmp_path, free_bytes=lambda _path: 3 * MiB) as installer:
        assert installer.resolve(url).files[0].size is None
        with pytest.raises(InsufficientDisk, match=r"no size declared and more than the 3,145,728 bytes"):
            installer.install(url, root)
    assert files_under(root, partials=True) == []
    with make_installer(hub, None, tmp_path) as installer:
        assert (
            installer.install(url, root).path.stat().st_size
            == hub.repos["tiny/checkpoint"].files[CHECKPOINT].size
        )


def test_a_source_no_connection_reaches_is_unreachable(tmp_path: Path, root: Path) -> None:
    """No network, no such host, a refused connection: UNREACHABLE (a 502), not the TIMEOUT of a
    transfer that broke off, for the Hub, CivitAI and a plain URL alike."""
    with socket.socket() as s:  # a port nothing listens on: the connection is refused
        s.bind(("127.0.0.1", 0))
        closed = f"http://127.0.0.1:{s.getsockname()[1]}"
    settings = {"hub_endpoint": closed, "hub_token": False, "hub_cache_dir": tmp_path / "hf",
                "civitai_endpoint": closed, "civitai_token": False, "retry_delay_s": 0.0}  # fmt: skip
    with Installer(**settings) as installer:  # type: ignore[arg-type]
        for source, where in (("tiny/checkpoint", f"the Hub at {closed}"), ("civitai:34", f"CivitAI at {closed}"),
                              (f"{closed.replace('127.0.0.1', 'localhost')}/{CHECKPOINT}", "cannot connect")):  # fmt: skip
            with pytest.raises(SourceUnreachable, match=where) as refused:
                installer.install(source, root)
            assert refused.value.code is ErrorCode.UNREACHABLE and refused.value.recoverable
