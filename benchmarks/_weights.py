"""Random weights for full-size models in the benchmark scripts (``from _weights import ...``: a
script's own folder is on the path when it runs as ``python benchmarks/x.py``)."""

from __future__ import annotations

from typing import TypeVar

import torch

M = TypeVar("M", bound=torch.nn.Module)


def random_weights(module: M, device: torch.device, dtype: torch.dtype) -> M:
    """``module``, built on the meta device (no memory yet), with ``dtype`` weights drawn on ``device``
    (no CPU init, no copy: a full-size model in seconds), the same on every call: each matrix normal
    with a standard deviation of 1/sqrt(fan-in), norm weights one, every other vector zero."""
    module = torch.nn.Module.to(module, dtype=dtype).to_empty(device=device)
    generator = torch.Generator(device=device).manual_seed(0)
    with torch.no_grad():
        for name, p in module.named_parameters():
            if p.dim() >= 2:
                p.normal_(0, p[0].numel() ** -0.5, generator=generator)
            else:
                p.fill_(1.0 if name.endswith("weight") and "norm" in name else 0.0)
    return module
