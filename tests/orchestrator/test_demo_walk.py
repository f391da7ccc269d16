"""Every file that ``scan`` reports as loadable loads through the service: the whole demo set with
its packed forms (fp8, scaled fp8, GGUF, a transformer-only Flux) and a pickle ``.ckpt`` (with the
cache off too: ``test_orchestrator.test_a_pickle_checkpoint_loads_on_first_use``), scanned
into a real SQLite registry, each model loaded by the orchestrator on an in-process CPU worker and
unloaded again. Single files without a config of their own (the tiny SDXL UNet and SD1 VAE) load
with the config their shapes imply. A worker's error about a file it read from a RAM-cache segment
names the user's file, not the segment."""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator, Callable, Coroutine
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import pytest
import torch
from safetensors.torch import load_file

from modelkeeper.formats.conventions import CONFIG_METADATA_KEY
from modelkeeper.orchestrator import Orchestrator, Settings
from modelkeeper.protocol.errors import ErrorCode, ProtocolError
from modelkeeper.registry import ModelRecord
from modelkeeper.testing import DemoManifest, write_demo_models
from modelkeeper.testing.files import write_safetensors
from modelkeeper.worker import InProcessWorker

from .test_orchestrator import MiB

pytestmark = [
    pytest.mark.xdist_group("demo-walk"),
    pytest.mark.slow,
    pytest.mark.usefixtures("one_torch_thread"),
]

CKPT = "checkpoints/tiny-sd15.ckpt"
#: What a worker cannot load alone: LoRAs and embeddings are applied to a loaded model.
APPLIED = ("lora", "textual_inversion")


@pytest.fixture
def one_torch_thread() -> Any:
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def everything(tmp_path_factory: pytest.TempPathFactory) -> DemoManifest:
    """The demo set with every optional and packed form, and the SD1 checkpoint as a pickle."""
    root = tmp_path_factory.mktemp("walk")
    manifest = write_demo_models(root, extras=True)
    state = load_file(root / "checkpoints/tiny-sd15.safetensors")
    torch.save({"state_dict": state, "global_step": 1}, root / CKPT)
    return manifest


@asynccontextmanager
async def serving(root: Path, tmp: Path, **overrides: Any) -> AsyncIterator[Orchestrator]:
    settings = Settings(
        **{
            "devices": ["cpu"],
            "model_roots": [root],
            "db": tmp / "registry.sqlite3",
            "ram_cache_bytes": 512 * MiB,
            "hash_on_start": False,
            "worker_warm": False,
            "status_poll_s": 60,
            **overrides,
        }
    )
    orch = Orchestrator(settings, worker_factory=InProcessWorker.start)
    await orch.start()
    try:
        for job in orch.jobs.list(kind="scan"):
            await orch.jobs.wait(job)
        yield orch
    finally:
        await orch.stop()


def run(body: Callable[[], Coroutine[Any, Any, None]]) -> None:
    """``body`` on an event loop of its own, bounded by pytest's own timeout only: the walk does ~50
    loads, and a busy shared machine stretches its 20 s of CPU (a tighter bound raced the load)."""
    asyncio.run(body())


async def _served(orch: Orchestrator) -> list[ModelRecord]:
    page = await orch.catalog.search(limit=1000)
    assert page.total == len(page.items)
    return [await orch.catalog.get(item.id) for item in page.items]


def test_every_loadable_model_loads_through_the_service(everything: DemoManifest, tmp_path: Path) -> None:
    async def body() -> None:
        async with serving(everything.root, tmp_path) as orch:
            records = await _served(orch)
            # the registry calls a LoRA or an embedding loadable (a worker reads it), to be applied to a
            # loaded model: loaded alone, it is refused as such
            loadable = [r for r in records if r.identification.loadable and r.type not in APPLIED]
            applied = [r for r in records if r.type in APPLIED]
            assert len(loadable) >= 40 and any(r.path and r.path.endswith(CKPT) for r in loadable)
            assert len(applied) == 10
            for record in applied:
                with pytest.raises(ProtocolError) as refused:
                    await orch.loads.load(record.id, "cpu")
                assert refused.value.code is ErrorCode.UNSUPPORTED_FORMAT, record.path
            failures = []
            for record in loadable:
                try:
                    await orch.loads.load(record.id, "cpu")
                except ProtocolError as exc:  # collected: one report names every file that fails
                    failures.append(f"{record.path} ({record.type}, {record.format}): {exc}")
                    continue
                await orch.loads.unload(record.id)
            assert not failures, "\n".join(failures)
            assert not orch.view.placements

    run(body)


def test_an_error_names_the_users_file_not_the_cache_segment(tmp_path: Path) -> None:
    """A UNet whose own config disagrees with its tensors, read from its segment (``cache_fill =
    "before"``): the worker refuses it, and the message names the registered file."""
    source = write_demo_models(tmp_path / "demo", only=["sd15-unet"]).path("sd15-unet")
    config = json.loads(_metadata(source)[CONFIG_METADATA_KEY]) | {"cross_attention_dim": 1024}
    root = tmp_path / "models"
    bad = write_safetensors(
        load_file(source),
        root / "unet" / "odd-unet.safetensors",
        metadata={CONFIG_METADATA_KEY: json.dumps(config)},
    )

    async def body() -> None:
        async with serving(root, tmp_path, cache_fill="before") as orch:
            record = await orch.catalog.resolve("unet/odd-unet.safetensors")
            with pytest.raises(ProtocolError) as err:
                await orch.loads.load(record.id, "cpu")
            assert err.value.code is ErrorCode.INVALID_MODEL_FILE
            assert str(bad) in err.value.message and "shapes do not match" in err.value.message
            assert "modelkeeper-" not in err.value.message
            assert err.value.details["path"] == str(bad) and "modelkeeper-" not in json.dumps(
                err.value.details
            )
            failed = [e for e in orch.bus.recent if e["type"] == "model.failed"]
            assert failed and str(bad) in failed[-1]["error"] and "modelkeeper-" not in failed[-1]["error"]

    run(body)


def _metadata(path: Path) -> dict[str, str]:
    from safetensors import safe_open

    with safe_open(str(path), framework="pt") as handle:
        return dict(handle.metadata() or {})
