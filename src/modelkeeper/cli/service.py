"""Command line of the service: ``modelkeeper serve`` and the commands that talk to a running one
(``status``, ``load``, ``unload``, ``cache``, ``validate``, ``benchmark``, ``optimize``, ``lora``,
``jobs``).

The client commands take ``--url`` (default ``$MODELKEEPER_URL`` or http://127.0.0.1:8765) and
``--token`` (default ``$MODELKEEPER_TOKEN``); ``--json`` prints what the API answered. Long
operations show a live progress bar fed by the job's event stream.
"""

from __future__ import annotations

import json
import os
from collections.abc import Callable
from pathlib import Path
from typing import Annotated, Any, TypeVar

import typer
from rich.console import Console
from rich.progress import (
    BarColumn,
    Progress,
    SpinnerColumn,
    TaskProgressColumn,
    TextColumn,
    TimeElapsedColumn,
)
from rich.table import Table

from modelkeeper.cli.common import human_size
from modelkeeper.client import DEFAULT_URL, ApiError, Client
from modelkeeper.protocol.errors import ProtocolError

UrlOption = Annotated[
    str | None, typer.Option("--url", help=f"Service URL (default: $MODELKEEPER_URL or {DEFAULT_URL}).")
]
TokenOption = Annotated[
    str | None, typer.Option("--token", help="Bearer token (default: $MODELKEEPER_TOKEN).")
]
ApiJsonOption = Annotated[bool, typer.Option("--json", help="Print the API's JSON answer.")]
DeviceOption = Annotated[str | None, typer.Option("--device", "-d", help="Device id (cuda:0, cpu...).")]

err = Console(stderr=True)
T = TypeVar("T")


def _client(url: str | None, token: str | None) -> Client:
    return Client(url, token=token)


def _call(url: str | None, token: str | None, fn: Callable[[Client], T]) -> T:
    """``fn(client)``; an error answer or an unreachable service ends the command with a message."""
    try:
        with _client(url, token) as c:
            return fn(c)
    except Exception as exc:
        raise _fail(exc) from None


class JobFailed(ProtocolError):
    """A job that ended without success: its error code and message, no HTTP status (the job's
    own request was answered 202; a made-up 409 once stood beside any code, e.g. INVALID_REQUEST)."""

    def __init__(self, message: str, error_code: str = "FAILED", job_id: str = "") -> None:
        super().__init__(message, job=job_id)
        self.error_code = error_code
        self.job_id = job_id

    @classmethod
    def of(cls, job: dict[str, Any]) -> JobFailed:
        error = job.get("error") or {}
        return cls(
            str(error.get("error", job["state"])), str(error.get("error_code", job["state"])), str(job["id"])
        )


def _fail(exc: ApiError | OSError | Exception) -> typer.Exit:
    if isinstance(exc, JobFailed):
        err.print(f"[red]error[/red] {exc.error_code} (job {exc.job_id}): {exc.message}", highlight=False)
    elif isinstance(exc, ApiError):
        err.print(f"[red]error[/red] {exc.error_code} (HTTP {exc.status_code}): {exc.message}")
        if exc.details.get("matches"):
            err.print("  matches: " + ", ".join(map(str, exc.details["matches"])))
    else:
        err.print(f"[red]error[/red] cannot reach the service: {exc}")
    return typer.Exit(code=1)


def _size(n: float | None) -> str:
    return human_size(n or 0)


def _print_json(data: Any) -> None:
    typer.echo(json.dumps(data, indent=2))


def follow_job(client: Client, job: dict[str, Any], *, quiet: bool = False) -> dict[str, Any]:
    """Show a job's progress live (from its event stream) and return it finished."""
    if quiet:
        waited: dict[str, Any] = client.wait_job(job["id"])
        return waited
    if not err.is_terminal:  # a log or a pipe: one line per step instead of a live bar
        return _follow_plain(client, job)
    columns = (
        SpinnerColumn(),  # moves even while the job reports no step (one placement: 0 of 1)
        TextColumn("{task.description}"),
        BarColumn(),
        TaskProgressColumn(),
        TimeElapsedColumn(),
    )
    with Progress(*columns, console=err, transient=True) as bar:
        task = bar.add_task(f"{job['kind']} {job['id']}", total=None)
        for event in client.job_events(job["id"]):
            info = event.get("info") or {}
            progress = event.get("progress") or info.get("progress") or {}
            done, total = progress.get("done"), progress.get("total")
            if done is None and "component" in progress:
                done, total = progress.get("component", 0) - 1, progress.get("components")
            if done is None and "done_bytes" in progress:
                done, total = progress["done_bytes"], progress.get("total_bytes")
            if total is not None and total <= 1 and not done:
                total = None  # a single unit not yet done: a pulsing bar, not a frozen 0%
            where = f"on {progress['device']}" if progress.get("device") else ""
            step = progress.get("step") or progress.get("phase") or where
            bar.update(task, completed=done or 0, total=total or None,
                       description=f"{job['kind']} {step}".strip())  # fmt: skip
            if _ended(event):
                break
    final: dict[str, Any] = client.job(job["id"])
    return final


