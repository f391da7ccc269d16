"""Installs through the service: ``POST /api/model/install`` (a job), ``Client.install`` and
``modelkeeper pull``, against the fake Hub and CivitAI servers (real HTTP on 127.0.0.1)."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest
from typer.testing import CliRunner

from modelkeeper.cli import app
from modelkeeper.client import ApiError
from modelkeeper.testing.civitaiserver import FakeCivitai
from modelkeeper.testing.hubserver import FakeHub
from modelkeeper.testing.service import RunningService
from tests.api.conftest import ServiceFactory, checked_client

CHECKPOINT = "tiny-sd15.safetensors"


@pytest.fixture(scope="module")
def servers(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[FakeHub, FakeCivitai]]:
    from modelkeeper.testing import write_demo_models

    demo = tmp_path_factory.mktemp("install-src")
    write_demo_models(demo, only=("sd15-checkpoint", "sd15-lora-kohya"))
    with FakeHub() as hub, FakeCivitai() as civitai:
        hub.add_repo("tiny/checkpoint", {CHECKPOINT: demo / "checkpoints" / CHECKPOINT})
        civitai.add_version(
            123, demo / "loras" / "tiny-sd15-kohya.safetensors", model_id=1230, model_type="LORA"
        )
        yield hub, civitai


@pytest.fixture(scope="module")
def svc(
    make_service: ServiceFactory,
    servers: tuple[FakeHub, FakeCivitai],
    tmp_path_factory: pytest.TempPathFactory,
) -> Iterator[RunningService]:
    hub, civitai = servers
    root = tmp_path_factory.mktemp("install-root")
    with make_service(root=root, hub_endpoint=hub.url, civitai_endpoint=civitai.url) as running:
        yield running


def test_install_from_the_hub_registers_the_model(svc: RunningService) -> None:
    root = Path(svc.service.catalog.roots[0])
    with checked_client(svc) as c:
        done = c.install(f"tiny/checkpoint:{CHECKPOINT}")
        result = done["result"]
        assert done["job"]["kind"] == "install" and done["job"]["state"] == "succeeded"
        assert result["kind"] == "hub" and result["revision"] and result["type"] == "main"
        assert Path(result["path"]).is_relative_to(root) and Path(result["path"]).is_file()
        model = c.model(result["model_id"])
        assert model["file"]["hashes"]["sha256"] == result["files"][0]["sha256"]
        # the same content again: nothing fetched, the registered file is reused
        again = c.install(f"tiny/checkpoint:{CHECKPOINT}", name="copy.safetensors")["result"]
        assert again["transferred_bytes"] == 0 and again["files"][0]["reused"]


def test_install_errors_write_nothing(svc: RunningService) -> None:
    root = Path(svc.service.catalog.roots[0])
    before = sorted(p.relative_to(root) for p in root.rglob("*") if p.is_file())
    with checked_client(svc) as c:
        with pytest.raises(ApiError) as err:
            c.install("tiny/nope")
        assert err.value.status_code in (401, 404, 422) and "tiny/nope" in err.value.message, (
            err.value.message
        )
        with pytest.raises(ApiError) as err:
            c.install("ftp://example.invalid/model.safetensors")
        assert err.value.status_code == 422
    after = sorted(
        p.relative_to(root) for p in root.rglob("*") if p.is_file() and ".modelkeeper-partial" not in p.parts
    )
    assert after == before


def test_pull_from_civitai_with_the_cli(svc: RunningService) -> None:
    result = CliRunner().invoke(app, ["pull", "civitai:123"], env={"MODELKEEPER_URL": svc.url})
    assert result.exit_code == 0, result.output
    assert "installed" in result.output and "(lora)" in result.output
