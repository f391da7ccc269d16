"""Folding table cells where a value may break (``cli/fold.py``): after ``/`` in a path, then after
``.``, ``-`` or ``_`` in a name too long for a line, cut only when nothing else fits."""

from __future__ import annotations

import pytest

from modelkeeper.cli.fold import fold, widest_piece

CASES = [
    # (value, width, breaks, folded)
    ("checkpoints/tiny-sd15.safetensors", 40, ("/", ".-_"), "checkpoints/tiny-sd15.safetensors"),
    ("checkpoints/tiny-sd15.safetensors", 21, ("/", ".-_"), "checkpoints/\ntiny-sd15.safetensors"),
    ("a/b/c/tiny-sd15.safetensors", 21, ("/", ".-_"), "a/b/c/\ntiny-sd15.safetensors"),
    ("loras/tiny-sd15-kohya.safetensors", 18, ("/", ".-_"), "loras/\ntiny-sd15-kohya.\nsafetensors"),
    ("x/abcdefghij", 4, ("/",), "x/\nabcd\nefgh\nij"),  # no break left: cut at the width
    ("textual_inversion", 9, ("_",), "textual_\ninversion"),
    ("", 5, ("/",), ""),
]


@pytest.mark.parametrize(("value", "width", "breaks", "folded"), CASES)
def test_fold(value: str, width: int, breaks: tuple[str, ...], folded: str) -> None:
    assert fold(value, width, breaks) == folded
    assert "".join(folded.split("\n")) == value and all(len(line) <= width for line in folded.split("\n"))


def test_widest_piece() -> None:
    assert widest_piece("textual_inversion", "_") == len("inversion")
    assert widest_piece("sdxl_refiner", "_") == len("refiner")
    assert widest_piece("", "_") == 0
