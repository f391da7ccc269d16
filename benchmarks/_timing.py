"""Timing on a device, for the benchmark scripts (``from _timing import ...``: a script's own folder
is on the path when it runs as ``python benchmarks/x.py``).

- :func:`timed`: the wall seconds of one call, the device synchronised before and after (a CUDA
  call returns before its kernels finish).
- :func:`median_seconds`: the median of repeated calls after untimed warm-ups (a denoising step).
- :func:`switch_rounds`: the seconds of a LoRA's apply, strength change and removal, round after round.
"""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable
from functools import partial
from typing import Any

import torch

#: What :func:`switch_rounds` times, in the order it calls them each round.
SWITCHES = ("apply", "strength", "remove")


def sync(device: torch.device) -> None:
    """Wait for the work queued on ``device`` (nothing to wait for on the CPU)."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def timed(fn: Callable[[], Any], device: torch.device) -> float:
    """Seconds of ``fn()``, from an idle ``device`` to its work being done."""
    sync(device)
    started = time.perf_counter()
    fn()
    sync(device)
    return time.perf_counter() - started


def median_seconds(fn: Callable[[], Any], device: torch.device, repeats: int, warmups: int = 0) -> float:
    """The median seconds of ``repeats`` calls of ``fn``, after ``warmups`` untimed ones (allocator,
    kernel choice and caches settle in those)."""
    for _ in range(warmups):
        fn()
    return statistics.median(timed(fn, device) for _ in range(repeats))


def switch_rounds(
    device: torch.device,
    repeats: int,
    apply: Callable[[int], Any],
    strength: Callable[[int], Any],
    remove: Callable[[int], Any],
    warmups: int = 0,
) -> dict[str, list[float]]:
    """``{"apply": [...], "strength": [...], "remove": [...]}``: the seconds of each of ``repeats``
    rounds, a round being ``apply(i)``, ``strength(i)`` and ``remove(i)`` for round ``i``. The first
    ``warmups`` rounds run the same way and are not counted (``i`` counts them: the first counted
    round is ``i == warmups``)."""
    out: dict[str, list[float]] = {name: [] for name in SWITCHES}
    for i in range(warmups + repeats):
        seconds = [timed(partial(step, i), device) for step in (apply, strength, remove)]
        if i >= warmups:
            for name, value in zip(SWITCHES, seconds, strict=True):
                out[name].append(value)
    return out


def medians(rounds: dict[str, list[float]]) -> dict[str, float]:
    """The median of each list of seconds, by the same key."""
    return {key: statistics.median(values) for key, values in rounds.items()}
