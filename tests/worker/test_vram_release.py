"""An unload hands the freed VRAM back to the device: other processes on the GPU see it free.

The CUDA test loads a UNet of a few hundred MB in a real worker subprocess and reads the GPU's free
memory from this process (``torch.cuda.mem_get_info``), as another process on that GPU would:
``pytest tests/worker/test_vram_release.py --worker-device cuda:0``. On the CPU it is skipped, and
a test checks that unload, cleanup and optimize_memory all release the allocator's caches.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import torch

from modelkeeper.protocol import CommandType, WorkerProcess
from modelkeeper.testing import DemoManifest, make_unet
from modelkeeper.testing.files import save_single_file
from modelkeeper.worker import InProcessWorker
from modelkeeper.worker.errors import WorkerModelNotFound

MiB = 1 << 20
#: What may stay taken after the unload: the allocator's granularity, a stray small tensor.
TOLERANCE = 32 * MiB


def big_unet(path: Path) -> Path:
    """A float32 SD1-shaped UNet of two levels at full width (320, 640): 80 M parameters, 320 MB."""
    unet = make_unet(
        "sd1",
        block_out_channels=(320, 640),
        norm_num_groups=32,
        down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
        up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"),
    )
    return save_single_file(unet, path, dtype=None)


def free_bytes(device: torch.device) -> int:
    torch.cuda.synchronize(device)
    return int(torch.cuda.mem_get_info(device)[0])


def test_unload_hands_the_vram_back_to_the_gpu(
    worker_device: str, demo: DemoManifest, tmp_path: Path
) -> None:
    if not worker_device.startswith("cuda"):
        pytest.skip("needs a GPU: --worker-device cuda:0")
    device = torch.device(worker_device)
    path = big_unet(tmp_path / "unet.safetensors")
    small = {"name": "small", "path": str(demo.root / "unet/tiny-sd15-unet.safetensors")}
    with WorkerProcess(worker_device) as worker:
        # a first load and unload: the worker's context and one-time allocations are made before
        worker.call(CommandType.LOAD_UNET, small)
        worker.call(CommandType.UNLOAD_MODEL, {"name": "small"})
        before = free_bytes(device)
        loaded = worker.call(CommandType.LOAD_UNET, {"name": "big", "path": str(path)})
        assert str(loaded["device"]).startswith("cuda") and loaded["bytes"] > 256 * MiB
        during = free_bytes(device)
        assert before - during >= loaded["bytes"], "the weights are not on the GPU"
        worker.call(CommandType.UNLOAD_MODEL, {"name": "big"})
        after = free_bytes(device)
    assert before - after <= TOLERANCE, (
        f"{(before - after) / MiB:.0f} MiB of {loaded['bytes'] / MiB:.0f} MiB still taken after the unload"
    )


@pytest.mark.parametrize(
    ("command", "data"),
    [
        (CommandType.UNLOAD_MODEL, {"name": "unet"}),
        (CommandType.CLEANUP, {}),
        (CommandType.OPTIMIZE_MEMORY, {}),
    ],
)
def test_every_way_out_releases_the_allocator_caches(
    demo: DemoManifest, monkeypatch: pytest.MonkeyPatch, command: CommandType, data: dict[str, Any]
) -> None:
    with InProcessWorker("cpu") as worker:
        released: list[bool] = []  # whether the model was still loaded at each release
        memory = worker.service.memory
        real = memory.release_caches

        def release() -> None:
            try:
                worker.service.get("unet")
                released.append(True)
            except WorkerModelNotFound:
                released.append(False)
            real()

        monkeypatch.setattr(memory, "release_caches", release)
        worker.call(
            CommandType.LOAD_UNET,
            {"name": "unet", "path": str(demo.root / "unet/tiny-sd15-unet.safetensors")},
        )
        worker.call(command, data)
        if command is not CommandType.OPTIMIZE_MEMORY:
            assert released == [False], "released before the model was dropped, or not at all"
        else:
            assert released, "optimize_memory did not release the caches"
