"""Command line of discovery: ``modelkeeper scan ROOT... [--json] [--hash] [--watch]``.

A plain typer command function, mounted by :mod:`modelkeeper.cli.app`.
The table goes to stdout with a progress bar on stderr; ``--json`` prints one JSON object per
model file or folder (``path`` relative to its root, ``status``, ``format``, ``type``, ``base``,
``variant``, ``encoder``, ``components``, ``rule``, and ``error_code`` / ``error`` when rejected).
"""

from __future__ import annotations

import json
import threading
from pathlib import Path
from typing import Annotated

import typer
from rich.console import Console
from rich.progress import BarColumn, DownloadColumn, Progress, TaskID, TextColumn, TimeRemainingColumn
from rich.text import Text

from modelkeeper.cli.common import DbOption, JsonOption, fail, open_registry
from modelkeeper.cli.tables import Column, print_table
from modelkeeper.discovery.hasher import Hasher, HashProgress, HashReport
from modelkeeper.discovery.scanner import Scanner, ScanProgress, ScanReport
from modelkeeper.protocol.errors import ProtocolError
from modelkeeper.registry.store import Registry


def _scan_with_progress(scanner: Scanner, console: Console) -> ScanReport:
    with Progress(
        TextColumn("{task.description}"),
        BarColumn(),
        TextColumn("{task.completed}/{task.total}"),
        console=console,
        transient=True,
    ) as bar:
        task: TaskID = bar.add_task("walking", total=None)

        def on_progress(p: ScanProgress) -> None:
            if p.phase == "walk":
                bar.update(task, description=f"walking ({p.found} found)")
            else:
                bar.update(task, description="identifying", completed=p.done, total=p.total or None)

        return scanner.scan(progress=on_progress)


def _hash_with_progress(registry: Registry, console: Console) -> HashReport:
    with Progress(
        TextColumn("hashing {task.fields[current]}"),
        BarColumn(),
        DownloadColumn(),
        TimeRemainingColumn(),
        console=console,
        transient=True,
    ) as bar:
        task = bar.add_task("hash", total=None, current="")

        def on_progress(p: HashProgress) -> None:
            name = Path(p.current).name if p.current else ""
            bar.update(
                task,
                completed=p.bytes_done,
                total=p.bytes_total or None,
                current=f"{p.files_done}/{p.files_total} {name}",
            )

        return Hasher(registry).run(progress=on_progress)


#: A path folds after ``/`` (then ``.``, ``-``, ``_``), never at any character; what a model was
#: identified as is one column (``main · sd1 · normal · safetensors``, as ``show`` writes it), so
#: that the path has room at 80 columns.
SCAN_COLUMNS = (Column("path"), Column("status"), Column("identified as"), Column("rule / error"))


def _print_table(report: ScanReport, console: Console) -> None:
    rows: list[list[str | Text]] = []
    for e in report.entries:
        if e.status == "rejected":
            rows.append([e.path, Text("rejected", "red"), e.format or "", f"{e.error_code}: {e.error}"])
        else:
            kind = e.type or ""
            if e.encoder:
                kind += f" ({e.encoder})"
            fmt = f"{e.format} ({e.quant})" if e.format and e.quant else e.format or ""
            what = " · ".join(v for v in (kind, e.base, e.variant, fmt) if v)
            rows.append([e.path, e.change, what, e.rule or ""])
    print_table(console, f"{len(report.entries)} models under {', '.join(report.roots)}", SCAN_COLUMNS, rows)
    s = report.summary()
    console.print(
        f"{s['added']} added, {s['updated']} updated, {s['unchanged']} unchanged, {s['moved']} moved, "
        f"{s['rejected']} rejected, {s['missing']} missing — {report.seconds:.2f} s"
    )


def scan(
    roots: Annotated[list[Path], typer.Argument(help="Model folders to scan (recursively).")],
    *,
    as_json: JsonOption = False,
    hash_files: Annotated[
        bool,
        typer.Option(
            "--hash/--no-hash",
            help="Hash new and changed files (BLAKE3, SHA-256, component ids) after the scan.",
        ),
    ] = False,
    watch: Annotated[
        bool, typer.Option("--watch", help="Keep watching the roots and rescan on every change.")
    ] = False,
    allow_outside_roots: Annotated[
        bool, typer.Option("--allow-outside-roots", help="Follow symlinks that lead out of the roots.")
    ] = False,
    threads: Annotated[
        int,
        typer.Option(
            "--threads",
            min=1,
            max=64,
            help="Threads reading headers: 1 is fastest on local disks, more help on NFS or SMB.",
        ),
    ] = 1,
    db: DbOption = None,
) -> None:
    """Scan model folders, identify every model from its headers, and update the registry."""
    err = Console(stderr=True)
    out = Console()
    try:
        with open_registry(db, create=True) as registry:
            scanner = Scanner(
                registry, [str(r) for r in roots], allow_outside_roots=allow_outside_roots, workers=threads
            )
            if watch:
                stop = threading.Event()
                try:
                    for report in scanner.watch(stop_event=stop):
                        if hash_files:
                            Hasher(registry).run()
                        _emit(report, as_json, out)
                except KeyboardInterrupt:
                    stop.set()
                return
            report = _scan_with_progress(scanner, err) if err.is_terminal and not as_json else scanner.scan()
            if hash_files:
                hashed = _hash_with_progress(registry, err)
                if hashed.moved and not as_json:
                    err.print(f"{len(hashed.moved)} moved files recognised by content hash")
            _emit(report, as_json, out)
    except ProtocolError as exc:
        raise fail(exc) from exc


def _emit(report: ScanReport, as_json: bool, console: Console) -> None:
    if as_json:
        typer.echo(json.dumps([e.to_json() for e in report.entries], indent=2))
    else:
        _print_table(report, console)
