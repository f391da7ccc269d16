from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import pytest
import torch

from modelkeeper.protocol import WorkerProcess
from modelkeeper.testing import DemoEntry, make_text_encoder, make_unet, make_vae
from modelkeeper.worker import InProcessWorker

UNET_KINDS = {("sd1", "normal"): "sd1", ("sd1", "inpaint"): "sd1_inpaint", ("sd2", "normal"): "sd2",
              ("sdxl", "normal"): "sdxl", ("sdxl_refiner", "normal"): "sdxl_refiner"}  # fmt: skip
VAE_KINDS = {"sd1": "sd1", "sd2": "sd1", "sdxl": "sdxl", "sd3": "sd3", "flux": "flux"}


def reference(entry: DemoEntry, kind: str) -> torch.nn.Module:
    """The module the demo factory built for ``entry`` (every saved form holds its tensors)."""
    if kind == "unet":
        return make_unet(UNET_KINDS[(str(entry.base), entry.variant)])  # type: ignore[arg-type]
    if kind == "vae":
        return make_vae(VAE_KINDS[str(entry.base)])  # type: ignore[arg-type]
    return make_text_encoder(entry.encoder)  # type: ignore[arg-type]


def assert_same_weights(loaded: torch.nn.Module, ref: torch.nn.Module) -> None:
    got = loaded.state_dict()
    want = ref.state_dict()
    assert set(got) == set(want)
    for key, tensor in want.items():
        assert torch.equal(got[key].cpu(), tensor.to(got[key].dtype)), key


def unique_bytes(module: torch.nn.Module, dtype: torch.dtype) -> int:
    seen: dict[int, int] = {}
    for t in [*module.parameters(), *module.buffers()]:
        size = dtype.itemsize if t.is_floating_point() else t.element_size()
        seen[t.data_ptr()] = t.numel() * size
    return sum(seen.values())


@pytest.fixture(scope="module")
def worker(worker_device: str) -> Iterator[WorkerProcess]:
    """A real worker subprocess shared by a test module; tests clean up what they load."""
    proc = WorkerProcess(worker_device)
    yield proc
    assert proc.stop() == 0


@pytest.fixture
def inproc(worker_device: str) -> Iterator[InProcessWorker]:
    with InProcessWorker(worker_device) as w:
        yield w


def load_data(entry: DemoEntry, root: Any, **extra: Any) -> dict[str, Any]:
    """A load request for ``entry``; single files without config metadata get the config explicitly."""
    data = {"name": entry.name, "path": str(root / entry.path), **extra}
    if entry.format == "safetensors" and not entry.config_metadata:
        data.setdefault("config", entry.config)
    return data


def src(demo: Any, name: str) -> dict[str, Any]:
    """``path`` (and ``config`` where the file carries none) of demo entry ``name``."""
    data = load_data(demo[name], demo.root)
    data.pop("name")
    return data


def output_cosine(module: torch.nn.Module, ref: torch.nn.Module, seed: int = 1) -> float:
    """Cosine similarity of the outputs of ``module`` and ``ref`` on the same example inputs."""
    from modelkeeper.worker.validate import probes

    with torch.inference_mode():
        got = probes(module, seed=seed)[0].run().float().flatten().cpu()
        want = probes(ref, seed=seed)[0].run().float().flatten().cpu()
    return float(torch.nn.functional.cosine_similarity(got, want, dim=0))
