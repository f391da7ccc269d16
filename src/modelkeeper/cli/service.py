"""Commands on the devices and models of a running service: ``status``, ``route``, ``pull``,
``load``, ``unload`` and ``optimize-memory``. Long ones (``pull``, ``load``) show a live progress
bar fed by the job's event stream (:mod:`modelkeeper.cli.remote`).
"""

from __future__ import annotations

from typing import Annotated, Any

import typer
from rich.console import Console

from modelkeeper.cli.choices import Dtype, Priority, StorageDtype, timeout_option
from modelkeeper.cli.common import count, json_option
from modelkeeper.cli.explain import local_path
from modelkeeper.cli.remote import (
    MODEL_HELP,
    ApiJsonOption,
    DeviceOption,
    JobJsonOption,
    TokenOption,
    UrlOption,
    call,
    err,
    finish,
    print_json,
    size,
)
from modelkeeper.cli.tables import Column, print_table
from modelkeeper.client import Client
from modelkeeper.sizes import parse_size

# ---------------------------------------------------------------------- status


def _placement_line(m: dict[str, Any]) -> str:
    """``handle (state)`` (the handle tells apart two models of one name), with the LoRAs applied
    to it and their strengths."""
    loras = (m.get("loras") or {}).values()
    applied = "".join(f" + {lora['lora']} x{lora['strength']:g}" for lora in loras)
    return f"{m.get('handle') or m['name']} ({m['state']}){applied}"


#: The device and the handles of its models are what a user types next: never cut.
DEVICE_COLUMNS = (
    Column("device", whole=True),
    Column("state"),
    Column("pid"),
    Column("used"),
    Column("budget"),
    Column("models", whole=True),
    Column("queued"),
)


def status(
    device: Annotated[str | None, typer.Argument(help="One device only.")] = None,
    as_json: ApiJsonOption = False,
    url: UrlOption = None,
    token: TokenOption = None,
) -> None:
    """Devices, their memory and loaded models; the RAM cache; jobs."""
    data = call(url, token, lambda c: c.status(device))
    if as_json:
        print_json(data)
        return
    readiness = {} if device else call(url, token, _readiness)
    devices = [data] if device else data["devices"]
    rows = []
    for d in devices:
        mem = d.get("memory") or {}
        names = ", ".join(_placement_line(m) for m in d["models"]) or "-"
        rows.append([d["id"], d["state"], str(d.get("pid") or "-"), size(mem.get("models_bytes")),
                     size(mem.get("budget_bytes")), names, str(d.get("queued", 0))])  # fmt: skip
    console = Console()
    print_table(console, "devices", DEVICE_COLUMNS, rows)
    for d in devices:
        if d.get("last_error"):
            console.print(f"{d['id']}: last error: {d['last_error']}", highlight=False, markup=False)
    if readiness and not (readiness.get("ready", True) and data.get("ready", True)):
        _not_ready(console, readiness)
    if not device and data.get("cache"):
        cs = data["cache"]
        console.print(
            f"RAM cache: {count(cs['segments'], 'segment')}, {size(cs['bytes_used'])} of {size(cs['budget_bytes'])}, "
            f"hit rate {cs['hit_rate']:.0%}, {cs['evictions']} evictions · jobs: "
            + ", ".join(f"{k} {v}" for k, v in data["jobs"].items() if v),
            soft_wrap=True,
        )


def _readiness(c: Client) -> dict[str, Any]:
    """``/health/ready``'s body: it answers 503 with the same body as 200, not an error body."""
    try:
        body = c.http.get("/health/ready").json()
    except ValueError:  # not JSON: a proxy's page; the table says what it can without it
        return {}
    return body if isinstance(body, dict) else {}


