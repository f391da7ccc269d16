"""Local commands, which need no registry and no service: ``protocol-schema``, ``worker``, ``demo-models``.

Plain typer command functions, mounted by :mod:`modelkeeper.cli.app`.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Annotated

import typer

from modelkeeper.cli.common import count


def protocol_schema_cmd(
    out: Annotated[
        Path | None, typer.Option("--out", "-o", help="Write to a file instead of stdout.")
    ] = None,
) -> None:
    """Print the JSON Schema of every worker protocol message (for orchestrators in other languages)."""
    from modelkeeper.protocol import protocol_schema

    text = json.dumps(protocol_schema(), indent=2)
    if out is None:
        typer.echo(text)
    else:
        out.write_text(text + "\n", encoding="utf-8")


def worker_cmd(
    device: Annotated[str, typer.Option(help="cpu, cuda, cuda:N or auto.")] = "auto",
    reserve_mb: Annotated[
        float | None, typer.Option(help="Memory kept free for work (default: 1024 on CUDA, 2048 on CPU).")
    ] = None,
    budget_mb: Annotated[float | None, typer.Option(help="Cap on what models may use.")] = None,
    throttle_mb_s: Annotated[
        float | None, typer.Option("--throttle-mb-s", help="Cap the read rate (simulates a slow disk).")
    ] = None,
    warm: Annotated[
        bool, typer.Option("--warm", help="Import the model libraries and open the device in the background.")
    ] = False,
    log_level: Annotated[
        str | None, typer.Option(help="Log level on stderr (default: $MODELKEEPER_LOG_LEVEL or WARNING).")
    ] = None,
) -> None:
    """Run a worker on stdin/stdout (JSON lines), as 'python -m modelkeeper.worker' does, with its options."""
    from modelkeeper.worker.__main__ import main as worker_main

    args = ["--device", device]
    for flag, value in (("--reserve-mb", reserve_mb), ("--budget-mb", budget_mb),
                        ("--throttle-mb-s", throttle_mb_s), ("--log-level", log_level)):  # fmt: skip
        if value is not None:
            args += [flag, str(value)]
    if warm:
        args.append("--warm")
    raise typer.Exit(worker_main(args))


def demo_models_cmd(
    root: Annotated[Path, typer.Argument(help="Folder to write the demo models into.")],
    extras: Annotated[
        bool,
        typer.Option(
            "--extras",
            help="Also write the optional entries: fp8, scaled-fp8 and GGUF files, a transformer-only "
            "Flux, SD2 v-prediction and SD1 inpainting models.",
        ),
    ] = False,
) -> None:
    """Write tiny but real demo models (UNets, VAEs, text encoders, LoRAs, ...) to ROOT. No downloads."""
    from rich.console import Console

    with quiet_transformers():
        from modelkeeper.testing import write_demo_models

    console = Console(stderr=True)
    with console.status("writing demo models") as status:
        manifest = write_demo_models(
            root, progress=lambda what: status.update(f"writing {what}"), extras=extras
        )
    tokenizers = sum(1 for entry in manifest.entries if entry.type == "tokenizer")
    models = len(manifest.entries) - tokenizers
    console.print(
        f"wrote {count(models, 'model')} and {count(tokenizers, 'tokenizer')} to {root} "
        f"(see {root / 'manifest.json'})",
        soft_wrap=True,
    )


@contextmanager
def quiet_transformers() -> Iterator[None]:
    """Hide transformers' warnings while the demo factory is imported.

    Importing diffusers' pipelines makes transformers warn that its image processors fall back to
    PIL when torchvision is missing; the demo never builds an image processor, so the warning only
    worries a user. transformers warns once per process, so hiding it here hides it for good.
    """
    from transformers.utils import logging as transformers_logging

    level = transformers_logging.get_verbosity()
    transformers_logging.set_verbosity_error()
    try:
        yield
    finally:
        transformers_logging.set_verbosity(level)
