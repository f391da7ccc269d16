"""``validate``, ``benchmark`` and ``optimize``: operations on every loaded component of a model
on a running service, each a job followed to its end, its result printed per placement and
component."""

from __future__ import annotations

import json
from typing import Annotated, Any

import typer
from rich.console import Console
from rich.markup import escape

from modelkeeper.cli.choices import Level
from modelkeeper.cli.common import error_exit
from modelkeeper.cli.explain import local_path
from modelkeeper.cli.remote import (
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
from modelkeeper.protocol.errors import ErrorCode


def _operation(
    kind: str, model: str, options: dict[str, Any], as_json: bool, url: str | None, token: str | None
) -> None:
    given = {k: v for k, v in options.items() if v is not None}
    job = call(
        url, token, lambda c: finish(c, getattr(c, kind)(local_path(model), wait=False, **given), as_json)
    )
    result = job["result"]
    if as_json:
        print_json(result)
    else:
        _print_result(kind, result)
    if kind == "validate":
        _fail_unless_passed(result, as_json)


def _print_result(kind: str, result: list[dict[str, Any]]) -> None:
    """An operation's result as lines: one per placement and component (a benchmark's: per part)."""
    console = Console()
    for r in result:  # one entry per placement
        model = r.get("handle") or r["model_id"]  # a service before handles were answered: the id
        for name, comp in r["components"].items():
            if kind == "validate":
                mark = "[green]passed[/green]" if comp.get("passed") else "[red]FAILED[/red]"
                console.print(f"{model} {name} on {r['device']}: {mark} ({comp.get('level')})")
                for check in comp.get("checks", []):
                    if not check.get("passed"):
                        console.print(f"   [red]✗[/red] {check.get('name')}: {check.get('detail')}")
            elif kind == "benchmark":
                for f in comp.get("figures", []):
                    peak = f.get("peak_memory_bytes")  # a worker before it measured memory: none
                    console.print(f"{model} {name} {f.get('part', '')}: median {f['median_s'] * 1000:.2f} ms, "
                                  f"p90 {f['p90_s'] * 1000:.2f} ms, {f['iterations_per_second']:.1f} it/s"
                                  + (f", peak memory {size(peak)}" if peak is not None else ""))  # fmt: skip
            elif "reverted" in comp:
                reverted = ", ".join(map(str, comp["reverted"])) or "nothing"
                console.print(f"{model} {name}: reverted {reverted}")
            else:
                applied = (
                    ", ".join(f"{a['option']}={a['after']}" for a in comp.get("applied", [])) or "nothing"
                )
                speed = comp.get("speedup")
                console.print(f"{model} {name}: applied {applied}" + (f"; {speed:.2f}x" if speed else ""))


def _fail_unless_passed(result: list[dict[str, Any]], as_json: bool) -> None:
    """End a validation that did not pass with exit code 1, naming each component that failed
    (with ``--json`` the result printed already says which: ``passed: false``)."""
    failed = [
        f"{r.get('handle') or r['model_id']} {name} on {r['device']}"
        for r in result
        for name, comp in r["components"].items()
        if not comp.get("passed")
    ]
    if not failed:
        return
    if not as_json:
        err.print(f"[red]error[/red] validation failed: {escape(', '.join(failed))}", highlight=False)
    raise typer.Exit(1)


def validate(
    model: Annotated[str, typer.Argument(help="A loaded model: handle, id, name, path or hash prefix.")],
    level: Annotated[Level, typer.Option(help="header, weights or functional.")] = "weights",
    device: DeviceOption = None,
    as_json: JobJsonOption = False,
    url: UrlOption = None,
    token: TokenOption = None,
) -> None:
    """Validate a loaded model: header, weights (NaN, Inf, shapes), or a functional forward pass.
    Exit code 1 when a component did not pass (named on stderr)."""
    _operation("validate", model, {"level": level, "device_id": device}, as_json, url, token)


def benchmark(
    model: Annotated[str, typer.Argument(help="A loaded model: handle, id, name, path or hash prefix.")],
    steps: Annotated[int, typer.Option(min=1, help="Timed passes.")] = 10,
    warmup: Annotated[int, typer.Option(min=0, help="Passes before timing (not counted).")] = 2,
    batch: Annotated[int, typer.Option(min=1, help="Batch size of each pass.")] = 1,
    resolution: Annotated[
        int | None,
        typer.Option(min=8, help="Image side in pixels, a multiple of 8 (default: the model's native size)."),
    ] = None,
    device: DeviceOption = None,
    as_json: JobJsonOption = False,
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
    model: Annotated[str, typer.Argument(help="A loaded model: handle, id, name, path or hash prefix.")],
    opt: Annotated[
        list[str] | None,
        typer.Option(
            "--opt",
            "-o",
            help="key=value (repeat): dtype=float32|float16|bfloat16, channels_last=true, attention=sdpa|default, "
            "vae_slicing=true, vae_tiling=true, compile=true.",
        ),
    ] = None,
    revert: Annotated[bool, typer.Option(help="Undo earlier optimisations.")] = False,
    device: DeviceOption = None,
    as_json: JobJsonOption = False,
    url: UrlOption = None,
    token: TokenOption = None,
) -> None:
    """Apply optimisations to a loaded model (dtype, channels_last, attention, VAE slicing/tiling, compile)."""
    options: dict[str, Any] = {}
    for item in opt or []:
        key, sep, value = item.partition("=")
        if not sep:
            raise error_exit(
                f"--opt {item!r}: expected key=value", ErrorCode.INVALID_REQUEST.value, exit_code=2
            )
        options[key] = json.loads(value) if value in ("true", "false") or value.isdigit() else value
    _operation(
        "optimize", model, {"options": options, "revert": revert, "device_id": device}, as_json, url, token
    )
