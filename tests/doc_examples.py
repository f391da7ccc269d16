"""Running a doc's Python example as written (its one ``python`` block), for the docs' tests."""

from __future__ import annotations

import re
from pathlib import Path

import torch

DOCS = Path(__file__).resolve().parents[1] / "docs"


def run_example(doc: str) -> None:
    """Execute the single ``python`` block of ``docs/<doc>``; tiny tensors run on one thread."""
    path = DOCS / doc
    blocks = re.findall(r"```python\n(.*?)```", path.read_text(encoding="utf-8"), flags=re.DOTALL)
    assert len(blocks) == 1, f"{doc}: expected one python block, found {len(blocks)}"
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # tiny tensors on a shared machine
    try:
        exec(compile(blocks[0], str(path), "exec"), {"__name__": path.stem.lower() + "_doc"})
    finally:
        torch.set_num_threads(threads)
