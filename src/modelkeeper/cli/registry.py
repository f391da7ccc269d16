"""Command line of the registry: ``modelkeeper ls``, ``show`` and ``meta``.

Plain typer command functions, mounted by :mod:`modelkeeper.cli.app`.
Every command takes ``--db`` (default ``$MODELKEEPER_DB`` or ``~/.local/share/modelkeeper/registry.sqlite3``).
"""

from __future__ import annotations

import json
import os
from typing import TYPE_CHECKING, Annotated, Any

import typer
from rich.console import Console
from rich.text import Text

from modelkeeper.cli.choices import Presence, SortKey
from modelkeeper.cli.common import DbOption, JsonOption, count, fail, human_size, open_registry
from modelkeeper.cli.listing import COLUMNS, COLUMNS_WITH_STATUS, Row, ls_lines
from modelkeeper.cli.tables import Column, print_table
from modelkeeper.protocol.errors import ErrorCode, ProtocolError
from modelkeeper.registry.vocabulary import ALIASES, VALUES

if TYPE_CHECKING:
    from modelkeeper.orchestrator.completion import PartsPlan


#: A component's name and content id, and a part's model (``handle:component``), are what users
#: type: never cut. A component's kind is its encoder for a text encoder (``clip_l``), and its
#: tensors their count by dtype (``F16 x212``): eight columns did not fit 80.
COMPONENT_COLUMNS = (
    Column("name", whole=True),
    Column("kind"),
    Column("tensors"),
    Column("parameters"),
    Column("size"),
    Column("content id", whole=True),
)
PART_COLUMNS = (Column("role"), Column("wants"), Column("model", whole=True), Column("why"))


def _size(n: int | None) -> str:
    return human_size(n) if n else "-"


def ls(
    *,
    type: Annotated[
        str | None,
        typer.Option(
            "--type",
            help=f"{', '.join(VALUES['type'])}; also {', '.join(ALIASES['type'])} (plurals too).",
        ),
    ] = None,
    base: Annotated[
        str | None,
        typer.Option(
            "--base",
            help="sd1, sd2, sdxl, sdxl_refiner, sd3, flux, any, unknown; also SD1.5, sd15, SDXL, sd3.5...",
        ),
    ] = None,
    format: Annotated[
        str | None, typer.Option("--format", help="safetensors, pickle, gguf, diffusers")
    ] = None,
    tag: Annotated[str | None, typer.Option("--tag", help="Only models with this tag.")] = None,
    query: Annotated[
        str | None,
        typer.Option(
            "--query",
            "-q",
            help="Words to find in names, file paths, descriptions, tags (any case, parts of words).",
        ),
    ] = None,
    status: Annotated[Presence, typer.Option("--status", help="ok, missing or all.")] = "ok",
    sort: Annotated[
        SortKey, typer.Option("--sort", help="name, type, base, size, created, updated")
    ] = "name",
    desc: Annotated[bool, typer.Option("--desc", help="Sort descending.")] = False,
    limit: Annotated[int, typer.Option("--limit", min=1)] = 100,
    offset: Annotated[int, typer.Option("--offset", min=0)] = 0,
    as_json: JsonOption = False,
    db: DbOption = None,
) -> None:
    """List the models of the registry: the handle to type for each, and where it lies."""
    try:
        with open_registry(db) as registry:
            page = registry.search(
                type=type,
                base=base,
                format=format,
                tag=tag,
                query=query,
                status=None if status == "all" else status,
                sort=sort,
                descending=desc,
                limit=limit,
                offset=offset,
            )
    except ProtocolError as exc:
        raise fail(exc) from exc
    if as_json:
        typer.echo(page.model_dump_json(indent=2))
        return
    paths = [m.path for m in page.items if m.path]
    common = os.path.commonpath(paths) if len(paths) > 1 else ""
    columns = COLUMNS if status == "ok" else COLUMNS_WITH_STATUS  # missing files: say which they are
    rows: list[Row] = []
    for m in page.items:
        path = os.path.relpath(m.path, common) if m.path and common else (m.path or "-")
        path += f" (+{m.locations - 1})" if m.locations > 1 else ""
        said = (m.status,) if status != "ok" else ()
        rows.append((m.handle, m.type, m.base, _size(m.size), *said, path))
    if not page.items and offset and page.total:
        typer.echo(f"no models at offset {offset} ({page.total} in all)")
        return
    title = count(page.total, "model")
    if page.total > len(page.items):
        title += f" (showing {offset + 1}-{offset + len(page.items)})"
    for line in ls_lines(title, common, rows, Console().width, columns):
        typer.echo(line)


