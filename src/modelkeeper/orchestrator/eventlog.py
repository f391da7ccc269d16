"""The service's log of what happened: bus events worth a line at INFO (or above), written
through the std ``logging`` module under ``modelkeeper.events``.

One line per load, unload (asked, evicted, expired), failed load, lost model, worker exit,
restart and failure, scan and install: enough to follow a server that vanished. The bus is the
one place every part already reports to, so no part logs these itself; a listener on it
(``EventBus.on_delivery``) turns each event into its line. Progress, leases and cache fills are
not logged (the event stream has them).
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from typing import Any

from modelkeeper.sizes import format_size

log = logging.getLogger("modelkeeper.events")

Event = dict[str, Any]


def _name(ev: Event) -> str:
    return str(ev.get("handle") or ev.get("model_id"))


def _loaded(ev: Event) -> tuple[int, str]:
    p = ev.get("placement", {})
    seconds = p.get("load_seconds") or 0.0
    sources = ", ".join(sorted(set(p.get("sources", {}).values()))) or "-"
    return logging.INFO, (
        f"loaded {p.get('handle') or ev.get('model_id')} on {ev.get('device')}: "
        f"{format_size(p.get('bytes', 0))} in {seconds:.2f} s (from {sources})"
    )


def _unloaded(ev: Event) -> tuple[int, str]:
    reason = ev.get("reason")
    verb = {"evicted": "evicted", "expired": "unloaded (keep-alive ran out)"}.get(str(reason), "unloaded")
    seconds = ev.get("seconds")
    took = f" in {seconds:.2f} s" if isinstance(seconds, int | float) else ""
    return logging.INFO, (
        f"{verb} {_name(ev)} from {ev.get('device')}: {format_size(ev.get('freed_bytes', 0))} freed{took}"
    )


def _scanned(ev: Event) -> tuple[int, str]:
    s = ev.get("summary", {})
    counts = ", ".join(
        f"{s[k]} {k}" for k in ("added", "updated", "moved", "missing", "rejected") if s.get(k)
    )
    gone = ev.get("vanished_roots") or []
    return logging.INFO, (
        f"scan: {s.get('total', 0)} models ({counts or 'no change'})"
        + (f"; folders gone: {', '.join(gone)}" if gone else "")
    )


def _job_failed(ev: Event) -> tuple[int, str] | None:
    info = ev.get("info", {})
    error = info.get("error") or {}
    if ev.get("kind") == "load":  # its model.failed line says it
        return None
    return (
        logging.WARNING,
        f"{ev.get('kind')} job {ev.get('job')} failed: {error.get('error_code')} {error.get('error')}",
    )


LINES: dict[str, Callable[[Event], tuple[int, str] | None]] = {
    "model.loaded": _loaded,
    "model.unloaded": _unloaded,
    "model.failed": lambda ev: (
        logging.WARNING,
        f"load of {_name(ev)} on {ev.get('device')} failed: {ev.get('error_code')} {ev.get('error')}",
    ),
    "model.lost": lambda ev: (logging.WARNING, f"lost {_name(ev)} on {ev.get('device')}: {ev.get('reason')}"),
    "model.installed": lambda ev: (logging.INFO, f"installed {ev.get('model_id')} from {ev.get('source')}"),
    "registry.scanned": _scanned,
    "worker.exited": lambda ev: (
        logging.ERROR,
        f"worker {ev.get('device')} exited with code {ev.get('code')}"
        + (f" ({ev['error']})" if ev.get("error") else "")
        + (f"; models lost: {', '.join(ev['lost'])}" if ev.get("lost") else ""),
    ),
    "worker.restarted": lambda ev: (
        logging.WARNING,
        f"worker {ev.get('device')} restarted: pid {ev.get('pid')}"
        + (f", {len(ev['adopted'])} models adopted" if ev.get("adopted") else ""),
    ),
    "worker.failed": lambda ev: (logging.ERROR, f"worker {ev.get('device')} failed: {ev.get('error')}"),
    "job.failed": _job_failed,
}


def log_event(ev: Event) -> None:
    """Log ``ev`` if it is one of ``LINES``; a listener for ``EventBus.on_delivery``."""
    line = LINES.get(str(ev.get("type")))
    if line is None:
        return
    try:
        out = line(ev)
    except Exception:  # a log line must never break the bus
        log.exception("cannot log event %s", ev.get("type"))
        return
    if out is not None:
        log.log(*out)