def _ended(event: dict[str, Any]) -> bool:
    info = event.get("info") or {}
    return event.get("type") in ("job.succeeded", "job.failed", "job.cancelled") or (
        event.get("type") == "job.state" and info.get("state") in ("succeeded", "failed", "cancelled")
    )


def _follow_plain(client: Client, job: dict[str, Any]) -> dict[str, Any]:
    """``follow_job`` where stderr is no terminal: a line when the job starts, at each new step
    and at its end, so that a long operation is never silent."""
    err.print(f"{job['kind']} {job['id']}: started", highlight=False)
    last = ""
    for event in client.job_events(job["id"]):
        info = event.get("info") or {}
        progress = event.get("progress") or info.get("progress") or {}
        step = str(progress.get("step") or progress.get("phase") or "")
        if step and step != last:
            err.print(f"{job['kind']} {job['id']}: {step}", highlight=False)
            last = step
        if _ended(event):
            break
    final: dict[str, Any] = client.job(job["id"])
    err.print(f"{job['kind']} {job['id']}: {final['state']}", highlight=False)
    return final


def _finish(client: Client, answer: dict[str, Any], as_json: bool) -> dict[str, Any]:
    """A started job followed to its end; its error becomes the command's failure."""
    job = follow_job(client, answer["job"], quiet=as_json)
    if job["state"] != "succeeded":
        raise JobFailed.of(job)
    return job


# ---------------------------------------------------------------------- serve


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

    from modelkeeper.api.app import create_app
    from modelkeeper.orchestrator import Settings

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
    except (ValidationError, ValueError) as exc:
        err.print(f"[red]error[/red] settings: {exc}")
        raise typer.Exit(2) from None
    if demo:
        root = settings.model_roots[0]
        if not root.exists() or not any(root.iterdir()):
            from modelkeeper.testing import write_demo_models

            with err.status(f"writing demo models into {root}"):
                write_demo_models(root)
    err.print(
        f"modelkeeper serving on http://{settings.host}:{settings.port}  "
        f"(models: {', '.join(str(r) for r in settings.model_roots)}; devices: {', '.join(settings.devices)}; "
        f"docs: /docs)"
    )
    if cluster is not None:
        from modelkeeper.cluster import ClusterOrchestrator, ClusterSettings

        err.print(f"cluster mode: Ray at {cluster}; each node's agent reads that node's settings")
        app = create_app(service=ClusterOrchestrator(settings, ClusterSettings(address=cluster)))
    else:
        app = create_app(settings)
    uvicorn.run(app, host=settings.host, port=settings.port, log_level="warning")


# ---------------------------------------------------------------------- status


def _placement_line(m: dict[str, Any]) -> str:
    """``name (state)``, with the LoRAs applied to it and their strengths."""
    loras = (m.get("loras") or {}).values()
    applied = "".join(f" + {lora['lora']} x{lora['strength']:g}" for lora in loras)
    return f"{m['name']} ({m['state']}){applied}"


def status(
    device: Annotated[str | None, typer.Argument(help="One device only.")] = None,
    as_json: ApiJsonOption = False,
    url: UrlOption = None,
    token: TokenOption = None,
) -> None:
    """Devices, their memory and loaded models; the RAM cache; jobs."""
    data = _call(url, token, lambda c: c.status(device))
    if as_json:
        _print_json(data)
        return
    devices = [data] if device else data["devices"]
    table = Table(title="devices")
    for col in ("device", "state", "pid", "used", "budget", "models", "queued"):
        table.add_column(col)
    for d in devices:
        mem = d.get("memory") or {}
        names = ", ".join(_placement_line(m) for m in d["models"]) or "-"
        table.add_row(d["id"], d["state"], str(d.get("pid") or "-"), _size(mem.get("models_bytes")),
                      _size(mem.get("budget_bytes")), names, str(d.get("queued", 0)))  # fmt: skip
    console = Console()
    console.print(table)
    if not device and data.get("cache"):
        cs = data["cache"]
        console.print(
            f"RAM cache: {cs['segments']} segments, {_size(cs['bytes_used'])} of {_size(cs['budget_bytes'])}, "
            f"hit rate {cs['hit_rate']:.0%}, {cs['evictions']} evictions · jobs: "
            + ", ".join(f"{k} {v}" for k, v in data["jobs"].items() if v)
        )


