"""Command line: ``modelkeeper --help``."""

from __future__ import annotations

import typer

app = typer.Typer(no_args_is_help=True, add_completion=False, help="modelkeeper: know, keep and place diffusion models.")


def main() -> None:
    app()