def show(
    ref: Annotated[
        str,
        typer.Argument(
            help="Model handle (as ls shows it), id, name, path, or hash prefix (AutoV2, SHA-256, BLAKE3)."
        ),
    ],
    as_json: JsonOption = False,
    db: DbOption = None,
) -> None:
    """Show one model: identification, file, hashes, components, metadata, worker spec, and the
    parts a transformer-only Flux or SD3 file is loaded with."""
    from modelkeeper.orchestrator.completion import plan_parts  # the orchestrator: only for show

    try:
        with open_registry(db) as registry:
            record = registry.resolve(ref)
            spec = registry.worker_spec(record.id)
            history = registry.history(record.id, limit=20)
            plan = plan_parts(registry, record)
    except ProtocolError as exc:
        raise fail(exc) from exc
    data: dict[str, Any] = record.model_dump(mode="json")
    data["worker_spec"] = spec
    data["history"] = [h.model_dump(mode="json") for h in history]
    data["parts"] = plan.info() if plan is not None else []
    if as_json:
        typer.echo(json.dumps(data, indent=2))
        return
    console = Console()
    f = record.file
    console.print(f"[bold]{record.handle}[/bold]  [dim]{record.id}[/dim]  ({record.status})")
    if record.name != record.handle:
        console.print(f"  name {record.name}")
    console.print(
        f"  {record.type} · {record.base} · {record.variant} · {record.format} · layout {record.layout}"
    )
    console.print(f"  rule {record.rule} (confidence {record.confidence:.2f})")
    if record.identification.compatible_bases and len(record.identification.compatible_bases) > 1:
        console.print(f"  fits bases: {', '.join(record.identification.compatible_bases)}")
    if f is not None:
        console.print(f"  path {f.path}  ({_size(f.size)})")
        for other in record.locations[1:]:
            console.print(f"  also {other.path}  ({other.status.value})")
        for algo in ("blake3", "sha256", "autov2"):  # one a line: a terminal never cuts one mid-label
            console.print(f"  {algo} {getattr(f.hashes, algo) or '-'}", highlight=False, soft_wrap=True)
    if record.lora_format:
        console.print(f"  LoRA {record.lora_format}, rank {record.lora_rank}")
    if record.components:
        rows = [
            [
                c.name,
                c.encoder.value if c.encoder else c.kind.value,  # clip_l: a text encoder, which one
                ", ".join(f"{d} x{n}" for d, n in sorted(c.dtypes.items())) or str(c.tensor_count),
                f"{c.parameters:,}",
                _size(c.bytes),
                (c.content_id or "")[:16],
            ]
            for c in record.components
        ]
        print_table(console, "components", COMPONENT_COLUMNS, rows)
    if plan is not None:
        _print_parts(console, plan)
    meta = record.meta
    for key in ("description", "source_url", "license"):
        value = getattr(meta, key)
        if value:
            console.print(f"  {key}: {value}")
    if meta.tags:
        console.print(f"  tags: {', '.join(meta.tags)}")
    if meta.trigger_words:
        console.print(f"  trigger words: {', '.join(meta.trigger_words)}")
    for conflict in record.identification.hint_conflicts:
        console.print(f"  [yellow]hint[/yellow] {conflict}")


def _print_parts(console: Console, plan: PartsPlan) -> None:
    """The parts a transformer-only model is loaded with, and what is missing."""
    colours = {"auto": "green", "pinned": "cyan", "missing": "red", "refused": "red"}
    rows: list[list[str | Text]] = []
    for part in plan.info():
        model = Text(part["handle"]) if part["handle"] else Text(part["status"], colours[part["status"]])
        if part["component"]:
            model.append(f":{part['component']}")
        if part["status"] == "pinned":
            model.append(" (pinned)", "cyan")
        rows.append([part["role"], part["wants"], model, part["why"]])
    print_table(console, "parts (a load places them beside the transformer)", PART_COLUMNS, rows)


def meta(
    ref: Annotated[str, typer.Argument(help="Model handle, id, name, path, or hash prefix.")],
    *,
    set_: Annotated[
        list[str] | None,
        typer.Option(
            "--set",
            help="key=value; keys: name, description, tags (comma-separated), trigger_words (comma-separated),"
            " source_url, license, default_settings (JSON object). Repeatable.",
        ),
    ] = None,
    as_json: JsonOption = False,
    db: DbOption = None,
) -> None:
    """Show or set a model's user metadata. Parts pinned in default_settings.parts are checked first,
    as the service checks them: one that names no model or does not fit is refused, nothing written."""
    from modelkeeper.orchestrator.completion import check_pinned_parts  # the orchestrator: only here

    values: dict[str, str] = {}
    for item in set_ or []:
        key, sep, value = item.partition("=")
        if not sep or not key.strip():
            raise fail(ProtocolError(f"--set wants key=value, got {item!r}", ErrorCode.INVALID_REQUEST))
        values[key.strip()] = value
    try:
        with open_registry(db) as registry:
            record = registry.resolve(ref)
            if "default_settings" in values:
                check_pinned_parts(registry, record, values["default_settings"])
            if values:
                record = registry.set_meta(record.id, values)
    except ProtocolError as exc:
        raise fail(exc) from exc
    data = {"id": record.id, "name": record.name, **record.meta.model_dump(mode="json", exclude={"found"})}
    if as_json:
        typer.echo(json.dumps(data, indent=2))
        return
    for key, value in data.items():
        typer.echo(f"{key}: {_meta_value(value)}")


def _meta_value(value: Any) -> str:
    """A metadata value as a person reads it: ``—`` for none, lists comma-separated, objects as JSON."""
    if value is None or value in ([], {}, ""):
        return "—"
    if isinstance(value, list):
        return ", ".join(map(str, value))
    if isinstance(value, dict):
        return json.dumps(value)
    return str(value)
