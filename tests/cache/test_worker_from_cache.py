"""Workers load from RAM-cache segments: bitwise equal to safetensors' own loader, mapped with no copy."""

from __future__ import annotations

import json
import os
from collections.abc import Iterator
from pathlib import Path

import psutil
import pytest
import torch
from safetensors.torch import load_file, save_file

from modelkeeper.cache import RamCache
from modelkeeper.protocol import CommandType, WorkerProcess
from modelkeeper.testing import DemoManifest
from modelkeeper.worker import InProcessWorker
from modelkeeper.worker.validate import probes
from tests.worker.conftest import src

MiB = 1 << 20


@pytest.fixture
def cache() -> Iterator[RamCache]:
    c = RamCache(2 << 30)
    yield c
    c.close()


@pytest.mark.parametrize(
    ("name", "kind"), [("sdxl-unet", "unet"), ("clip-g", "text_encoder"), ("sd15-vae", "vae")]
)
def test_load_from_segment_equals_load_from_file(
    cache: RamCache, demo: DemoManifest, worker_device: str, name: str, kind: str
) -> None:
    source = src(demo, name)
    seg = cache.cache_file(source["path"], model=name)
    with InProcessWorker(worker_device) as w:
        result = w.call(
            CommandType.LOAD_MODEL, {**source, "name": "cached", "path": str(seg.path), "type": kind}
        )
        assert result["source"]["path"] == str(seg.path)
        w.call(CommandType.LOAD_MODEL, {**source, "name": "file", "type": kind})
        got, want = w.module("cached").state_dict(), w.module("file").state_dict()
        assert set(got) == set(want)
        for k, v in want.items():
            assert torch.equal(got[k].cpu(), v.cpu()), k
        assert w.call(CommandType.RELEASE_SEGMENTS)["released"] == [str(seg.path)]


@pytest.fixture(scope="module")
def packed(tmp_path_factory: pytest.TempPathFactory) -> DemoManifest:
    from modelkeeper.testing import write_demo_models

    names = ("sdxl-unet-fp8-scaled", "flux-transformer-fp8-e4m3fn", "flux-transformer-q4_k")
    return write_demo_models(tmp_path_factory.mktemp("packed"), only=names)


@pytest.mark.parametrize(
    "name", ["sdxl-unet-fp8-scaled", "flux-transformer-fp8-e4m3fn", "flux-transformer-q4_k"]
)
def test_packed_loads_from_a_segment_equal_loads_from_the_file(
    cache: RamCache, packed: DemoManifest, worker_device: str, name: str
) -> None:
    """Packed forms, one with a key conversion (ComfyUI's scaled fp8 SDXL in the checkpoint layout):
    on a GPU the copy from the segment is still running while the module is built (the load waits
    for it at the end: ``settle``), and the weights equal a load from the file."""
    source = src(packed, name)
    kind = "unet" if "unet" in name else "transformer"
    seg = cache.cache_file(source["path"], model=name)
    with InProcessWorker(worker_device) as w:
        cached = w.call(
            CommandType.LOAD_MODEL, {**source, "name": "cached", "path": str(seg.path), "type": kind}
        )
        assert "settle" in cached["timings"]
        from_file = w.call(CommandType.LOAD_MODEL, {**source, "name": "file", "type": kind})
        assert cached["storage"] == from_file["storage"] and cached["bytes"] == from_file["bytes"]
        got, want = w.module("cached").state_dict(), w.module("file").state_dict()
        assert set(got) == set(want)
        for k, v in want.items():
            assert torch.equal(got[k].cpu(), v.cpu()), k
        with torch.inference_mode():
            assert torch.equal(*(probes(w.module(n), seed=1)[0].run().cpu() for n in ("cached", "file")))
        w.call(CommandType.UNLOAD_MODEL, {"name": "cached"})
        w.call(CommandType.UNLOAD_MODEL, {"name": "file"})
        assert w.call(CommandType.RELEASE_SEGMENTS)["released"] == [str(seg.path)]


def test_segment_tensors_of_a_diffusers_layout_file_equal_load_file(
    cache: RamCache, demo: DemoManifest
) -> None:
    path = demo.path("sdxl-vae")  # diffusers layout: the module's tensors are the file's tensors
    seg = cache.cache_file(path)
    want = load_file(str(path))
    with InProcessWorker("cpu") as w:
        w.call(CommandType.LOAD_VAE, {"name": "v", "path": str(seg.path)})
        got = w.module("v").state_dict()
        assert set(got) == set(want)
        for k, v in want.items():
            assert torch.equal(got[k], v), k


