"""``cli/tables.py``: column widths chosen before rich sees a table, so that nothing a user copies
is cut: a whole column never narrower than its widest word, the others folded after their breaks."""

from __future__ import annotations

import pytest
from rich.console import Console
from rich.text import Text

from modelkeeper.cli.tables import Column, column_widths, overhead, print_table

HANDLES = Column("models", whole=True)
KIND = Column("kind")


@pytest.mark.parametrize(
    ("width", "widths"),
    [
        (80, [17, 51]),  # room for both: what they need
        (50, [17, 26]),  # the widest gives way first: the handles wrap between words
        (37, [9, 21]),  # down to their widest word (the handles) and piece after `_` ("inversion")
        (35, [7, 21]),  # then the kind to its header's widest word and less: cut, the handles whole
        (20, [4, 21]),  # the handles never give way: the table is wider than the terminal
    ],
)
def test_a_whole_column_never_gives_way(width: int, widths: list[int]) -> None:
    rows = [["textual_inversion", "tiny-sdxl@diffusers (loaded), tiny-sdxl@checkpoints"]]
    assert column_widths([KIND, HANDLES], rows, width) == widths
    assert overhead(2) == 7  # borders and padding: 80 columns leave 73 for the cells


def test_printed_narrow_a_cell_wraps_between_words_and_folds_after_breaks() -> None:
    console = Console(width=40, record=True, force_terminal=False, color_system=None)
    rows: list[list[str | Text]] = [
        ["textual_inversion", "tiny-sdxl@diffusers (loaded), tiny-sd15@checkpoints"],
        [Text("missing", "red"), "[not markup]"],
    ]
    print_table(console, "models", [KIND, HANDLES], rows)
    out = console.export_text()
    lines = out.splitlines()
    assert max(len(line) for line in lines) <= 40 and "…" not in out, out
    cells = [[c.strip() for c in line.strip("│").split("│")] for line in lines if line.startswith("│")]
    kinds = [c[0] for c in cells if c[0]]
    handles = [c[1] for c in cells if c[1]]
    assert "".join(kinds[:2]) == "textual_inversion" and kinds[0].endswith("_"), out
    assert "tiny-sdxl@diffusers" in handles and "tiny-sd15@checkpoints" in handles, out
    assert "[not markup]" in handles and "missing" in kinds, out
