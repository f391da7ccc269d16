"""A benchmark's report: the machine it ran on, for the header, and the report printed and kept
(``from _report import ...``: a script's own folder is on the path when it runs as
``python benchmarks/x.py``)."""

from __future__ import annotations

import platform
from collections.abc import Iterable
from pathlib import Path


def cpu_name() -> str:
    """The CPU's model name (``/proc/cpuinfo``; elsewhere what ``platform`` knows)."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown CPU"


def print_report(lines: Iterable[str], out: str | Path | None) -> None:
    """Print the report's ``lines``, and write them to the file ``out`` too where one is named
    (``--out``: the dated copies in ``benchmarks/results/``)."""
    text = "\n".join(lines)
    print(text)
    if out:
        Path(out).write_text(text + "\n", encoding="utf-8")