# ---------------------------------------------------------------------- routing


def route(
    model: Annotated[str, typer.Argument(help="Model id, name, path or hash prefix.")],
    load: Annotated[bool, typer.Option("--load", help="Load it first when it is loaded nowhere.")] = False,
    as_json: ApiJsonOption = False,
    url: UrlOption = None,
    token: TokenOption = None,
) -> None:
    """Which node and device serve a model now (cluster mode: node/device)."""
    data = _call(url, token, lambda c: c.route(model, load=load))
    if as_json:
        _print_json(data)
        return
    if not data["loaded"]:
        Console().print(f"{data['name']} [dim]{data['model_id']}[/dim] is loaded nowhere")
        raise typer.Exit(1)
    Console().print(f"{data['name']} [dim]{data['model_id']}[/dim] on {data['device']}")


def pull(
    source: Annotated[
        str,
        typer.Argument(help="A Hub repo (org/name[@rev][:file]), an https URL, or civitai:VERSION_ID."),
    ],
    model_type: Annotated[
        str | None, typer.Option("--type", help="Folder by type (checkpoint, lora, vae...).")
    ] = None,
    name: Annotated[str | None, typer.Option(help="File or folder name in the model root.")] = None,
    sha256: Annotated[str | None, typer.Option(help="Expected SHA-256 (URLs declare none).")] = None,
    as_json: ApiJsonOption = False,
    url: UrlOption = None,
    token: TokenOption = None,
) -> None:
    """Download a model into the service's first model root, verified, and register it (a progress bar;
    an interrupted pull resumes where it stopped). Hub tokens: HF_TOKEN; CivitAI: CIVITAI_TOKEN, both
    read by the service."""

    def run(c: Client) -> dict[str, Any]:
        answer = c.install(source, model_type=model_type, name=name, sha256=sha256, wait=False)
        return _finish(c, answer, as_json)

    result = _call(url, token, run)["result"]
    if as_json:
        _print_json(result)
        return
    fetched = result["transferred_bytes"]
    Console().print(
        f"[green]installed[/green] {result['name']} [dim]{result['model_id']}[/dim] ({result['type']}) at "
        f"{result['path']}: {_size(result['bytes'])}, {_size(fetched)} fetched in {result['seconds']:.1f} s"
    )


# ---------------------------------------------------------------------- load and unload


def load(
    model: Annotated[str, typer.Argument(help="Model id, name, path or hash prefix.")],
    device: DeviceOption = None,
    priority: Annotated[str, typer.Option(help="low, normal, high, critical")] = "normal",
    timeout: Annotated[float | None, typer.Option(help="Time limit in seconds, queue included.")] = None,
    force: Annotated[bool, typer.Option(help="Evict leased or kept models to make room.")] = False,
    keep_loaded: Annotated[bool, typer.Option(help="Reload after a worker restart.")] = False,
    keep_alive: Annotated[
        float | None,
        typer.Option(help="Seconds it stays after its last use (0: as soon as unused, -1: never)."),
    ] = None,
    dtype: Annotated[str | None, typer.Option(help="Compute dtype: float32, float16, bfloat16.")] = None,
    storage_dtype: Annotated[
        str | None, typer.Option(help="Keep weights in fp8 on the device: float8_e4m3fn, float8_e5m2.")
    ] = None,
    offload: Annotated[
        str | None,
        typer.Option(help="none, auto (what fits stays, the rest streams from RAM) or bytes kept resident."),
    ] = None,
    detach: Annotated[bool, typer.Option(help="Print the job and return at once.")] = False,
    as_json: ApiJsonOption = False,
    url: UrlOption = None,
    token: TokenOption = None,
) -> None:
    """Load a model on a device (placement chooses when --device is not given), with a progress bar."""

    def run(c: Client) -> dict[str, Any]:
        answer = c.load(model, device, wait=False, priority=priority, timeout=timeout, force=force,
                        keep_loaded=keep_loaded, keep_alive=keep_alive, dtype=dtype,
                        storage_dtype=storage_dtype,
                        offload=int(offload) if offload and offload.isdigit() else offload)  # fmt: skip
        return answer["job"] if detach else _finish(c, answer, as_json)

    job = _call(url, token, run)
    if detach:
        _print_json(job) if as_json else typer.echo(job["id"])
        return
    result = job["result"]
    if as_json:
        _print_json(result)
        return
    note = " (already loaded)" if result.get("already_loaded") else ""
    Console().print(
        f"[green]loaded[/green] {result['name']} [dim]{result['model_id']}[/dim] on {result['device']}{note}: "
        f"{_size(result['bytes'])} in {result.get('load_seconds') or 0:.2f} s "
        f"({', '.join(f'{k} from {v}' for k, v in result['sources'].items())})"
    )


