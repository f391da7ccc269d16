"""Every file that ``scan`` reports as loadable loads: the whole demo set with its packed forms
(fp8, e5m2, scaled fp8, GGUF in every type) and a transformer-only Flux beside its parts, each
through the registry's load requests, then validated with a forward pass."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from modelkeeper.discovery.scanner import Scanner
from modelkeeper.orchestrator.loading import component_requests
from modelkeeper.registry.store import Registry
from modelkeeper.testing import DemoManifest
from modelkeeper.testing.demo import PACKED_ENTRY_NAMES, write_demo_models
from modelkeeper.worker import InProcessWorker

pytestmark = pytest.mark.usefixtures("one_torch_thread")

#: The packed set is validated (functional for the denoisers: what packing changes; header for the
#: parts); the plain demo set is only loaded here (its forms run forward in test_loading, test_pipeline).
FUNCTIONAL = ("unet", "transformer")


@pytest.fixture(scope="module")
def packed(tmp_path_factory: pytest.TempPathFactory) -> DemoManifest:
    root = tmp_path_factory.mktemp("packed-demo")
    return write_demo_models(root, only=[*PACKED_ENTRY_NAMES, "t5", "clip-l", "flux-vae"])


@pytest.fixture(scope="module")
def worker() -> Iterator[InProcessWorker]:
    with InProcessWorker("cpu") as w:
        yield w


def _loadable(manifest: DemoManifest, tmp_path: Path) -> list[tuple[str, list[dict[str, Any]]]]:
    """Each loadable file's load requests as the orchestrator builds them: files without a config
    of their own get their base's known config, which the worker fits to their (tiny) shapes."""
    registry = Registry.open(tmp_path / "registry.sqlite3")
    try:
        report = Scanner(registry, [manifest.root]).scan()
        out = []
        for entry in report.entries:
            record = registry.get(entry.model_id or "")
            if not record.identification.loadable or record.type in ("lora", "textual_inversion"):
                continue
            loads = component_requests(record, registry.worker_spec(record.id))
            out.append(
                (entry.path, [load.request.model_dump(mode="json", exclude_none=True) for load in loads])
            )
        return out
    finally:
        registry.close()


@pytest.mark.parametrize("which", ["packed", "demo"])
def test_every_loadable_file_loads_and_validates(
    worker: InProcessWorker, packed: DemoManifest, demo: DemoManifest, tmp_path: Path, which: str
) -> None:
    manifest = packed if which == "packed" else demo
    found = _loadable(manifest, tmp_path)
    assert len(found) >= (len(PACKED_ENTRY_NAMES) if which == "packed" else 15)
    failures = []
    for path, requests in found:
        names = []
        for i, request in enumerate(requests):
            name = f"walk-{i}"
            try:
                result = worker.call("model.load_model", {**request, "name": name})
            except Exception as exc:  # collected: one report lists every file that fails
                failures.append(f"{path} [{request.get('type')}]: load: {exc}")
                continue
            names.append(name)
            if result["type"] == "tokenizer" or which == "demo":
                continue
            level = "functional" if result["type"] in FUNCTIONAL else "header"
            report = worker.call("model.validate_model", {"name": name, "level": level})
            if not report["passed"]:
                failures.append(f"{path}: validate: {[c for c in report['checks'] if not c['passed']]}")
        for name in names:
            worker.call("model.unload_model", {"name": name})
    assert not failures, "\n".join(failures)
