"""The table of ``modelkeeper ls`` laid out in the terminal's width, no name split.

A row is a model's handle, type, base, size and path. The handle and size are never split (the
handle is what users type). The path gets the rest of the line, folded after ``/`` (a name too
long for a line after ``.``, ``-`` or ``_``: ``cli/fold.py``); when that leaves it narrower than
``PATH_MIN``, the type and base fold after ``_`` first (``textual_`` / ``inversion``), and when it is
still too narrow (long handles at 80 columns), each path goes on lines of its own under its row,
indented, the whole width for it. Only handles wider than the terminal make lines wider than it.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

from modelkeeper.cli.fold import fold, widest_piece

COLUMNS = ("handle", "type", "base", "size", "path")
GAP = "  "
INDENT = "  "  # of a path on lines of its own
#: The narrowest the path column is made; narrower, the paths go under their rows.
PATH_MIN = 24

Row = tuple[str, str, str, str, str]


def ls_lines(title: str, common: str, rows: Sequence[Row], width: int) -> list[str]:
    """``ls``'s title (``common``: the folder its paths are relative to, or "") and table, in lines
    of at most ``width`` characters (see the module docstring)."""

    def widest(i: int, measure: Callable[[str], int] = len) -> int:
        return max([len(COLUMNS[i]), *(measure(r[i]) for r in rows)])

    handle, kind, base, size, path = (widest(i) for i in range(len(COLUMNS)))
    folded = [widest(i, lambda v: widest_piece(v, "_")) for i in (1, 2)]
    fixed = handle + size + len(GAP) * (len(COLUMNS) - 1)
    if fixed + kind + base + min(path, PATH_MIN) > width:
        kind, base = folded
    stacked = fixed + kind + base + min(path, PATH_MIN) > width
    if stacked and fixed - len(GAP) + widest(1) + widest(2) <= width:
        kind, base = widest(1), widest(2)  # the path has lines of its own: type and base fit whole
    widths = [handle, kind, base, size] + ([] if stacked else [min(path, width - fixed - kind - base)])
    out = _title(title, common, width)
    out += _line([[c] for c in COLUMNS[: len(widths)]], widths)
    if stacked:
        out.append(INDENT + COLUMNS[-1])
    out.append("─" * min(width, sum(widths) + len(GAP) * (len(widths) - 1)))
    for h, t, b, z, p in rows:
        cells = [[h], fold(t, kind, ("_",)).split("\n"), fold(b, base, ("_",)).split("\n"), [z]]
        if stacked:
            out += _line(cells, widths)
            out += [INDENT + line for line in folded_path(p, width - len(INDENT)).split("\n")]
        else:
            out += _line([*cells, folded_path(p, widths[-1]).split("\n")], widths)
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
