"""Benchmarks of live modules loaded from the demo files: figures present and plausible."""

from __future__ import annotations

import math

import pytest
import torch

from modelkeeper.protocol import CommandType
from modelkeeper.testing import DemoManifest, make_unet
from modelkeeper.worker import InProcessWorker
from modelkeeper.worker.bench import BenchFigure, benchmark, native_resolution, percentile
from modelkeeper.worker.errors import InvalidRequest

from .conftest import load_data

pytestmark = pytest.mark.usefixtures("one_torch_thread")


def assert_plausible(figure: BenchFigure, device: str) -> None:
    assert figure.steps > 0 and figure.warmup >= 0
    assert 0 < figure.min_s <= figure.median_s <= figure.p90_s <= figure.max_s
    assert figure.min_s <= figure.mean_s <= figure.max_s
    assert math.isclose(figure.iterations_per_second, 1 / figure.median_s)
    assert math.isclose(figure.items_per_second, figure.batch / figure.median_s)
    assert figure.seconds >= figure.median_s * figure.steps * 0.5
    assert figure.peak_memory_bytes >= 0
    assert figure.memory_method == ("cuda.max_memory_allocated" if device.startswith("cuda") else "rss_delta")
    if device.startswith("cuda"):
        assert figure.peak_memory_bytes > 0  # activations always take some device memory


def test_loaded_models(inproc: InProcessWorker, demo: DemoManifest, worker_device: str) -> None:
    for name, command in (("sd15-unet", CommandType.LOAD_UNET), ("sd15-vae", CommandType.LOAD_VAE),
                          ("clip-l", CommandType.LOAD_ENCODER)):  # fmt: skip
        dtype = "float32" if worker_device == "cpu" else "float16"  # float16 convolutions are slow on CPUs
        inproc.call(command, load_data(demo[name], demo.root, dtype=dtype))
    unet = benchmark(inproc.module("sd15-unet"), steps=4, warmup=1)
    (forward,) = unet.figures
    assert unet.class_name == "UNet2DConditionModel" and unet.device == str(torch.device(worker_device))
    assert (
        forward.part == "forward"
        and forward.resolution == native_resolution(inproc.module("sd15-unet")) == 64
    )
    assert forward.output_shape == [1, 4, 8, 8] and forward.inputs["encoder_hidden_states"] == [1, 77, 768]
    assert forward.dtype == ("float32" if worker_device == "cpu" else "float16")
    assert_plausible(forward, worker_device)

    vae = benchmark(inproc.module("sd15-vae"), resolution=96, batch=2, steps=3, warmup=1)
    parts = {f.part: f for f in vae.figures}
    assert parts["encode"].output_shape == [2, 4, 12, 12] and parts["decode"].output_shape == [2, 3, 96, 96]
    for figure in vae.figures:
        assert_plausible(figure, worker_device)

    text = benchmark(inproc.module("clip-l"), steps=3, warmup=0, batch=2)
    (forward,) = text.figures
    assert forward.output_shape == [2, 77, 768] and forward.resolution is None and forward.tokens == 77
    assert_plausible(forward, worker_device)


def test_sdxl_unet_with_added_conditioning(worker_device: str) -> None:
    unet = make_unet("sdxl").to(worker_device)
    (figure,) = benchmark(unet, resolution=128, batch=2, steps=3, warmup=1, tokens=8).figures
    assert figure.output_shape == [2, 4, 16, 16]
    assert figure.inputs["added_cond_kwargs.text_embeds"] == [2, 1280]
    assert figure.inputs["added_cond_kwargs.time_ids"] == [2, 6]
    assert_plausible(figure, worker_device)


def test_percentile_is_nearest_rank() -> None:
    values = [5.0, 1.0, 4.0, 2.0, 3.0, 6.0, 7.0, 8.0, 9.0, 10.0]
    assert percentile(values, 90) == 9.0 and percentile(values, 50) == 5.0 and percentile(values, 100) == 10.0
    assert percentile([2.0], 90) == 2.0 and percentile([1.0, 2.0], 90) == 2.0


def test_bad_arguments_are_refused() -> None:
    unet = make_unet("sd1")
    with pytest.raises(InvalidRequest, match=r"data\.steps"):
        benchmark(unet, steps=0)
    with pytest.raises(InvalidRequest, match=r"data\.resolution"):
        benchmark(unet, resolution=100)
    with pytest.raises(InvalidRequest, match="cannot benchmark"):
        benchmark(torch.nn.Linear(2, 2))


def test_check_runs_before_each_pass_and_can_stop_a_long_benchmark() -> None:
    """Cancellation: ``check`` (the operation's) raises, and 10,000 passes stop at the third."""
    from modelkeeper.worker.errors import Cancelled

    calls = 0

    def check() -> None:
        nonlocal calls
        calls += 1
        if calls == 3:
            raise Cancelled("cancelled")

    with pytest.raises(Cancelled):
        benchmark(make_unet("sd1"), steps=10_000, warmup=0, step=lambda part, done, total: check())
    assert calls == 3
