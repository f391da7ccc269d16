"""The words an option takes when it takes one of a few (``--priority``, ``--dtype``, ``--level``,
``--state``, ``ls --status``, ``ls --sort``), as ``Literal`` types: typer makes each a choice, so
a typo exits 2 naming the option and the words it takes (with ``--json``: ``details.param``)
before anything is sent. They are the API's words (tests/cli/test_choices.py holds them equal);
and the numbers an option bounds, checked here too."""

from __future__ import annotations

from typing import Literal

import typer

Priority = Literal["low", "normal", "high", "critical"]
Dtype = Literal["float32", "float16", "bfloat16"]
StorageDtype = Literal["float8_e4m3fn", "float8_e5m2"]
Level = Literal["header", "weights", "functional"]
JobState = Literal["queued", "running", "succeeded", "failed", "cancelled"]
Presence = Literal["ok", "missing", "all"]
SortKey = Literal["name", "type", "base", "size", "created", "updated"]

#: The longest time limit the API takes, in seconds (a day).
MAX_TIMEOUT = 86400


def timeout_option(value: float | None) -> float | None:
    """``--timeout``: seconds above 0, a day at most, as the API takes them."""
    if value is not None and not 0 < value <= MAX_TIMEOUT:
        raise typer.BadParameter(f"expected seconds above 0 and at most {MAX_TIMEOUT}, got {value:g}")
    return value