def unload(
    model: Annotated[str, typer.Argument(help="Model id, name, path or hash prefix.")],
    device: DeviceOption = None,
    force: Annotated[bool, typer.Option(help="Unload even when leased.")] = False,
    as_json: ApiJsonOption = False,
    url: UrlOption = None,
    token: TokenOption = None,
) -> None:
    """Unload a model from one device or from every device holding it."""
    data = _call(url, token, lambda c: c.unload(model, device, force=force or None))
    if as_json:
        _print_json(data)
        return
    for u in data["unloaded"]:
        Console().print(
            f"[green]unloaded[/green] {u['model_id']} from {u['device']}: {_size(u['freed_bytes'])} freed"
        )


# ---------------------------------------------------------------------- validate, benchmark, optimize


def _operation(
    kind: str, model: str, options: dict[str, Any], as_json: bool, url: str | None, token: str | None
) -> None:
    given = {k: v for k, v in options.items() if v is not None}
    job = _call(url, token, lambda c: _finish(c, getattr(c, kind)(model, wait=False, **given), as_json))
    result = job["result"]
    if as_json:
        _print_json(result)
        return
    console = Console()
    for r in result:  # one entry per placement
        for name, comp in r["components"].items():
            if kind == "validate":
                mark = "[green]passed[/green]" if comp.get("passed") else "[red]FAILED[/red]"
                console.print(f"{r['model_id']} {name} on {r['device']}: {mark} ({comp.get('level')})")
                for check in comp.get("checks", []):
                    if not check.get("passed"):
                        console.print(f"   [red]✗[/red] {check.get('name')}: {check.get('detail')}")
            elif kind == "benchmark":
                for f in comp.get("figures", []):
                    console.print(f"{r['model_id']} {name} {f.get('part', '')}: median {f['median_s'] * 1000:.2f} ms, "
                                  f"p90 {f['p90_s'] * 1000:.2f} ms, {f['iterations_per_second']:.1f} it/s")  # fmt: skip
            elif "reverted" in comp:
                reverted = ", ".join(map(str, comp["reverted"])) or "nothing"
                console.print(f"{r['model_id']} {name}: reverted {reverted}")
            else:
                applied = (
                    ", ".join(f"{a['option']}={a['after']}" for a in comp.get("applied", [])) or "nothing"
                )
                speed = comp.get("speedup")
                console.print(
                    f"{r['model_id']} {name}: applied {applied}" + (f"; {speed:.2f}x" if speed else "")
                )


def validate(
    model: Annotated[str, typer.Argument(help="A loaded model.")],
    level: Annotated[str, typer.Option(help="header, weights or functional")] = "weights",
    device: DeviceOption = None,
    as_json: ApiJsonOption = False,
    url: UrlOption = None,
    token: TokenOption = None,
) -> None:
    """Validate a loaded model: header, weights (NaN, Inf, shapes), or a functional forward pass."""
    _operation("validate", model, {"level": level, "device_id": device}, as_json, url, token)


def benchmark(
    model: Annotated[str, typer.Argument(help="A loaded model.")],
    steps: Annotated[int, typer.Option(min=1)] = 10,
    warmup: Annotated[int, typer.Option(min=0)] = 2,
    batch: Annotated[int, typer.Option(min=1)] = 1,
    resolution: Annotated[int | None, typer.Option(min=8)] = None,
    device: DeviceOption = None,
    as_json: ApiJsonOption = False,
    url: UrlOption = None,
    token: TokenOption = None,
) -> None:
    """Time forward passes of a loaded model: median, p90, it/s, peak memory."""
    options = {
        "steps": steps,
        "warmup": warmup,
        "batch": batch,
        "resolution": resolution,
        "device_id": device,
    }
    _operation("benchmark", model, options, as_json, url, token)


