"""``modelkeeper cache``: the RAM cache of a running service (list, add a model, drop, clear)."""

from __future__ import annotations

from typing import Annotated

import typer
from rich.console import Console
from rich.table import Table

from modelkeeper.cli.remote import ApiJsonOption, TokenOption, UrlOption, call, finish, print_json, size

cache_app = typer.Typer(
    help="The RAM cache of a running service.", no_args_is_help=False, invoke_without_command=True
)


@cache_app.callback()
def cache_list(
    ctx: typer.Context, as_json: ApiJsonOption = False, url: UrlOption = None, token: TokenOption = None
) -> None:
    """List segments and stats (the default)."""
    if ctx.invoked_subcommand is not None:
        return
    data = call(url, token, lambda c: c.cache())
    if as_json:
        print_json(data)
        return
    st = data["stats"]
    table = Table(
        title=f"RAM cache: {size(st['bytes_used'])} of {size(st['budget_bytes'])}, hit rate {st['hit_rate']:.0%}"
    )
    for col in ("component", "size", "hits", "models", "pinned"):
        table.add_column(col)
    for s in data["segments"]:
        table.add_row(
            s["component_id"], size(s["bytes"]), str(s["hits"]), ", ".join(s["models"]), str(s["pinned"])
        )
    Console().print(table)


@cache_app.command("add")
def cache_add(
    model: Annotated[str, typer.Argument(help="Model id, name, path or hash prefix.")],
    as_json: ApiJsonOption = False,
    url: UrlOption = None,
    token: TokenOption = None,
) -> None:
    """Cache every component of a model in RAM."""
    job = call(url, token, lambda c: finish(c, c.cache_model(model, wait=False), as_json))
    if as_json:
        print_json(job["result"])
        return
    for s in job["result"]["segments"]:
        Console().print(f"[green]cached[/green] {s['component']} as {s['component_id']} ({size(s['bytes'])})")


@cache_app.command("drop")
def cache_drop(
    component_id: Annotated[str, typer.Argument()],
    force: bool = False,
    url: UrlOption = None,
    token: TokenOption = None,
) -> None:
    """Drop one segment."""
    data = call(url, token, lambda c: c.cache_drop(component_id, force=force))
    Console().print(f"dropped {component_id}: {size(data['freed_bytes'])} freed")


@cache_app.command("clear")
def cache_clear(force: bool = False, url: UrlOption = None, token: TokenOption = None) -> None:
    """Drop every segment."""
    data = call(url, token, lambda c: c.cache_clear(force=force))
    Console().print(f"dropped {data['dropped']} segments: {size(data['freed_bytes'])} freed")
