"""GGUF decoding of one Flux-size weight, per quant type: modelkeeper's decoders
(``modelkeeper.worker.storage.dequant.fused``) against diffusers' functions followed by the cast to
the compute dtype (what ``GGUFLinear`` runs), in one run.

Usage: python benchmarks/dequant.py [--device cuda:0] [--shape 3072,12288] [--dtype bfloat16]
       [--types Q8_0,Q6_K,Q5_K,Q4_K,Q5_0,Q4_0] [--repeats 20] [--out FILE]

Per type: the median milliseconds of one decode (the device synchronised around each), the output
GB/s (bytes of the decoded weight over time), and the ratio. Then "layers back to back": 40 decodes
queued without a sync between them, as a running model queues its layers; diffusers' functions
copy a constant to the device inside every call (``torch.tensor(..., device=...)``), which waits
for the queue, so the host cannot run ahead of the GPU there. The decoders' values are checked
against each other (max relative difference).
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Callable
from datetime import date
from typing import Any

import numpy as np
import torch

from _report import cpu_name, print_report
from _timing import median_seconds, timed
from modelkeeper.worker.storage import dequant

sys.path.insert(0, str(__import__("pathlib").Path(__file__).resolve().parents[1]))
from tests.worker.test_dequant import random_blocks


def median_ms(fn: Callable[[], Any], device: torch.device, repeats: int) -> float:
    return median_seconds(fn, device, repeats, warmups=1) * 1e3


def queued_ms(fn: Callable[[], Any], device: torch.device, layers: int = 40) -> float:
    """One decode's share of ``layers`` decodes queued with no sync between them."""
    fn()
    return timed(lambda: [fn() for _ in range(layers)], device) / layers * 1e3


def row(name: str, device: torch.device, rows: int, cols: int, dtype: torch.dtype, repeats: int) -> str:
    import gguf

    quant = gguf.GGMLQuantizationType[name]
    stored = torch.from_numpy(random_blocks(name, rows, cols)).to(device)

    def ours() -> torch.Tensor:
        return dequant.fused(stored, quant, (rows, cols), dtype)

    def theirs() -> torch.Tensor:
        return dequant.reference(stored, quant, (rows, cols)).to(dtype)

    a, b = ours().float(), theirs().float()
    diff = float(((a - b).abs().max() / b.abs().max().clamp_min(1e-30)).item())
    del a, b
    mine, ref = median_ms(ours, device, repeats), median_ms(theirs, device, repeats)
    q_mine, q_ref = queued_ms(ours, device), queued_ms(theirs, device)
    out_gb = rows * cols * dtype.itemsize / 1e9
    return (
        f"{name:<6} {mine:>8.3f} {out_gb / mine * 1e3:>7.1f} {ref:>13.3f} {out_gb / ref * 1e3:>7.1f} "
        f"{ref / mine:>7.2f}x {q_mine:>12.3f} {q_ref:>12.3f} {q_ref / q_mine:>7.2f}x {diff:>13.2e}"
    )


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--device", default="cuda:0" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--shape", default="3072,12288")
    parser.add_argument("--dtype", default="bfloat16")
    parser.add_argument("--types", default="Q8_0,Q6_K,Q5_K,Q4_K,Q5_0,Q4_0")
    parser.add_argument("--repeats", type=int, default=20)
    parser.add_argument("--out", default=None)
    args = parser.parse_args()
    device = torch.device(args.device)
    rows, cols = (int(x) for x in args.shape.split(","))
    dtype = getattr(torch, args.dtype)
    where = torch.cuda.get_device_name(device) if device.type == "cuda" else f"CPU {cpu_name()}"
    out_gb = rows * cols * dtype.itemsize / 1e9
    lines = [
        f"# dequant — {date.today()} — {where}; torch {torch.__version__}; one {rows}x{cols} weight to {args.dtype}",
        f"{'type':<6} {'ours ms':>8} {'GB/s':>7} {'diffusers ms':>13} {'GB/s':>7} {'speedup':>8} "
        f"{'queued ours':>12} {'queued diff':>12} {'speedup':>8} {'max rel diff':>13}",
    ]
    for name in args.types.split(","):
        lines.append(row(name, device, rows, cols, dtype, args.repeats))
    lines.append(f"# {np.prod((rows, cols)) / 1e6:.1f} M weights; decoded bytes {out_gb:.3f} GB")
    print_report(lines, args.out)


if __name__ == "__main__":
    main()
