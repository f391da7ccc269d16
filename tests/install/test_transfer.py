"""The receive path: a body of known length read straight from the socket, any other through httpx,
and an install from a fake Hub in a process of its own (as the benchmark runs it)."""

from __future__ import annotations

import contextlib
from pathlib import Path

import httpx

from modelkeeper.install import Installer
from modelkeeper.install.transfer import _plain_socket, open_stream
from modelkeeper.testing.hubserver import FakeHub, HubProcess, sha256_of
from tests.install.conftest import CHECKPOINT


def test_only_a_plain_body_of_known_length_is_read_from_the_socket(hub: FakeHub) -> None:
    url = f"{hub.cdn_url}/cdn/{hub.repos['tiny/checkpoint'].files[CHECKPOINT].sha256}"
    with httpx.Client() as client:
        with contextlib.closing(open_stream(client, url, {}, what="t")) as response:
            assert _plain_socket(response) is not None
        hub.fault(CHECKPOINT).no_length = True  # delimited by the connection's end: h11 decides
        with contextlib.closing(open_stream(client, url, {}, what="t")) as response:
            assert _plain_socket(response) is None


def test_install_from_a_hub_in_another_process(demo_small: Path, tmp_path: Path) -> None:
    local = demo_small / "checkpoints" / CHECKPOINT
    with HubProcess({"tiny/checkpoint": {CHECKPOINT: local}}) as process:
        assert process.sha256 == {CHECKPOINT: sha256_of(local)}
        with Installer(hub_endpoint=process.url, hub_token=False, hub_cache_dir=tmp_path / "hf") as installer:
            result = installer.install("tiny/checkpoint", tmp_path / "models")
    assert result.files[0].sha256 == sha256_of(local)
    assert result.path.read_bytes() == local.read_bytes()