def _not_ready(console: Console, readiness: dict[str, Any]) -> None:
    """Why the service is not ready: workers not ready, preload models pending or failed."""
    preload = readiness.get("preload") or {}
    waiting = [f"{d} {state}" for d, state in (readiness.get("workers") or {}).items() if state != "ready"]
    if preload.get("pending"):
        waiting.append(f"{count(preload['pending'], 'preload model')} still loading")
    console.print("[yellow]not ready[/yellow]" + (f": {', '.join(waiting)}" if waiting else ""))
    for failed in preload.get("failed") or []:
        why = failed.get("error") or failed.get("error_code") or ""
        console.print(f"  preload {failed.get('model')} failed: {why}", highlight=False, markup=False)


# ---------------------------------------------------------------------- routing


def route(
    model: Annotated[str, typer.Argument(help=MODEL_HELP)],
    load: Annotated[bool, typer.Option("--load", help="Load it first when it is loaded nowhere.")] = False,
    as_json: ApiJsonOption = False,
    url: UrlOption = None,
    token: TokenOption = None,
) -> None:
    """Which node and device serve a model now (cluster mode: node/device)."""
    data = call(url, token, lambda c: c.route(local_path(model), load=load))
    if as_json:
        print_json(data)
        return
    if not data["loaded"]:
        Console().print(f"{data['name']} [dim]{data['model_id']}[/dim] is loaded nowhere")
        raise typer.Exit(1)
    Console().print(f"{data['name']} [dim]{data['model_id']}[/dim] on {data['device']}")


def pull(
    source: Annotated[
        str,
        typer.Argument(help="A Hub repo (org/name\\[@rev]\\[:file]), an https URL, or civitai:VERSION_ID."),
    ],
    model_type: Annotated[
        str | None, typer.Option("--type", help="Folder by type (checkpoint, lora, vae...).")
    ] = None,
    name: Annotated[str | None, typer.Option(help="File or folder name in the model root.")] = None,
    sha256: Annotated[str | None, typer.Option(help="Expected SHA-256 (URLs declare none).")] = None,
    as_json: JobJsonOption = False,
    url: UrlOption = None,
    token: TokenOption = None,
) -> None:
    """Download a model into the service's first model root, verified, and register it (a progress bar;
    an interrupted pull resumes where it stopped). Hub tokens: HF_TOKEN; CivitAI: CIVITAI_TOKEN, both
    read by the service."""

    def run(c: Client) -> dict[str, Any]:
        answer = c.install(source, model_type=model_type, name=name, sha256=sha256, wait=False)
        return finish(c, answer, as_json)

    result = call(url, token, run)["result"]
    if as_json:
        print_json(result)
        return
    fetched = result["transferred_bytes"]
    Console().print(
        f"[green]installed[/green] {result['name']} [dim]{result['model_id']}[/dim] ({result['type']}) at "
        f"{result['path']}: {size(result['bytes'])}, {size(fetched)} fetched in {result['seconds']:.1f} s"
    )


# ---------------------------------------------------------------------- load and unload


def offload_option(value: str | None) -> str | None:
    """``--offload``: none, auto or a size (checked here, so that a typo never reaches the service)."""
    if value is not None and value not in ("none", "auto"):
        try:
            parse_size(value)
        except ValueError as exc:
            raise typer.BadParameter(f"expected none, auto or a size like 4GB ({exc})") from None
    return value


def offload_value(value: str | None) -> str | int | None:
    return value if value in (None, "none", "auto") else parse_size(value)


