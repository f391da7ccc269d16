"""Byte sizes as people write and read them: ``4GB``, ``512MiB``, ``8.7 MB``.

One formatter for everything the command line prints (decimal units, MB = 10^6 bytes, as the
dashboard's ``bytes()`` in ``web/static/dom.js`` and the docs write them), and one parser for
every size a user types (a CLI option, a setting): decimal (KB, MB, GB, TB) and binary (KiB, MiB,
GiB, TiB) units, or plain bytes. It imports nothing of the package, so that every layer may use it.
"""

from __future__ import annotations

import re

__all__ = ["format_size", "parse_size"]

_UNITS = ("B", "KB", "MB", "GB", "TB")
_FACTORS = {
    "": 1, "b": 1,
    "k": 10**3, "kb": 10**3, "m": 10**6, "mb": 10**6, "g": 10**9, "gb": 10**9, "t": 10**12, "tb": 10**12,
    "kib": 1 << 10, "mib": 1 << 20, "gib": 1 << 30, "tib": 1 << 40,
}  # fmt: skip
_SIZE = re.compile(r"^\s*([0-9]+(?:\.[0-9]*)?|\.[0-9]+)\s*([a-zA-Z]*)\s*$")


def format_size(n: float) -> str:
    """``n`` bytes in B, KB, MB, GB or TB (powers of 1000): ``8.7 MB``, ``123 MB``, ``0 B``."""
    value = float(n)
    unit = 0
    while abs(value) >= 1000 and unit < len(_UNITS) - 1:
        value /= 1000
        unit += 1
    return f"{value:.0f} {_UNITS[unit]}" if unit == 0 or abs(value) >= 100 else f"{value:.1f} {_UNITS[unit]}"


def parse_size(text: str | int) -> int:
    """Bytes of ``text``: ``4GB`` (4 * 10^9), ``512MiB`` (512 * 2^20), ``1.5 GB``, ``1000000``.
    Raises ``ValueError`` saying what is wanted for anything else, a negative size included."""
    if isinstance(text, int):
        if text < 0:
            raise ValueError(f"{text}: a size cannot be negative")
        return text
    match = _SIZE.match(text)
    if match is None or match.group(2).lower() not in _FACTORS:
        if text.strip().startswith("-"):
            raise ValueError(f"{text.strip()!r}: a size cannot be negative")
        raise ValueError(f"{text.strip()!r}: expected bytes or a size like 4GB, 512MiB")
    return int(float(match.group(1)) * _FACTORS[match.group(2).lower()])
