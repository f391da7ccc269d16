"""``modelkeeper serve``: run the service (registry, first scan, RAM cache, one worker per
device, REST API), on one host or as the driver of a Ray cluster."""

from __future__ import annotations

import asyncio
import errno
import logging
import os
import signal
import socket
import sys
import tomllib
from pathlib import Path
from types import FrameType
from typing import TYPE_CHECKING, Annotated, Any

import typer
from rich.markup import escape

from modelkeeper.cli.remote import err

if TYPE_CHECKING:
    import uvicorn


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
    log_level: Annotated[
        str | None,
        typer.Option("--log-level", help="Log level on stderr: debug, info (default), warning, error."),
    ] = None,
    access_log: Annotated[
        bool | None,
        typer.Option("--access-log/--no-access-log", help="Log every HTTP request (off by default)."),
    ] = None,
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
    from modelkeeper.orchestrator.settings import settings_problem, unknown_env

    if config is not None:
        if not config.is_file():
            err.print(f"[red]error[/red] --config: {config} is not a file")
            raise typer.Exit(2)
        os.environ["MODELKEEPER_CONFIG"] = str(config)
    given: dict[str, Any] = {"model_roots": models, "host": host, "port": port, "devices": device, "db": db,
                             "token": token, "access_log": access_log,
                             "log_level": log_level.lower() if log_level else None}  # fmt: skip
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
    for line in unknown_env(os.environ):  # a typo'd variable is ignored, so say so
        err.print(f"[yellow]warning[/yellow] {escape(line)}", soft_wrap=True, highlight=False)
    for problem in missing_roots(settings.model_roots, demo=demo):
        err.print(f"[red]error[/red] {escape(problem)}", soft_wrap=True, highlight=False)
        raise typer.Exit(2)
    listener = bind(settings.host, settings.port)  # before any worker starts or scan runs
    port = listener.getsockname()[1]
    if demo:
        root = settings.model_roots[0]
        if not root.exists() or not any(root.iterdir()):
            from modelkeeper.cli.local import quiet_transformers

            with quiet_transformers():  # importing the demo factory warns of torchvision otherwise
                from modelkeeper.testing import write_demo_models

            with err.status(f"writing demo models into {root}"):
                write_demo_models(root)
    setup_logging(settings.log_level)
    if cluster is not None:
        from modelkeeper.cluster import ClusterOrchestrator, ClusterSettings

        log.info("cluster mode: Ray at %s; each node's agent reads that node's settings", cluster)
        service: Any = ClusterOrchestrator(settings, ClusterSettings(address=cluster))
    else:
        from modelkeeper.orchestrator import Orchestrator

        service = Orchestrator(settings)
    app = create_app(service=service)
    server = signalled(
        uvicorn.Config(
            app,
            host=settings.host,
            port=port,
            lifespan="off",
            log_config=None,
            access_log=settings.access_log,
        )
    )  # the service is started here, not by the app's lifespan: a start that fails ends serve cleanly
    url = f"http://{settings.host}:{port}"
    try:
        code = asyncio.run(run(service, server, listener, url, local=cluster is None))
    except KeyboardInterrupt:  # Ctrl-C while the workers started
        log.warning("interrupted while starting")
        code = 130
    raise typer.Exit(code)


def missing_roots(roots: list[Path], *, demo: bool) -> list[str]:
    """What is wrong with the model roots: one that is not there (a typo'd ``--models`` was
    created and served 0 models without a word) or not a folder. The default root (``models``,
    which ``make run`` fills) and the root ``--demo`` writes into are created as before."""
    from modelkeeper.orchestrator import Settings

    default = Settings.model_fields["model_roots"].get_default(call_default_factory=True)
    problems = []
    for i, root in enumerate(roots):
        if root.is_dir() or (not root.exists() and (root in default or (demo and i == 0))):
            continue
        why = "not a folder" if root.exists() else "no such folder; create it or fix the path"
        problems.append(f"model root {root}: {why}")
    return problems


log = logging.getLogger("modelkeeper.serve")

LOG_FORMAT = "%(asctime)s %(levelname)s %(name)s: %(message)s"


def setup_logging(level: str) -> None:
    """One format for the service's log on stderr (modelkeeper's loggers, uvicorn's and its access
    log); uvicorn's own start-up chatter only at debug."""
    logging.basicConfig(level=level.upper(), format=LOG_FORMAT, stream=sys.stderr, force=True)
    if level != "debug":
        logging.getLogger("uvicorn.error").setLevel(logging.WARNING)


def signalled(config: uvicorn.Config) -> uvicorn.Server:
    """uvicorn's server, logging which signal stops it (uvicorn is imported only by ``serve``)."""
    import uvicorn

    class Server(uvicorn.Server):
        def handle_exit(self, sig: int, frame: FrameType | None) -> None:
            if not self.should_exit:
                log.info("received %s: stopping", signal.Signals(sig).name)
            super().handle_exit(sig, frame)
            # uvicorn raises the signal again once it stops serving; the service is stopped after
            # that (``run``), and a KeyboardInterrupt would cut its stop short.
            self._captured_signals.clear()

    return Server(config)


async def run(service: Any, server: uvicorn.Server, listener: socket.socket, url: str, *, local: bool) -> int:
    """Start ``service`` (a local one refuses to run when no device can start a worker: exit 1),
    serve it on ``listener`` until a signal, stop it. The exit code."""
    from modelkeeper.orchestrator.errors import DeviceNotReady

    try:
        if local:
            await service.start(require_worker=True)
        else:
            await service.start()
    except DeviceNotReady as exc:
        log.error("not serving: %s", exc.message)
        return 1
    try:
        log.info("serving on %s (docs: %s/docs)", url, url)
        await server.serve(sockets=[listener])
    finally:
        await service.stop()
    return 0 if server.started else 3


def bind(host: str, port: int) -> socket.socket:
    """A listening socket on ``host:port``, made before the service starts anything, so that a
    port in use fails at once (it used to fail after the workers' start and a scan, under a
    "serving on" line). uvicorn serves on it."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    # IPPROTO_TCP, not 0: asyncio sets TCP_NODELAY only on connections of a socket that says it is
    # TCP; without it uvicorn's two writes per answer (head, body) meet Nagle and the client's
    # delayed ACK, and every request after the first on a connection waited about 40 ms
    sock = socket.socket(family, socket.SOCK_STREAM, socket.IPPROTO_TCP)
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
