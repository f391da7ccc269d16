"""What several command modules share: the registry commands' ``--db`` and ``--json`` options,
opening the registry, turning a domain error into the command's failure, and byte sizes for tables."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer
from rich.console import Console
from rich.markup import escape

from modelkeeper.protocol.errors import ProtocolError
from modelkeeper.registry.store import Registry
from modelkeeper.sizes import format_size

DbOption = Annotated[
    Path | None,
    typer.Option(
        "--db",
        help="Registry file (default: $MODELKEEPER_DB or ~/.local/share/modelkeeper/registry.sqlite3).",
    ),
]
JsonOption = Annotated[bool, typer.Option("--json", help="Print JSON instead of a table.")]


def open_registry(db: Path | None) -> Registry:
    return Registry.open(db)


def fail(exc: ProtocolError) -> typer.Exit:
    code = getattr(exc, "error_code", exc.code.value)  # an ApiError names the code it was sent
    Console(stderr=True).print(f"[red]error[/red] {code}: {escape(exc.message)}", highlight=False)
    return typer.Exit(code=1)


def human_size(n: float) -> str:
    """``n`` bytes in decimal units (``8.7 MB``), as the dashboard and the docs write them: the one
    formatter of every size the command line prints (:func:`modelkeeper.sizes.format_size`)."""
    return format_size(n)


def count(n: int, word: str, plural: str | None = None) -> str:
    """``1 segment``, ``2 segments``: a number and its noun, agreed."""
    return f"{n} {word if n == 1 else plural or word + 's'}"
