"""Every file that ``scan`` reports as loadable loads through the service: the whole demo set with
its packed forms (fp8, scaled fp8, GGUF, a transformer-only Flux) and a pickle ``.ckpt`` (with the
cache off too: ``test_orchestrator.test_a_pickle_checkpoint_loads_on_first_use``), scanned
into a real SQLite registry, each model loaded by the orchestrator on an in-process CPU worker and
unloaded again. A LoRA is loadable in that a worker reads it: each one is applied to a loaded model
of its base (while the walk holds that model) and removed, the weights changed while it is on and
exactly restored after. Embeddings are not loadable (no worker reads them alone), and the model
detail says what the worker spec says. Single files without a config of their own (the tiny SDXL
UNet and SD1 VAE) load with the config their shapes imply. A worker's error about a file it read
from a RAM-cache segment names the user's file, not the segment."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from modelkeeper.formats.conventions import CONFIG_METADATA_KEY
from modelkeeper.orchestrator import Orchestrator
from modelkeeper.protocol.commands import CommandType
from modelkeeper.protocol.errors import ErrorCode, ProtocolError
from modelkeeper.protocol.messages import ModelInfoRequest, ModelInfoResult
from modelkeeper.registry import ModelRecord
from modelkeeper.testing import DemoManifest, write_demo_models
from modelkeeper.testing.files import write_safetensors

from .conftest import MiB, run, serving

pytestmark = [
    pytest.mark.xdist_group("demo-walk"),
    pytest.mark.slow,
    pytest.mark.usefixtures("one_torch_thread"),
]

CKPT = "checkpoints/tiny-sd15.ckpt"
#: What a worker cannot load alone: LoRAs and embeddings are applied to a loaded model.
APPLIED = ("lora", "textual_inversion")
#: What a LoRA is applied to, in order of preference: a whole pipeline of its base, then a lone denoiser.
LORA_TARGETS = ("main", "unet", "transformer")
#: The cache of the walk's service: the whole set with its packed forms.
RAM_CACHE = {"ram_cache_bytes": 512 * MiB}
#: A test's bound: pytest's own timeout only. The walk does ~50 loads, and a busy shared machine
#: stretches its 20 s of CPU (a tighter bound raced the load).
WALK_TIMEOUT = None


@pytest.fixture(scope="module")
def everything(tmp_path_factory: pytest.TempPathFactory) -> DemoManifest:
    """The demo set with every optional and packed form, and the SD1 checkpoint as a pickle."""
    root = tmp_path_factory.mktemp("walk")
    manifest = write_demo_models(root, extras=True)
    state = load_file(root / "checkpoints/tiny-sd15.safetensors")
    torch.save({"state_dict": state, "global_step": 1}, root / CKPT)
    return manifest


async def _served(orch: Orchestrator) -> list[ModelRecord]:
    page = await orch.catalog.search(limit=1000)
    assert page.total == len(page.items)
    return [await orch.catalog.get(item.id) for item in page.items]


def test_every_loadable_model_loads_through_the_service(everything: DemoManifest, tmp_path: Path) -> None:
    async def body() -> None:
        async with serving(everything, tmp_path, **RAM_CACHE) as orch:
            records = await _served(orch)
            loadable = [r for r in records if r.identification.loadable and r.type != "lora"]
            loras = [r for r in records if r.type == "lora"]
            embeddings = [r for r in records if r.type == "textual_inversion"]
            assert len(loadable) >= 40 and any(r.path and r.path.endswith(CKPT) for r in loadable)
            assert (len(loras), len(embeddings)) == (6, 4)
            await _loadable_is_what_the_worker_spec_says(orch, records, embeddings)
            for record in loras + embeddings:  # applied to a loaded model: alone, refused as such
                with pytest.raises(ProtocolError) as refused:
                    await orch.loads.load(record.id, "cpu")
                assert refused.value.code is ErrorCode.INVALID_REQUEST, record.path  # before any job
                assert (
                    "is a LoRA: apply it" if record.type == "lora" else "embedding"
                ) in refused.value.message
            applied_to, failures = _lora_targets(loadable, loras)
            for record in loadable:
                try:
                    await orch.loads.load(record.id, "cpu")
                except ProtocolError as exc:  # collected: one report names every file that fails
                    failures.append(f"{record.path} ({record.type}, {record.format}): {exc}")
                    failures += [
                        f"{lora.path}: not applied, {record.path} failed" for lora in applied_to[record.id]
                    ]
                    continue
                for lora in applied_to[record.id]:  # while the walk holds its model: no load of its own
                    failures += await _apply_and_remove(orch, record, lora)
                await orch.loads.unload(record.id)
            assert not failures, "\n".join(failures)
            assert not orch.view.placements

    run(body, timeout=WALK_TIMEOUT)


async def _loadable_is_what_the_worker_spec_says(
    orch: Orchestrator, records: list[ModelRecord], embeddings: list[ModelRecord]
) -> None:
    """The model detail's ``loadable`` (the identification's) is the worker spec's for every model;
    an embedding (no component a worker loads) is not loadable."""
    for record in records:
        spec = await orch.catalog.db(orch.catalog.registry.worker_spec, record.id)
        assert record.identification.loadable is spec["loadable"], record.path
    for record in embeddings:
        detail = await orch.views.model_detail(record.id)
        assert detail["identification"]["loadable"] is False, record.path


def _lora_targets(
    loadable: list[ModelRecord], loras: list[ModelRecord]
) -> tuple[dict[str, list[ModelRecord]], list[str]]:
    """The LoRAs to apply to each loadable model (each LoRA onto one model of its base, a pipeline
    before a lone denoiser), and a failure naming each LoRA whose base has no model in the set."""
    applied_to: dict[str, list[ModelRecord]] = {r.id: [] for r in loadable}
    orphans = []
    for lora in loras:
        bases = [r for r in loadable if r.base == lora.base and r.type in LORA_TARGETS]
        if not bases:
            orphans.append(f"{lora.path} (lora, {lora.base}): no loadable {lora.base} model to apply it to")
            continue
        target = min(bases, key=lambda r: (LORA_TARGETS.index(r.type), r.name, r.path or ""))
        applied_to[target.id].append(lora)
    return applied_to, orphans


async def _apply_and_remove(orch: Orchestrator, target: ModelRecord, lora: ModelRecord) -> list[str]:
    """Apply ``lora`` to the loaded ``target`` and remove it: every key of the file patches a weight,
    the weights change while it is on and are the same bytes after. The failures, each named."""
    where = f"{lora.path} on {target.path}"
    before = await _fingerprints(orch)
    try:
        (result,) = (await orch.loras.apply(target.id, lora.id))["applied"]
        during = await _fingerprints(orch)
        await orch.loras.remove(target.id, lora.id)
    except ProtocolError as exc:
        return [f"{where}: {exc}"]
    after = await _fingerprints(orch)
    problems = []
    if not result["params_patched"] or result["unmatched_keys"]:
        problems.append(
            f"{where}: {result['params_patched']} weights patched, unmatched {result['unmatched']}"
        )
    if during == before:
        problems.append(f"{where}: applied, the weights did not change")
    if after != before:
        problems.append(f"{where}: removed, the weights are not restored")
    return problems


async def _fingerprints(orch: Orchestrator) -> dict[str, str]:
    """A content hash of each loaded module's live weights on the CPU worker."""
    info = await orch.pool.slot("cpu").call(
        CommandType.GET_MODEL_INFO, ModelInfoRequest(fingerprint=True), ModelInfoResult
    )
    return {m.name: str(getattr(m, "fingerprint", "")) for m in info.models}


def test_an_error_names_the_users_file_not_the_cache_segment(tmp_path: Path) -> None:
    """A UNet whose own config disagrees with its tensors, read from its segment (``cache_fill =
    "before"``): the worker refuses it, and the message names the registered file."""
    demo = write_demo_models(tmp_path / "demo", only=["sd15-unet"])
    source = demo.path("sd15-unet")
    config = json.loads(_metadata(source)[CONFIG_METADATA_KEY]) | {"cross_attention_dim": 1024}
    root = tmp_path / "models"
    bad = write_safetensors(
        load_file(source),
        root / "unet" / "odd-unet.safetensors",
        metadata={CONFIG_METADATA_KEY: json.dumps(config)},
    )

    async def body() -> None:
        async with serving(demo, tmp_path, model_roots=[root], cache_fill="before", **RAM_CACHE) as orch:
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

    run(body, timeout=WALK_TIMEOUT)


def _metadata(path: Path) -> dict[str, str]:
    from safetensors import safe_open

    with safe_open(str(path), framework="pt") as handle:
        return dict(handle.metadata() or {})
