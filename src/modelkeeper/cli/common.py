"""What several command modules share: the registry commands' ``--db`` option, every command's
``--json`` option, opening the registry, ending a command with its error (as one JSON object on
stdout after ``--json``), and byte sizes for tables."""

from __future__ import annotations

import json
from collections.abc import Sequence
from contextvars import ContextVar
from pathlib import Path
from typing import Annotated, Any

import typer
from rich.console import Console
from rich.markup import escape

from modelkeeper.protocol.errors import ErrorCode, ProtocolError
from modelkeeper.registry.store import Registry, default_db_path
from modelkeeper.sizes import format_size

DbOption = Annotated[
    Path | None,
    typer.Option(
        "--db",
        help="Registry file (default: $MODELKEEPER_DB or ~/.local/share/modelkeeper/registry.sqlite3).",
    ),
]
#: Set by ``--json`` for the command being run (until its context closes): its errors are JSON too.
_JSON_MODE: ContextVar[bool] = ContextVar("modelkeeper_json_mode", default=False)


def _json_mode(ctx: typer.Context, value: bool) -> bool:
    if value:
        token = _JSON_MODE.set(True)
        # until the outermost command ends (its context closes even when this one fails to parse):
        # the next command run in this process (a test's) starts without
        ctx.find_root().call_on_close(lambda: _JSON_MODE.reset(token))
    return value


def json_option(help: str) -> Any:
    """A command's ``--json`` option: besides what the command prints with it, its errors become
    JSON (:func:`error_exit`), a bad value of another option too (read first: eager); every
    command that has one takes it from here."""
    return typer.Option("--json", help=help, callback=_json_mode, is_eager=True)


def json_requested() -> bool:
    """Whether the command being run was given ``--json``: after its name, or before it, after its
    group's (``cache --json add``), whose subcommands read it here."""
    return _JSON_MODE.get()


JsonOption = Annotated[bool, json_option("Print JSON instead of a table.")]


def error_exit(
    message: str,
    code: str,
    details: dict[str, Any] | None = None,
    *,
    text: Sequence[str] = (),
    exit_code: int = 1,
) -> typer.Exit:
    """The end of a failed command, to raise. After ``--json``: the API's error body (``error``,
    ``error_code``, ``details``) as one JSON object on stdout, so that a script parses every
    outcome; else on stderr ``error`` and ``text``'s first line (default ``CODE: message``), then
    its other lines indented (what to do about it)."""
    if json_requested():
        typer.echo(json.dumps({"error": message, "error_code": code, "details": details or {}}, indent=2))
        return typer.Exit(code=exit_code)
    first, *more = text or [f"{code}: {message}"]
    err = Console(stderr=True, soft_wrap=True)  # never a line break inside a path or an id
    err.print(f"[red]error[/red] {escape(first)}", highlight=False)
    for line in more:
        err.print(f"  {escape(line)}", highlight=False)
    return typer.Exit(code=exit_code)


def open_registry(db: Path | None, *, create: bool = False) -> Registry:
    """The registry at ``db`` (default: ``$MODELKEEPER_DB`` or ~/.local/share/...). Only a command
    that fills one (``scan``; ``serve`` opens its own) creates it: for ``ls``, ``show`` and ``meta``
    a file that is not there is an error naming it (FILE_NOT_FOUND), not a new folder and an empty
    registry answering "0 models" for a typo'd ``--db``."""
    path = default_db_path() if db is None else db
    if not create and str(path) != ":memory:" and not path.is_file():
        raise ProtocolError(
            f"no registry at {path}: check --db (or $MODELKEEPER_DB); serve or scan creates one",
            ErrorCode.FILE_NOT_FOUND,
            path=str(path),
        )
    return Registry.open(path)


def fail(exc: ProtocolError) -> typer.Exit:
    """The command's end for a domain error, by the code the API answers it with: a part pinned
    that does not fit is ``INCOMPATIBLE_PART`` from ``meta --set`` as from ``PUT .../metadata``
    (:func:`modelkeeper.api.errors.error_code`, the one table of class to code)."""
    code = getattr(exc, "error_code", None)  # an ApiError names the code it was sent
    if code is None:
        from modelkeeper.api.errors import error_code  # the API's stack: only on this error path

        code = error_code(exc)
    return error_exit(exc.message, code, exc.details)


def human_size(n: float) -> str:
    """``n`` bytes in decimal units (``8.7 MB``), as the dashboard and the docs write them: the one
    formatter of every size the command line prints (:func:`modelkeeper.sizes.format_size`)."""
    return format_size(n)


def count(n: int, word: str, plural: str | None = None) -> str:
    """``1 segment``, ``2 segments``: a number and its noun, agreed."""
    return f"{n} {word if n == 1 else plural or word + 's'}"
