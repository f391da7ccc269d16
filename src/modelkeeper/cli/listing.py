"""The table of ``modelkeeper ls`` laid out in the terminal's width, no name split.

A row is a model's handle, type, base, size, its status (``ok`` or ``missing``: when a listing can
hold missing files) and path. The handle, size and status are never split (the handle is what
users type). The path gets the rest of the line, folded after ``/`` (a name too
long for a line after ``.``, ``-`` or ``_``: ``cli/fold.py``); when that leaves it narrower than
``PATH_MIN``, the type and base fold after ``_`` first (``textual_`` / ``inversion``), and when it is
still too narrow (long handles at 80 columns), each path goes on lines of its own under its row,
indented, the whole width for it. Only handles wider than the terminal make lines wider than it.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

from modelkeeper.cli.fold import fold, widest_piece

COLUMNS = ("handle", "type", "base", "size", "path")
#: ``ls --status all`` or ``missing``: each row says whether its file is there.
COLUMNS_WITH_STATUS = ("handle", "type", "base", "size", "status", "path")
FOLDABLE = (1, 2)  # the type and base: after ``_`` when the path needs room
GAP = "  "
INDENT = "  "  # of a path on lines of its own
#: The narrowest the path column is made; narrower, the paths go under their rows.
PATH_MIN = 24

#: One value per column of the table (``COLUMNS`` or ``COLUMNS_WITH_STATUS``), the path last.
Row = tuple[str, ...]


def ls_lines(
    title: str, common: str, rows: Sequence[Row], width: int, columns: Sequence[str] = COLUMNS
) -> list[str]:
    """``ls``'s title (``common``: the folder its paths are relative to, or "") and table of
    ``columns`` (the handle first, the type and base next, the path last; any other column is
    never split, as the size), in lines of at most ``width`` characters (see the module docstring)."""

    def widest(i: int, measure: Callable[[str], int] = len) -> int:
        return max([len(columns[i]), *(measure(r[i]) for r in rows)])

    last = len(columns) - 1  # the path's
    whole = [widest(i) for i in range(last)]
    folded = [widest(i, lambda v: widest_piece(v, "_")) if i in FOLDABLE else whole[i] for i in range(last)]
    gaps = len(GAP) * last
    path = min(widest(last), PATH_MIN)
    widths = folded if sum(whole) + gaps + path > width else whole
    stacked = sum(widths) + gaps + path > width
    if stacked and sum(whole) + gaps - len(GAP) <= width:
        widths = whole  # the path has lines of its own: type and base fit whole
    if not stacked:
        widths = [*widths, min(widest(last), width - sum(widths) - gaps)]
    out = _title(title, common, width)
    out += _line([[c] for c in columns[: len(widths)]], widths)
    if stacked:
        out.append(INDENT + columns[last])
    out.append("─" * min(width, sum(widths) + len(GAP) * (len(widths) - 1)))
    for row in rows:
        cells = [
            fold(v, widths[i], ("_",)).split("\n") if i in FOLDABLE else [v] for i, v in enumerate(row[:last])
        ]
        if stacked:
            out += _line(cells, widths)
            out += [INDENT + line for line in folded_path(row[last], width - len(INDENT)).split("\n")]
        else:
            out += _line([*cells, folded_path(row[last], widths[-1]).split("\n")], widths)
    return out


def folded_path(path: str, width: int) -> str:
    """``path`` folded to ``width``, its `` (+N)`` (other locations) kept whole, on its last line
    when it fits there."""
    name, sep, more = path.partition(" (+")
    out = fold(name, width)
    if sep:
        last = out.rsplit("\n", 1)[-1]
        out += (" " if len(last) + len(sep) + len(more) <= width else "\n") + sep.strip() + more
    return out


def _title(title: str, common: str, width: int) -> list[str]:
    if not common:
        return [title]
    if len(title) + len(", paths under ") + len(common) <= width:
        return [f"{title}, paths under {common}"]
    return [f"{title}, paths under", *fold(common, width, ("/",)).split("\n")]


def _line(cells: Sequence[Sequence[str]], widths: Sequence[int]) -> list[str]:
    """One row whose cells may hold several lines each, as lines, columns ``widths`` wide."""
    height = max(len(c) for c in cells)
    return [
        GAP.join((c[i] if i < len(c) else "").ljust(w) for c, w in zip(cells, widths, strict=True)).rstrip()
        for i in range(height)
    ]