def test_cpu_tensors_are_views_of_the_mapping(cache: RamCache, demo: DemoManifest) -> None:
    seg = cache.cache_file(demo.path("sdxl-vae"))
    with InProcessWorker("cpu") as w:
        w.call(CommandType.LOAD_VAE, {"name": "v", "path": str(seg.path)})
        mapping = w.service.mappings.mappings[seg.path]
        lo = mapping.host.data_ptr()
        hi = lo + mapping.host.numel()
        for p in w.module("v").parameters():
            assert lo <= p.data_ptr() < hi


def test_a_stopped_worker_drops_its_models_and_releases_its_segments(
    cache: RamCache, demo: DemoManifest
) -> None:
    """A CUDA worker page-locks each segment it maps; one that ended with its mappings still held would
    leave those ranges registered when they are collected, poisoning the addresses for the next
    mapping in the process. Stopping closes the service: models dropped, every segment released."""
    seg = cache.cache_file(demo.path("sdxl-vae"))
    w = InProcessWorker("cpu")
    w.call(CommandType.LOAD_VAE, {"name": "v", "path": str(seg.path)})
    mapping = w.service.mappings.mappings[seg.path]
    w.stop()
    assert w.service.mappings.mappings == {}
    assert mapping.closed
    assert w.service.model_count() == 0


@pytest.fixture(scope="module")
def big_unet_file(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A ~150 MB UNet (real key names and shapes, constant weights): big enough that a copy would
    show in a process's memory. Built on the meta device, so it costs no init time."""
    from accelerate import init_empty_weights
    from diffusers import UNet2DConditionModel

    from modelkeeper.testing import unet_config

    config = unet_config("sd1", block_out_channels=(320, 640), layers_per_block=1, attention_head_dim=8)
    with init_empty_weights():
        unet = UNet2DConditionModel(**config)
    tensors = {k: torch.full(v.shape, 0.01, dtype=torch.float16) for k, v in unet.state_dict().items()}
    path = tmp_path_factory.mktemp("big") / "unet.safetensors"
    save_file(tensors, str(path), metadata={"modelkeeper.config": json.dumps(dict(unet.config))})
    return path


def test_two_workers_map_one_segment_without_copying(
    cache: RamCache, big_unet_file: Path, demo: DemoManifest
) -> None:
    seg = cache.cache_file(big_unet_file)
    assert seg.size > 80 * MiB
    workers = [WorkerProcess("cpu") for _ in range(2)]
    try:
        for w in workers:  # imports and allocator warm-up do not count
            w.call(CommandType.LOAD_UNET, {"name": "warm", **src(demo, "sd15-unet")})
        before = [psutil.Process(w.pid).memory_full_info().uss for w in workers]
        for w in workers:
            result = w.call(CommandType.LOAD_UNET, {"name": "u", "path": str(seg.path)})
            assert result["bytes"] >= seg.size - (1 << 20)
        after = [psutil.Process(w.pid).memory_full_info().uss for w in workers]
        for b, a in zip(before, after, strict=True):
            assert a - b < seg.size * 0.25, (
                f"unique memory grew by {(a - b) / MiB:.1f} MiB for a {seg.size / MiB:.1f} MiB segment"
            )
    finally:
        for w in workers:
            w.stop()
    assert os.path.exists(seg.path)


def test_cpu_models_outlive_the_release_of_their_segment(cache: RamCache, demo: DemoManifest) -> None:
    seg = cache.cache_file(demo.path("sdxl-vae"))
    with InProcessWorker("cpu") as w:
        w.call(CommandType.LOAD_VAE, {"name": "v", "path": str(seg.path)})
        want = {k: v.clone() for k, v in w.module("v").state_dict().items()}
        assert w.call(CommandType.RELEASE_SEGMENTS)["released"] == [str(seg.path)]
        cache.drop(seg.component_id)  # the file is gone too; the pages live while the model does
        got = w.module("v").state_dict()
        for k, v in want.items():
            assert torch.equal(got[k], v), k
        result = w.call(CommandType.VALIDATE_MODEL, {"name": "v", "level": "functional"})
        assert result["passed"] is True
        assert w.call(CommandType.RELEASE_SEGMENTS)["released"] == []
