"""What the readers of ``shape_configs`` share: the shapes they read and small questions about them."""

from __future__ import annotations

import math
import re
from collections.abc import Callable, Mapping, Sequence
from typing import Any

Shapes = Mapping[str, Sequence[int]]
#: A layout's reader: (shapes, the config given) -> the fields the shapes decide.
Reader = Callable[[Shapes, Mapping[str, Any]], dict[str, Any]]
#: A layout's reader and the class's defaults of the fields its published configs may leave out.
Readers = dict[str, tuple[Reader, Mapping[str, Any]]]

#: Heads of Stable Diffusion's attention are 64 wide (UNets and CLIP alike).
HEAD_WIDTH = 64


def plain(value: Any) -> Any:
    """JSON's view of a value: tuples and lists compare equal."""
    if isinstance(value, list | tuple):
        return [plain(v) for v in value]
    return value


def indices(shapes: Shapes, prefix: str) -> list[int]:
    """The distinct numbers right after ``prefix`` in the keys (``down_blocks.`` -> 0, 1, 2)."""
    pattern = re.compile(re.escape(prefix) + r"(\d+)\.")
    return sorted({int(m.group(1)) for k in shapes if (m := pattern.match(k))})


def has(shapes: Shapes, prefix: str) -> bool:
    return any(k.startswith(prefix) for k in shapes)


def dim(shapes: Shapes, key: str, axis: int) -> int | None:
    shape = shapes.get(key)
    return int(shape[axis]) if shape is not None and len(shape) > axis else None


def first_dim(shapes: Shapes, suffix: str, axis: int) -> int | None:
    """``axis`` of the first key (in sorted order) ending with ``suffix``."""
    for key in sorted(shapes):
        if key.endswith(suffix):
            return dim(shapes, key, axis)
    return None


def one_or_list(values: Sequence[int]) -> int | list[int]:
    return values[0] if len(set(values)) == 1 else list(values)


def per_level(value: Any, levels: int, default: int) -> list[int]:
    """A per-level setting as a list of ``levels`` (an int repeated; a list cut or padded with its last)."""
    if isinstance(value, int):
        return [value] * levels
    if isinstance(value, list | tuple) and value:
        items = [int(v) for v in value]
        return (items + [items[-1]] * levels)[:levels]
    return [default] * levels


def head_count(width: int, known: int) -> int:
    """``known`` when it divides ``width``, else 64-wide heads, else the largest count that divides it."""
    if known > 0 and width % known == 0:
        return known
    if width % HEAD_WIDTH == 0:
        return width // HEAD_WIDTH
    return max(d for d in range(1, min(known, width) + 1) if width % d == 0) if known > 0 else 1


def group_count(widths: Sequence[int], known: int) -> int:
    """``known`` when it divides every width, else the largest divisor of all of them below it."""
    common = math.gcd(*widths)
    if known > 0 and common % known == 0:
        return known
    return max(d for d in range(1, max(1, min(known, common)) + 1) if common % d == 0)


def ndim_of(shapes: Shapes, suffix: str) -> int | None:
    """How many dimensions the first key ending with ``suffix`` has."""
    for key in sorted(shapes):
        if key.endswith(suffix):
            return len(shapes[key])
    return None
