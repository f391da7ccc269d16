"""Benchmarks of live modules: real forward passes at a resolution, batch and step count.

Each callable part of a module is timed on its own: a UNet / transformer forward (one denoising
step), a VAE encode and decode, a text encoder forward. ``warmup`` untimed passes first (allocator,
kernels, ``torch.compile``), then ``steps`` timed passes, each synchronised on CUDA. Reported per
part: median, p90 (nearest rank), mean, min and max seconds per pass, passes per second
(``1 / median``), items per second (``batch / median``), and the peak memory the passes needed on
top of what was allocated before (``torch.cuda.max_memory_allocated`` on CUDA; on the CPU the
peak process RSS, sampled every millisecond, minus the RSS before).

Why: placement and budgets need real figures for each model on each device, and optimisations
(:mod:`modelkeeper.worker.optimize`) need a before/after comparison.

Proposed protocol: ``model.benchmark_model`` data ``{name, resolution?, batch: 1, steps: 10,
warmup: 2, tokens?}``; result :meth:`BenchReport.as_dict` ``{class_name, device, figures: [{part,
dtype, batch, resolution, tokens, inputs, output_shape, warmup, steps, median_s, p90_s, mean_s,
min_s, max_s, iterations_per_second, items_per_second, peak_memory_bytes, memory_method,
seconds}], seconds}``.
"""

from __future__ import annotations

import math
import statistics
import threading
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from typing import Any

import psutil
import torch

from modelkeeper.worker.errors import InvalidRequest
from modelkeeper.worker.validate import Probe, Step, no_step, probes


@dataclass
class BenchFigure:
    """The timing of one part of a module (``forward``, ``encode``, ``decode``)."""

    part: str
    dtype: str
    batch: int
    resolution: int | None
    tokens: int | None
    inputs: dict[str, list[int]]
    output_shape: list[int]
    warmup: int
    steps: int
    median_s: float
    p90_s: float
    mean_s: float
    min_s: float
    max_s: float
    iterations_per_second: float
    items_per_second: float
    peak_memory_bytes: int
    memory_method: str
    seconds: float


@dataclass
class BenchReport:
    class_name: str
    device: str
    figures: list[BenchFigure]
    seconds: float

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)


def percentile(values: list[float], q: float) -> float:
    """Nearest-rank percentile (``q`` in 0..100): always one of the values, never below the median
    of an odd-sized sample."""
    ordered = sorted(values)
    return ordered[max(0, math.ceil(q / 100 * len(ordered)) - 1)]


def native_resolution(module: torch.nn.Module) -> int:
    """The pixel size the model was made for (``sample_size`` of its config), else 512."""
    cfg: Any = getattr(module, "config", None)
    size = getattr(cfg, "sample_size", None) if cfg is not None else None
    if not isinstance(size, int):
        return 512
    return size if type(module).__name__.startswith("Autoencoder") else size * 8


def default_tokens(module: torch.nn.Module) -> int:
    """77 for CLIP (its context), 256 for T5, 77 for denoisers' text context."""
    cfg: Any = getattr(module, "config", None)
    if type(module).__name__ == "T5EncoderModel":
        return 256
    return int(getattr(cfg, "max_position_embeddings", 77) or 77)


