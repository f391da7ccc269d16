"""``modelkeeper cache``: the RAM cache of a running service (list, add a model, drop, clear)."""

from __future__ import annotations

from typing import Annotated, Any

import typer
from rich.console import Console

from modelkeeper.cache import MIN_PREFIX
from modelkeeper.cli.common import count, json_requested
from modelkeeper.cli.explain import local_path
from modelkeeper.cli.remote import (
    MODEL_HELP,
    ApiJsonOption,
    JobJsonOption,
    TokenOption,
    UrlOption,
    call,
    finish,
    print_json,
    size,
)
from modelkeeper.cli.tables import Column, print_table
from modelkeeper.client import Client

cache_app = typer.Typer(
    help="The RAM cache of a running service.", no_args_is_help=False, invoke_without_command=True
)


#: The id ``cache drop`` takes and the handles of the models: never cut.
SEGMENT_COLUMNS = (
    Column("component", whole=True),
    Column("size"),
    Column("hits"),
    Column("models", whole=True),
    Column("pinned"),
)


@cache_app.callback()
def cache_list(
    ctx: typer.Context, as_json: ApiJsonOption = False, url: UrlOption = None, token: TokenOption = None
) -> None:
    """List segments and stats (the default)."""
    if ctx.invoked_subcommand is not None:
        return

    def run(c: Client) -> tuple[dict[str, Any], dict[str, str]]:
        data: dict[str, Any] = c.cache()
        if as_json or not data["segments"]:
            return data, {}
        items = c.list_models(status="all", limit=1000).get("items") or []
        return data, {str(m.get("id")): str(m.get("handle") or m.get("name")) for m in items if m.get("id")}

    data, handles = call(url, token, run)
    if as_json:
        print_json(data)
        return
    st = data["stats"]
    title = (
        f"RAM cache: {size(st['bytes_used'])} of {size(st['budget_bytes'])}, hit rate {st['hit_rate']:.0%}"
    )
    rows = [
        [
            short_id(s["component_id"]),
            size(s["bytes"]),
            str(s["hits"]),
            ", ".join(handles.get(m, m) for m in s["models"]),  # what to type, not the id
            str(s["pinned"]),
        ]
        for s in data["segments"]
    ]
    print_table(Console(), title, SEGMENT_COLUMNS, rows)


@cache_app.command("add")
def cache_add(
    model: Annotated[str, typer.Argument(help=MODEL_HELP)],
    as_json: JobJsonOption = False,
    url: UrlOption = None,
    token: TokenOption = None,
) -> None:
    """Cache every component of a model in RAM."""
    as_json = as_json or json_requested()  # cache --json add
    job = call(url, token, lambda c: finish(c, c.cache_model(local_path(model), wait=False), as_json))
    if as_json:
        print_json(job["result"])
        return
    for s in job["result"]["segments"]:
        Console().print(f"[green]cached[/green] {s['component']} as {s['component_id']} ({size(s['bytes'])})")


#: How many characters of a component id the table shows (``drop`` takes ``MIN_PREFIX`` or more).
SHORT_ID = 12


def short_id(component_id: str) -> str:
    """A component id as the table shows it: its first ``SHORT_ID`` hex digits (a ``b3:``-like
    scheme kept), enough to tell segments apart and what ``cache drop`` takes."""
    scheme, sep, digest = component_id.rpartition(":")
    return f"{scheme}{sep}{digest[:SHORT_ID]}"


@cache_app.command("drop")
def cache_drop(
    component_id: Annotated[
        str,
        typer.Argument(
            help=f"The segment: its component id as the cache table shows it, or any prefix of at "
            f"least {MIN_PREFIX} digits."
        ),
    ],
    force: Annotated[bool, typer.Option(help="Drop it even while a worker is loading from it.")] = False,
    as_json: ApiJsonOption = False,
    url: UrlOption = None,
    token: TokenOption = None,
) -> None:
    """Drop one segment from the RAM cache (loaded models keep their weights)."""
    data = call(url, token, lambda c: c.cache_drop(component_id, force=force))  # the service resolves it
    if as_json or json_requested():
        print_json(data)
        return
    Console().print(f"dropped {short_id(data['component_id'])}: {size(data['freed_bytes'])} freed")


@cache_app.command("clear")
def cache_clear(
    force: Annotated[
        bool, typer.Option(help="Drop segments even while a worker is loading from them.")
    ] = False,
    as_json: ApiJsonOption = False,
    url: UrlOption = None,
    token: TokenOption = None,
) -> None:
    """Drop every segment."""
    data = call(url, token, lambda c: c.cache_clear(force=force))
    if as_json or json_requested():
        print_json(data)
        return
    Console().print(f"dropped {count(data['dropped'], 'segment')}: {size(data['freed_bytes'])} freed")
