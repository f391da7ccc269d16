"""Table cells folded where a value may break: a path after ``/``, a word like ``textual_inversion``
after ``_``. A terminal (or rich's own folding) cuts a cell at its width, mid-name
(``tiny-sd15.safetens`` / ``ors``); a cell folded here keeps every name whole on its line, so it
reads, and copies, as what it is. Rich wraps only at spaces: the cells are folded before it sees them.
"""

from __future__ import annotations

from collections.abc import Sequence


def fold(value: str, width: int, breaks: Sequence[str] = ("/", ".-_")) -> str:
    """``value`` in lines of at most ``width`` characters, joined by newlines: broken after one of
    ``breaks[0]``'s characters where it can be, a piece still too wide after one of ``breaks[1]``'s
    and so on, and one wider still cut at ``width``."""
    return "\n".join(lines(value, max(1, width), breaks))


def lines(value: str, width: int, breaks: Sequence[str]) -> list[str]:
    out: list[str] = []
    for piece in _pieces(value, breaks[0] if breaks else ""):
        if len(piece) <= width:
            parts = [piece]
        elif len(breaks) > 1:
            parts = lines(piece, width, breaks[1:])
        else:
            parts = [piece[i : i + width] for i in range(0, len(piece), width)]
        for part in parts:
            if out and len(out[-1]) + len(part) <= width:
                out[-1] += part
            else:
                out.append(part)
    return out


def widest_piece(value: str, breaks: str) -> int:
    """The width ``value`` needs when folded after each of ``breaks``: its widest piece."""
    return max((len(p) for p in _pieces(value, breaks)), default=0)


def _pieces(value: str, breaks: str) -> list[str]:
    """``value`` cut after each character of ``breaks``."""
    out: list[str] = []
    start = 0
    for i, ch in enumerate(value):
        if ch in breaks:
            out.append(value[start : i + 1])
            start = i + 1
    if start < len(value):
        out.append(value[start:])
    return out
