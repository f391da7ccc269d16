"""Host memory that streamed weights may be copied from as they are: the page-locked RAM-cache
segments of a load (registered with CUDA here, once per segment). Weights elsewhere (read from disk,
cast) are copied once into a pinned buffer of their own by the streamer.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from pathlib import Path

import torch

from modelkeeper.worker.mapping import MappingTable, is_segment


def registered_host(
    files: Iterable[Path], table: MappingTable, device: torch.device
) -> Callable[[torch.Tensor], bool]:
    """Whether a host tensor lies in a page-locked RAM-cache segment of ``files`` (registered with
    CUDA here, once per segment): those stream as they are; others are pinned by a copy."""
    if device.type != "cuda":
        return lambda t: False
    ranges: list[tuple[int, int]] = []
    for path in files:
        if is_segment(path):
            mapping = table.get(path)
            mapping.register()
            if mapping.registered:
                ranges.append((mapping.host.data_ptr(), mapping.host.data_ptr() + mapping.host.numel()))
    return lambda t: any(start <= t.data_ptr() < end for start, end in ranges)