def load(
    model: Annotated[str, typer.Argument(help=MODEL_HELP)],
    device: DeviceOption = None,
    priority: Annotated[
        Priority, typer.Option(help="Queue order: low, normal, high or critical.")
    ] = "normal",
    timeout: Annotated[
        float | None, typer.Option(help="Time limit in seconds, queue included.", callback=timeout_option)
    ] = None,
    force: Annotated[bool, typer.Option(help="Evict leased or kept models to make room.")] = False,
    keep_loaded: Annotated[bool, typer.Option(help="Reload after a worker restart.")] = False,
    keep_alive: Annotated[
        float | None,
        typer.Option(min=-1, help="Seconds it stays after its last use (0: as soon as unused, -1: never)."),
    ] = None,
    dtype: Annotated[Dtype | None, typer.Option(help="Compute dtype: float32, float16, bfloat16.")] = None,
    storage_dtype: Annotated[
        StorageDtype | None,
        typer.Option(help="Keep weights in fp8 on the device: float8_e4m3fn, float8_e5m2."),
    ] = None,
    offload: Annotated[
        str | None,
        typer.Option(
            help="none, auto (what fits stays, the rest streams from RAM), or what stays resident: "
            "bytes or a size like 4GB, 512MiB.",
            callback=offload_option,
        ),
    ] = None,
    reload: Annotated[
        bool,
        typer.Option(
            help="If the model is loaded in another form (dtype, storage dtype, offload), unload it and "
            "load it again as asked (its LoRAs are dropped); without it such a load is refused."
        ),
    ] = False,
    detach: Annotated[bool, typer.Option(help="Print the job and return at once.")] = False,
    as_json: Annotated[
        bool, json_option("Print the load's result as JSON (with --detach: the job).")
    ] = False,
    url: UrlOption = None,
    token: TokenOption = None,
) -> None:
    """Load a model on a device (placement chooses when --device is not given), with a progress bar."""

    def run(c: Client) -> dict[str, Any]:
        answer = c.load(local_path(model), device, wait=False, priority=priority, timeout=timeout, force=force,
                        keep_loaded=keep_loaded, keep_alive=keep_alive, dtype=dtype,
                        storage_dtype=storage_dtype, offload=offload_value(offload),
                        reload=reload or None)  # fmt: skip
        return answer["job"] if detach else finish(c, answer, as_json)

    job = call(url, token, run)
    if detach:
        print_json(job) if as_json else typer.echo(job["id"])
        return
    result = job["result"]
    if as_json:
        print_json(result)
        return
    note = " (already loaded)" if result.get("already_loaded") else ""
    if result.get("reloaded"):
        note = " (reloaded)"
    dropped = result.get("dropped_loras") or []
    # offloaded: `bytes` is what it holds on the device (resident weights and ring), the rest streams
    streamed = (
        f" on the device, {size(result['streamed_bytes'])} streamed from RAM"
        if result.get("streamed_bytes")
        else ""
    )
    Console().print(
        f"[green]loaded[/green] {result.get('handle') or result['name']} on {result['device']}{note}: "
        f"{size(result['bytes'])}{streamed} in {result.get('load_seconds') or 0:.2f} s "
        f"({', '.join(f'{k} from {v}' for k, v in result['sources'].items())})"
    )
    if dropped:
        names = ", ".join(f"{d.get('handle') or d['lora_id']} x{d['strength']:g}" for d in dropped)
        err.print(f"[yellow]dropped[/yellow] LoRAs {names}: apply them again with `modelkeeper lora apply`")


def unload(
    model: Annotated[str, typer.Argument(help=MODEL_HELP)],
    device: DeviceOption = None,
    force: Annotated[bool, typer.Option(help="Unload even when leased.")] = False,
    as_json: ApiJsonOption = False,
    url: UrlOption = None,
    token: TokenOption = None,
) -> None:
    """Unload a model from one device or from every device holding it."""
    data = call(url, token, lambda c: c.unload(local_path(model), device, force=force or None))
    if as_json:
        print_json(data)
        return
    for u in data["unloaded"]:
        Console().print(
            f"[green]unloaded[/green] {u.get('handle') or u['model_id']} from {u['device']}: "
            f"{size(u['freed_bytes'])} freed"
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
        data = call(url, token, lambda c: c.optimize_memory(device, target_free_mb=target_mb))
    if as_json:
        print_json(data)
        return
    unloaded = ", ".join(data["unloaded"]) or "no model"
    met = "" if target_mb is None else ("; target met" if data["target_met"] else "; target NOT met")
    Console().print(f"{device}: {size(data['freed_bytes'])} freed, unloaded {unloaded}{met}")
