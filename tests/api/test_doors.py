"""The API's doors: loopback by default, bearer token, Host allowlist, no CORS, body size limit,
paths confined to the model roots."""

from __future__ import annotations

from collections.abc import Iterator

import httpx
import pytest

from modelkeeper.client import ApiError, Client
from modelkeeper.orchestrator import Settings
from modelkeeper.testing.service import RunningService
from tests.api.conftest import SD15, ServiceFactory

TOKEN = "s3cret-token-for-tests"


@pytest.fixture(scope="module")
def guarded(make_service: ServiceFactory) -> Iterator[RunningService]:
    with make_service(token=TOKEN, max_body_bytes=4096, hash_on_start=False) as running:
        yield running


def test_defaults_bind_loopback_and_refuse_exposure_without_token() -> None:
    s = Settings()
    assert s.host == "127.0.0.1" and s.loopback and s.token is None and s.cors_origins == []
    s.check_exposure()
    with pytest.raises(ValueError, match="token"):
        Settings(host="0.0.0.0").check_exposure()
    Settings(host="0.0.0.0", token="t").check_exposure()


def test_bearer_token_required(guarded: RunningService) -> None:
    assert httpx.get(f"{guarded.url}/health/live").status_code == 200  # the liveness probe is open
    for headers in ({}, {"Authorization": "Bearer wrong"}, {"Authorization": TOKEN}):
        r = httpx.get(f"{guarded.url}/api/model/status", headers=headers)
        assert r.status_code == 401 and r.json()["error_code"] == "UNAUTHORIZED"
        assert r.headers["www-authenticate"].startswith("Bearer")
    with Client(guarded.url, token="wrong") as wrong, pytest.raises(ApiError) as err:
        wrong.status()
    assert err.value.status_code == 401
    with Client(guarded.url, token=TOKEN) as c:
        assert c.status()["ready"] is True
        assert "modelkeeper_jobs" in c.metrics()


def test_host_header_allowlist(guarded: RunningService) -> None:
    ok = {"Authorization": f"Bearer {TOKEN}"}
    assert httpx.get(f"{guarded.url}/health/ready", headers=ok).status_code == 200
    for host in ("evil.example.com", "attacker.test:8765", "192.168.1.10"):
        r = httpx.get(f"{guarded.url}/health/ready", headers={**ok, "Host": host})
        assert r.status_code == 400, host
    assert (
        httpx.get(
            f"{guarded.url}/health/ready", headers={**ok, "Host": f"localhost:{guarded.port}"}
        ).status_code
        == 200
    )


def test_no_cors_by_default(guarded: RunningService) -> None:
    r = httpx.options(
        f"{guarded.url}/api/model/status",
        headers={"Origin": "https://evil.example.com", "Access-Control-Request-Method": "GET"},
    )
    assert "access-control-allow-origin" not in r.headers
    r = httpx.get(
        f"{guarded.url}/api/model/status",
        headers={"Origin": "https://evil.example.com", "Authorization": f"Bearer {TOKEN}"},
    )
    assert "access-control-allow-origin" not in r.headers


def test_body_size_limit(guarded: RunningService) -> None:
    headers = {"Authorization": f"Bearer {TOKEN}", "Content-Type": "application/json"}
    big = b'{"query": "' + b"x" * 10_000 + b'"}'
    r = httpx.post(f"{guarded.url}/api/model/search", content=big, headers=headers)
    assert r.status_code == 413 and r.json()["error_code"] == "BODY_TOO_LARGE"

    def chunks() -> Iterator[bytes]:  # no Content-Length: counted as it streams
        yield b'{"query": "'
        for _ in range(10):
            yield b"y" * 1000
        yield b'"}'

    r = httpx.post(f"{guarded.url}/api/model/search", content=chunks(), headers=headers)
    assert r.status_code == 413
    small = httpx.post(f"{guarded.url}/api/model/search", json={"query": "tiny"}, headers=headers)
    assert small.status_code == 200


def test_paths_must_resolve_inside_the_model_roots(
    guarded: RunningService, tmp_path_factory: pytest.TempPathFactory
) -> None:
    root = guarded.service.catalog.roots[0]
    outside = tmp_path_factory.mktemp("outside")
    (outside / "secret.safetensors").write_bytes(b"\0" * 16)
    link = root / "escape-link.safetensors"
    link.symlink_to(outside / "secret.safetensors")
    try:
        with Client(guarded.url, token=TOKEN) as c:
            for ref in ("/etc/passwd", str(link), f"{root}/../{outside.name}/secret.safetensors"):
                with pytest.raises(ApiError) as err:
                    c.load_on("cpu", ref)
                assert err.value.status_code == 403, ref
                assert "outside every model root" in err.value.message
            assert c.model(SD15)["type"] == "main"  # a relative path inside a root resolves
            # found by the fuzzer: a NUL byte made realpath raise (500); now a named 422
            with pytest.raises(ApiError) as err:
                c.unload("/\x00", "0")
            assert err.value.status_code == 422
            assert "NUL byte" in err.value.message
    finally:
        link.unlink()
