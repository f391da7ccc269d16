"""The example of docs/CACHE.md runs as written."""

from __future__ import annotations

import re
from pathlib import Path

import torch

DOC = Path(__file__).resolve().parents[2] / "docs" / "CACHE.md"


def test_cache_doc_example_runs() -> None:
    blocks = re.findall(r"```python\n(.*?)```", DOC.read_text(encoding="utf-8"), flags=re.DOTALL)
    assert len(blocks) == 1
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # tiny tensors on a shared machine
    try:
        exec(compile(blocks[0], str(DOC), "exec"), {"__name__": "cache_doc"})
    finally:
        torch.set_num_threads(threads)
