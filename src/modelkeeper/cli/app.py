"""The command table: ``modelkeeper --help``. Each topic module holds plain command functions;
this one mounts them, in the order ``--help`` lists them."""

from __future__ import annotations

from typing import Annotated, Any

import typer
from typer.core import TyperOption

import modelkeeper
from modelkeeper.cli import cache, convert, discovery, jobs, local, lora, operations, registry, serve, service

app = typer.Typer(
    no_args_is_help=True,
    add_completion=False,
    help="modelkeeper: find, know, keep and place diffusion models.",
)

_display_type = TyperOption.display_type_rich


def _flag_type(self: TyperOption, ctx: Any) -> str | None:
    """No type column for a flag (typer prints ``<bool>`` beside every ``--json`` and ``--help``)."""
    return None if self.is_flag else _display_type(self, ctx)


setattr(TyperOption, "display_type_rich", _flag_type)  # noqa: B010 (a method of the library's class)


def _version(value: bool) -> None:
    if value:
        typer.echo(f"modelkeeper {modelkeeper.__version__}")
        raise typer.Exit()


@app.callback()
def _root(
    version: Annotated[
        bool,
        typer.Option("--version", is_eager=True, callback=_version, help="Print the version and exit."),
    ] = False,
) -> None:
    """modelkeeper: find, know, keep and place diffusion models."""


app.command("protocol-schema")(local.protocol_schema_cmd)
app.command("worker")(local.worker_cmd)
app.command("demo-models")(local.demo_models_cmd)
app.command("convert")(convert.convert_cmd)

app.command("scan")(discovery.scan)
app.command("ls")(registry.ls)
app.command("show")(registry.show)
app.command("meta")(registry.meta)

app.command("serve")(serve.serve)
app.command("status")(service.status)
app.command("route")(service.route)
app.command("pull")(service.pull)
app.command("load")(service.load)
app.command("unload")(service.unload)
app.command("validate")(operations.validate)
app.command("benchmark")(operations.benchmark)
app.command("optimize")(operations.optimize)
app.command("optimize-memory")(service.optimize_memory)
app.add_typer(lora.lora_app, name="lora")
app.add_typer(cache.cache_app, name="cache")
app.add_typer(jobs.jobs_app, name="jobs")


def main() -> None:
    app()
