"""``modelkeeper serve``: run the service (registry, first scan, RAM cache, one worker per
device, REST API), on one host or as the driver of a Ray cluster."""

from __future__ import annotations

import errno
import os
import socket
import tomllib
from pathlib import Path
from typing import Annotated, Any

import typer
from rich.markup import escape

from modelkeeper.cli.remote import err


def serve(
    models: Annotated[
        list[Path] | None, typer.Option("--models", "-m", help="Model root (repeat for several).")
    ] = None,
    host: Annotated[str | None, typer.Option(help="Bind address (default 127.0.0.1).")] = None,
    port: Annotated[int | None, typer.Option(help="Port (default 8765).")] = None,
    device: Annotated[
        list[str] | None, typer.Option("--device", "-d", help="Worker device: auto, cpu, cuda:N (repeat).")
    ] = None,
    db: Annotated[Path | None, typer.Option("--db", help="Registry file.")] = None,
    token: Annotated[str | None, typer.Option("--token", help="Require this bearer token.")] = None,
    config: Annotated[
        Path | None, typer.Option("--config", help="TOML settings file (also $MODELKEEPER_CONFIG).")
    ] = None,
    demo: Annotated[
        bool, typer.Option("--demo", help="Write the demo models into an empty model root.")
    ] = False,
    cluster: Annotated[
        str | None,
        typer.Option(
            "--cluster",
            help="Cluster mode: join the Ray cluster at ADDRESS (host:port, or 'auto'); one agent per node "
            "owns that node's models, workers and cache (docs/CLUSTER.md).",
        ),
    ] = None,
) -> None:
    """Run the service: registry, first scan, RAM cache, one worker per device, REST API."""
    import uvicorn
    from pydantic import ValidationError
    from pydantic_settings import SettingsError

    from modelkeeper.api.app import create_app
    from modelkeeper.orchestrator import Settings
    from modelkeeper.orchestrator.settings import settings_problem

    if config is not None:
        if not config.is_file():
            err.print(f"[red]error[/red] --config: {config} is not a file")
            raise typer.Exit(2)
        os.environ["MODELKEEPER_CONFIG"] = str(config)
    given: dict[str, Any] = {"model_roots": models, "host": host, "port": port, "devices": device, "db": db,
                             "token": token}  # fmt: skip
    try:
        settings = Settings(**{k: v for k, v in given.items() if v is not None})
        settings.check_exposure()
    except (ValidationError, SettingsError) as exc:
        for line in settings_problem(exc).splitlines():
            err.print(f"[red]error[/red] {escape(line)}", soft_wrap=True, highlight=False)
        raise typer.Exit(2) from None
    except tomllib.TOMLDecodeError as exc:
        where = os.environ.get("MODELKEEPER_CONFIG")
        err.print(
            f"[red]error[/red] {escape(f'{where}: not valid TOML ({exc})')}", soft_wrap=True, highlight=False
        )
        raise typer.Exit(2) from None
    except ValueError as exc:  # check_exposure
        err.print(f"[red]error[/red] {escape(str(exc))}", soft_wrap=True, highlight=False)
        raise typer.Exit(2) from None
    listener = bind(settings.host, settings.port)  # before any worker starts or scan runs
    port = listener.getsockname()[1]
    if demo:
        root = settings.model_roots[0]
        if not root.exists() or not any(root.iterdir()):
            from modelkeeper.testing import write_demo_models

            with err.status(f"writing demo models into {root}"):
                write_demo_models(root)
    err.print(
        f"modelkeeper serving on http://{settings.host}:{port}  "
        f"(models: {', '.join(str(r) for r in settings.model_roots)}; devices: {', '.join(settings.devices)}; "
        f"docs: /docs)",
        soft_wrap=True,  # one line in a log too, never cut at 80 columns
        highlight=False,
    )
    if cluster is not None:
        from modelkeeper.cluster import ClusterOrchestrator, ClusterSettings

        err.print(
            f"cluster mode: Ray at {cluster}; each node's agent reads that node's settings", soft_wrap=True
        )
        app = create_app(service=ClusterOrchestrator(settings, ClusterSettings(address=cluster)))
    else:
        app = create_app(settings)
    server = uvicorn.Server(uvicorn.Config(app, host=settings.host, port=port, log_level="warning"))
    server.run(sockets=[listener])
    if not server.started:
        raise typer.Exit(3)


def bind(host: str, port: int) -> socket.socket:
    """A listening socket on ``host:port``, made before the service starts anything, so that a
    port in use fails at once (it used to fail after the workers' start and a scan, under a
    "serving on" line). uvicorn serves on it."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # as uvicorn does: TIME_WAIT is no obstacle
    try:
        sock.bind((host, port))
    except OSError as exc:
        sock.close()
        if exc.errno == errno.EADDRINUSE:
            why = f"port {port} is in use ({exc.strerror}); pass --port, or stop what holds it"
        else:
            why = f"cannot listen on {host}:{port} ({exc.strerror or exc}); check --host and --port"
        err.print(f"[red]error[/red] {why}", soft_wrap=True, highlight=False)
        raise typer.Exit(1) from None
    return sock