def optimize(
    model: Annotated[str, typer.Argument(help="A loaded model.")],
    opt: Annotated[
        list[str] | None,
        typer.Option("--opt", "-o", help="key=value: dtype=float16, channels_last=true, ..."),
    ] = None,
    revert: Annotated[bool, typer.Option(help="Undo earlier optimisations.")] = False,
    device: DeviceOption = None,
    as_json: ApiJsonOption = False,
    url: UrlOption = None,
    token: TokenOption = None,
) -> None:
    """Apply optimisations to a loaded model (dtype, channels_last, attention, VAE slicing/tiling, compile)."""
    options: dict[str, Any] = {}
    for item in opt or []:
        key, sep, value = item.partition("=")
        if not sep:
            err.print(f"[red]error[/red] --opt {item!r}: expected key=value")
            raise typer.Exit(2)
        options[key] = json.loads(value) if value in ("true", "false") or value.isdigit() else value
    _operation(
        "optimize", model, {"options": options, "revert": revert, "device_id": device}, as_json, url, token
    )


def optimize_memory(
    device: Annotated[str, typer.Argument(help="The device: cuda:0, cpu...")],
    target_mb: Annotated[
        float | None,
        typer.Option(
            "--target-mb", min=0, help="Unload idle models until this many MB of the budget are free."
        ),
    ] = None,
    as_json: ApiJsonOption = False,
    url: UrlOption = None,
    token: TokenOption = None,
) -> None:
    """Free a device's cached memory; with --target-mb, unload least-recently-used idle models."""
    with err.status(f"freeing memory on {device}"):
        data = _call(url, token, lambda c: c.optimize_memory(device, target_free_mb=target_mb))
    if as_json:
        _print_json(data)
        return
    unloaded = ", ".join(data["unloaded"]) or "no model"
    met = "" if target_mb is None else ("; target met" if data["target_met"] else "; target NOT met")
    Console().print(f"{device}: {_size(data['freed_bytes'])} freed, unloaded {unloaded}{met}")


# ---------------------------------------------------------------------- LoRA

lora_app = typer.Typer(help="LoRAs on the loaded models of a running service.", no_args_is_help=True)
LoraArgument = Annotated[str, typer.Argument(help="The LoRA: model id, name, path or hash prefix.")]
LoadedArgument = Annotated[str, typer.Argument(help="A loaded model: id, name, path or hash prefix.")]


def _lora_devices(data: dict[str, Any], key: str) -> str:
    return ", ".join(str(d["device"]) for d in data.get(key, [])) or "no device"


@lora_app.command("apply")
def lora_apply(
    model: LoadedArgument,
    lora: LoraArgument,
    strength: Annotated[float, typer.Option(help="Scale of the LoRA's change.")] = 1.0,
    device: DeviceOption = None,
    as_json: ApiJsonOption = False,
    url: UrlOption = None,
    token: TokenOption = None,
) -> None:
    """Apply a LoRA to a loaded model (on every device holding it, or on --device)."""
    with err.status(f"applying {lora} to {model}"):
        data = _call(url, token, lambda c: c.apply_lora(model, lora, strength=strength, device=device))
    if as_json:
        _print_json(data)
        return
    for d in data["applied"]:
        keys = f"{d['matched_keys']} keys" if "matched_keys" in d else ""
        Console().print(
            f"[green]applied[/green] {lora} x{strength:g} to {model} on {d['device']}"
            + (f": {keys}" if keys else "")
        )


@lora_app.command("strength")
def lora_strength(
    model: LoadedArgument,
    lora: LoraArgument,
    strength: Annotated[float, typer.Argument(help="The new strength (0 turns it off).")],
    device: DeviceOption = None,
    as_json: ApiJsonOption = False,
    url: UrlOption = None,
    token: TokenOption = None,
) -> None:
    """Change the strength of a LoRA applied to a loaded model."""
    data = _call(url, token, lambda c: c.lora_strength(model, lora, strength, device=device))
    if as_json:
        _print_json(data)
        return
    Console().print(f"{lora} on {model}: strength {strength:g} on {_lora_devices(data, 'devices')}")


