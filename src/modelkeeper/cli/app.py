"""The command table: ``modelkeeper --help``. Each topic module holds plain command functions;
this one mounts them, in the order ``--help`` lists them."""

from __future__ import annotations

import inspect
from collections.abc import Callable
from typing import Annotated, Any

import typer
from typer.core import TyperGroup, TyperOption

import modelkeeper
from modelkeeper.cli import cache, convert, discovery, jobs, local, lora, operations, registry, serve, service
from modelkeeper.cli.common import error_exit, json_requested
from modelkeeper.protocol.errors import ErrorCode


class _Commands(TyperGroup):
    """The command table. A bad option value (``--offload lots``, a missing argument) of a command
    given ``--json`` is answered as its other errors are: one JSON object on stdout, exit code 2.
    Typer's "Value error, " before a choice's words (``'fp16' is not one of ...``) is left out."""

    def invoke(self, ctx: Any) -> Any:
        try:
            return super().invoke(ctx)
        except typer.BadParameter as exc:
            exc.message = exc.message.removeprefix("Value error, ")
            if not json_requested():
                raise
            param = exc.param.name if exc.param is not None else None
            details = {"param": param} if param else {}
            raise error_exit(
                exc.format_message(), ErrorCode.INVALID_REQUEST.value, details, exit_code=2
            ) from None


app = typer.Typer(
    cls=_Commands,
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


def _help(fn: Callable[..., Any]) -> str:
    """``fn``'s docstring with its paragraphs on one line each: in the command list, typer's rich
    mode keeps a docstring's line breaks, and a paragraph broken at 100 columns came out ragged at 80."""
    doc = inspect.cleandoc(fn.__doc__ or "")
    return "\n\n".join(" ".join(p.split("\n")) for p in doc.split("\n\n"))


def _mount(name: str, fn: Callable[..., Any]) -> None:
    app.command(name, help=_help(fn))(fn)


_mount("protocol-schema", local.protocol_schema_cmd)
_mount("worker", local.worker_cmd)
_mount("demo-models", local.demo_models_cmd)
_mount("convert", convert.convert_cmd)
_mount("scan", discovery.scan)
_mount("ls", registry.ls)
_mount("show", registry.show)
_mount("meta", registry.meta)
_mount("serve", serve.serve)
_mount("status", service.status)
_mount("route", service.route)
_mount("pull", service.pull)
_mount("load", service.load)
_mount("unload", service.unload)
_mount("validate", operations.validate)
_mount("benchmark", operations.benchmark)
_mount("optimize", operations.optimize)
_mount("optimize-memory", service.optimize_memory)
app.add_typer(lora.lora_app, name="lora")
app.add_typer(cache.cache_app, name="cache")
app.add_typer(jobs.jobs_app, name="jobs")


def main() -> None:
    app()
