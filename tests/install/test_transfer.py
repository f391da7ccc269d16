"""The receive path: a body of known length read straight from the socket (plain or TLS), any other
through httpx, and an install from a fake Hub in a process of its own (as the benchmark runs it)."""

from __future__ import annotations

import contextlib
import ssl
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
import trustme

from modelkeeper.install import Installer
from modelkeeper.install.body import _plain_socket
from modelkeeper.install.plan import RemoteFile
from modelkeeper.install.streams import open_stream
from modelkeeper.install.transfer import Fetched, fetch
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


@pytest.fixture
def tls_hub(demo_small: Path) -> Iterator[tuple[FakeHub, ssl.SSLContext]]:
    """The fake Hub over HTTPS (a certificate for 127.0.0.1 and localhost from a test CA) and a
    client context that trusts it."""
    ca = trustme.CA()
    server_context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    ca.issue_cert("127.0.0.1", "localhost").configure_cert(server_context)
    client_context = ssl.create_default_context()
    ca.configure_trust(client_context)
    with FakeHub(tls=server_context) as hub:
        hub.add_repo("tiny/checkpoint", {CHECKPOINT: demo_small / "checkpoints" / CHECKPOINT})
        yield hub, client_context


def test_https_body_is_read_from_the_tls_socket_and_resumes(
    tls_hub: tuple[FakeHub, ssl.SSLContext], tmp_path: Path
) -> None:
    hub, context = tls_hub
    entry = hub.repos["tiny/checkpoint"].files[CHECKPOINT]
    assert entry.sha256 is not None
    url = f"{hub.cdn_url}/cdn/{entry.sha256}"
    assert url.startswith("https://localhost:")
    hub.fault(CHECKPOINT).drop_after = entry.size // 2  # past the first chunk: mid-socket
    remote = RemoteFile(CHECKPOINT, url, entry.size, entry.sha256)
    with httpx.Client(verify=context) as client:
        with contextlib.closing(open_stream(client, url, {}, what="t")) as response:
            assert isinstance(_plain_socket(response), ssl.SSLSocket)
        hub.fault(CHECKPOINT).drop_times = 1
        fetched = fetch(
            client,
            remote,
            tmp_path / "part",
            what="t",
            on_bytes=lambda _n: None,
            cancelled=lambda: False,
            retry_delay_s=0.0,
        )
    assert fetched == Fetched(entry.sha256, entry.size, entry.size)
    assert (tmp_path / "part").read_bytes() == entry.local.read_bytes()
    assert [r.headers.get("range") for r in hub.requests[-2:]] == [None, f"bytes={entry.size // 2}-"]
