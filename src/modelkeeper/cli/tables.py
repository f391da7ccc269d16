"""The command line's rich tables, laid out in the terminal's width before rich sees them, so that
nothing a user copies is cut.

Rich shrinks a table too wide for the terminal by cutting cells at any character (``tiny-sdxl@d…``,
``text_e…``). Here each column gets a width first: a *whole* column (a handle, a component name, an
id a command takes back) never narrower than its widest word, so its values only wrap at spaces;
the others give way, folded after ``_``, ``/`` and the like (``cli/fold.py``), then, only when that
is still too wide, cut at the width. A table whose whole columns alone are wider than the terminal
is printed wider than it (the terminal wraps its lines), never cut.
"""

from __future__ import annotations

import itertools
import re
from collections.abc import Sequence
from dataclasses import dataclass

from rich.console import Console
from rich.table import Table
from rich.text import Text

from modelkeeper.cli.fold import lines as fold_lines
from modelkeeper.cli.fold import widest_piece

#: Where a value that may break folds: after a ``/``, then after ``.``, ``-`` or ``_``.
BREAKS = ("/", ".-_")


@dataclass(frozen=True)
class Column:
    """A table column: ``whole`` when its words are what users copy (never split inside one);
    else its values fold after ``breaks`` (each a set of characters, tried in turn)."""

    header: str
    whole: bool = False
    breaks: Sequence[str] = BREAKS


def print_table(
    console: Console, title: str | None, columns: Sequence[Column], rows: Sequence[Sequence[str | Text]]
) -> None:
    """``rows`` under ``columns``, in ``console``'s width (wider only when its whole columns leave
    no choice). A ``str`` cell is plain text (a value is never read as markup); a styled one is a
    ``Text``."""
    cells = [[c if isinstance(c, Text) else Text(c) for c in row] for row in rows]
    widths = column_widths(columns, [[c.plain for c in row] for row in cells], console.width)
    table = Table(title=title, padding=(0, 1))
    for column, width in zip(columns, widths, strict=True):
        table.add_column(column.header, width=width, overflow="fold")
    for row in cells:
        table.add_row(*(_fold(c, w, col) for c, w, col in zip(row, widths, columns, strict=True)))
    console.print(table, width=max(console.width, sum(widths) + overhead(len(columns))))


def overhead(n: int) -> int:
    """The characters a table of ``n`` columns spends beside its cells: a border before each
    column and after the last, a space of padding on either side of each cell."""
    return 3 * n + 1


def column_widths(columns: Sequence[Column], rows: Sequence[Sequence[str]], width: int) -> list[int]:
    """The width of each column: what its longest value needs, narrowed where the table is wider
    than ``width``: the widest column that may give way first, one character at a time, to its
    widest piece (a word of a whole column; a word's piece after ``breaks`` of the others), then
    (the others only) to its header's widest word."""
    values = [[row[i] for row in rows] for i in range(len(columns))]
    natural = [max([len(c.header), *(len(v) for v in vs)]) for c, vs in zip(columns, values, strict=True)]
    heads = [max(len(w) for w in c.header.split() or [""]) for c in columns]
    floors = [
        max([h, *(_widest_piece(v, c) for v in vs)]) for c, vs, h in zip(columns, values, heads, strict=True)
    ]
    widths = [max(1, n) for n in natural]
    room = width - overhead(len(columns))
    for lowest in (floors, [f if c.whole else h for c, f, h in zip(columns, floors, heads, strict=True)]):
        while sum(widths) > room:
            give = [i for i, w in enumerate(widths) if w > max(1, lowest[i])]
            if not give:
                break
            widths[max(give, key=lambda i: widths[i])] -= 1
    return widths


def _words(value: str) -> list[str]:
    """``value`` cut after each run of spaces: each word with the spaces that follow it."""
    return [w for w in re.findall(r"\S*\s*", value) if w]


def _widest_piece(value: str, column: Column) -> int:
    """The narrowest ``column`` can be for ``value`` without cutting: its widest word (whole), or
    its widest piece of a word after the column's breaks."""
    breaks = "" if column.whole else "".join(column.breaks)
    return max((widest_piece(w.rstrip(), breaks) for w in _words(value)), default=0)


def _lines(value: str, width: int, column: Column) -> list[str]:
    """``value`` in lines of at most ``width`` characters (a line's trailing spaces not counted):
    wrapped at spaces; a word too long folded after the column's breaks, then cut. The lines
    joined are ``value``."""
    out: list[str] = []
    for word in _words(value):
        bare = word.rstrip()
        parts = [bare] if len(bare) <= width else fold_lines(bare, width, column.breaks or ("",))
        parts[-1] += word[len(bare) :]
        for part in parts:
            if out and len((out[-1] + part).rstrip()) <= width:
                out[-1] += part
            else:
                out.append(part)
    return out


def _fold(cell: Text, width: int, column: Column) -> Text:
    """``cell`` with its styles, on the lines of :func:`_lines`."""
    lines = _lines(cell.plain, width, column)
    if len(lines) < 2:
        return cell
    offsets = list(itertools.accumulate(len(line) for line in lines))[:-1]
    parts = cell.divide(offsets)
    for part in parts:
        part.rstrip()
    return Text("\n").join(parts)