def benchmark(
    module: torch.nn.Module,
    *,
    resolution: int | None = None,
    batch: int = 1,
    steps: int = 10,
    warmup: int = 2,
    tokens: int | None = None,
    seed: int = 0,
    step: Step = no_step,
) -> BenchReport:
    """Time every part of ``module`` where it lives (see the module docstring). ``step`` runs before
    each pass (the part, the passes done and in all) and may raise (cancellation: a long benchmark
    stops within one pass)."""
    for field, value, low in (("batch", batch, 1), ("steps", steps, 1), ("warmup", warmup, 0)):
        if value < low:
            raise InvalidRequest(f"data.{field}: must be at least {low}, got {value}")
    if resolution is not None and (resolution <= 0 or resolution % 8):
        raise InvalidRequest(f"data.resolution: must be a positive multiple of 8, got {resolution}")
    started = time.perf_counter()
    name = type(module).__name__
    is_text = "Text" in name or name.startswith("T5")
    resolution = None if is_text else (resolution or native_resolution(module))
    tokens = tokens or default_tokens(module)
    parts = probes(module, batch=batch, resolution=resolution, tokens=tokens, seed=seed)
    if not parts:
        raise InvalidRequest(f"data.name: cannot benchmark a {name} (no example inputs for this class)")
    device = next((p.device for p in module.parameters()), torch.device("cpu"))
    passes = warmup + steps
    figures = [
        _measure(
            p,
            device,
            batch,
            resolution,
            tokens,
            steps,
            warmup,
            _counted(step, i * passes, len(parts) * passes),
        )
        for i, p in enumerate(parts)
    ]
    return BenchReport(name, str(device), figures, round(time.perf_counter() - started, 6))


def _counted(step: Step, before: int, total: int) -> Callable[[str, int], None]:
    """``step`` for one part: its pass ``i`` counted after the ``before`` passes of earlier parts."""
    return lambda part, i: step(part, before + i, total)


class _PeakMemory:
    """Peak memory over a block: CUDA's allocator peak, or the sampled process RSS on the CPU."""

    def __init__(self, device: torch.device) -> None:
        self.device = device
        self.method = "cuda.max_memory_allocated" if device.type == "cuda" else "rss_delta"
        self._process = psutil.Process()
        self._stop = threading.Event()
        self._peak = 0
        self._start = 0
        self._thread: threading.Thread | None = None

    def __enter__(self) -> _PeakMemory:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
            torch.cuda.reset_peak_memory_stats(self.device)
            self._start = torch.cuda.memory_allocated(self.device)
        else:
            self._start = self._peak = self._process.memory_info().rss
            self._thread = threading.Thread(target=self._sample, name="bench-rss", daemon=True)
            self._thread.start()
        return self

    def _sample(self) -> None:
        while not self._stop.wait(0.001):
            self._peak = max(self._peak, self._process.memory_info().rss)

    def __exit__(self, *exc: object) -> None:
        if self._thread is not None:
            self._stop.set()
            self._thread.join()
            self._peak = max(self._peak, self._process.memory_info().rss)
        else:
            self._peak = torch.cuda.max_memory_allocated(self.device)

    @property
    def extra_bytes(self) -> int:
        return max(0, self._peak - self._start)


def _measure(
    probe: Probe,
    device: torch.device,
    batch: int,
    resolution: int | None,
    tokens: int,
    steps: int,
    warmup: int,
    step: Callable[[str, int], None],
) -> BenchFigure:
    cuda = device.type == "cuda"
    times: list[float] = []
    started = time.perf_counter()
    out: torch.Tensor | None = None
    with torch.inference_mode(), _PeakMemory(device) as memory:
        for i in range(warmup + steps):
            step(probe.name, i)
            if cuda:
                torch.cuda.synchronize(device)
            begin = time.perf_counter()
            out = probe.run()
            if cuda:
                torch.cuda.synchronize(device)
            if i >= warmup:
                times.append(time.perf_counter() - begin)
    assert out is not None
    median = statistics.median(times)
    return BenchFigure(
        part=probe.name, dtype=str(out.dtype).removeprefix("torch."), batch=batch, resolution=resolution,
        tokens=tokens, inputs=probe.inputs, output_shape=list(out.shape), warmup=warmup, steps=steps,
        median_s=median, p90_s=percentile(times, 90), mean_s=statistics.fmean(times), min_s=min(times),
        max_s=max(times), iterations_per_second=1.0 / median, items_per_second=batch / median,
        peak_memory_bytes=memory.extra_bytes, memory_method=memory.method,
        seconds=round(time.perf_counter() - started, 6),
    )  # fmt: skip


__all__ = ["BenchFigure", "BenchReport", "benchmark", "default_tokens", "native_resolution", "percentile"]