@lora_app.command("remove")
def lora_remove(
    model: LoadedArgument,
    lora: LoraArgument,
    device: DeviceOption = None,
    as_json: ApiJsonOption = False,
    url: UrlOption = None,
    token: TokenOption = None,
) -> None:
    """Remove a LoRA from a loaded model: its original weights come back."""
    data = _call(url, token, lambda c: c.remove_lora(model, lora, device=device))
    if as_json:
        _print_json(data)
        return
    Console().print(f"[green]removed[/green] {lora} from {model} on {_lora_devices(data, 'devices')}")


# ---------------------------------------------------------------------- cache


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
    data = _call(url, token, lambda c: c.cache())
    if as_json:
        _print_json(data)
        return
    st = data["stats"]
    table = Table(
        title=f"RAM cache: {_size(st['bytes_used'])} of {_size(st['budget_bytes'])}, hit rate {st['hit_rate']:.0%}"
    )
    for col in ("component", "size", "hits", "models", "pinned"):
        table.add_column(col)
    for s in data["segments"]:
        table.add_row(
            s["component_id"], _size(s["bytes"]), str(s["hits"]), ", ".join(s["models"]), str(s["pinned"])
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
    job = _call(url, token, lambda c: _finish(c, c.cache_model(model, wait=False), as_json))
    if as_json:
        _print_json(job["result"])
        return
    for s in job["result"]["segments"]:
        Console().print(
            f"[green]cached[/green] {s['component']} as {s['component_id']} ({_size(s['bytes'])})"
        )


@cache_app.command("drop")
def cache_drop(
    component_id: Annotated[str, typer.Argument()],
    force: bool = False,
    url: UrlOption = None,
    token: TokenOption = None,
) -> None:
    """Drop one segment."""
    data = _call(url, token, lambda c: c.cache_drop(component_id, force=force))
    Console().print(f"dropped {component_id}: {_size(data['freed_bytes'])} freed")


@cache_app.command("clear")
def cache_clear(force: bool = False, url: UrlOption = None, token: TokenOption = None) -> None:
    """Drop every segment."""
    data = _call(url, token, lambda c: c.cache_clear(force=force))
    Console().print(f"dropped {data['dropped']} segments: {_size(data['freed_bytes'])} freed")


# ---------------------------------------------------------------------- jobs


jobs_app = typer.Typer(help="Jobs of a running service.", invoke_without_command=True)


@jobs_app.callback()
def jobs_list(
    ctx: typer.Context,
    state: Annotated[str | None, typer.Option(help="queued, running, succeeded, failed, cancelled")] = None,
    as_json: ApiJsonOption = False,
    url: UrlOption = None,
    token: TokenOption = None,
) -> None:
    """List jobs, newest first (the default)."""
    if ctx.invoked_subcommand is not None:
        return
    data = _call(url, token, lambda c: c.jobs(state=state))
    if as_json:
        _print_json(data)
        return
    table = Table(title="jobs")
    for col in ("id", "kind", "state", "params", "seconds", "error"):
        table.add_column(col)
    for j in data:
        secs = (j["finished_at"] or 0) - (j["started_at"] or 0) if j["finished_at"] else None
        params = ", ".join(f"{k}={v}" for k, v in j["params"].items() if v not in (None, False))
        error = (j.get("error") or {}).get("error_code", "")
        table.add_row(j["id"], j["kind"], j["state"], params, f"{secs:.2f}" if secs else "-", error)
    Console().print(table)


@jobs_app.command("watch")
def jobs_watch(job_id: str, url: UrlOption = None, token: TokenOption = None) -> None:
    """Follow a job's progress until it ends."""
    job = _call(url, token, lambda c: follow_job(c, c.job(job_id)))
    Console().print(f"{job['id']} {job['kind']}: {job['state']}")


@jobs_app.command("cancel")
def jobs_cancel(job_id: str, url: UrlOption = None, token: TokenOption = None) -> None:
    """Cancel a job."""
    job = _call(url, token, lambda c: c.cancel_job(job_id))
    Console().print(f"{job['id']} {job['kind']}: {job['state']}")


@jobs_app.command("show")
def jobs_show(job_id: str, url: UrlOption = None, token: TokenOption = None) -> None:
    """Print one job as JSON."""
    _print_json(_call(url, token, lambda c: c.job(job_id)))
