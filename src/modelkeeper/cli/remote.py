"""What the commands against a running service share: the ``--url``, ``--token``, ``--json`` and
``--device`` options, calling the service through :mod:`modelkeeper.client` (an error answer or an
unreachable service ends the command with a message, or its JSON after ``--json``), and following
a job to its end with a live progress bar fed by the job's event stream.

The client commands take ``--url`` (default ``$MODELKEEPER_URL`` or http://127.0.0.1:8765) and
``--token`` (default ``$MODELKEEPER_TOKEN``); ``--json`` prints what the API answered, an error
answer (or an unreachable service) included (:func:`modelkeeper.cli.common.error_exit`).
"""

from __future__ import annotations

import json
import os
import signal
import threading
from collections.abc import Callable
from typing import Annotated, Any, TypeVar

import httpx
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

from modelkeeper.cli.common import error_exit, fail, human_size, json_option
from modelkeeper.cli.explain import close_models, invalid_fields, looks_like_path
from modelkeeper.client import DEFAULT_URL, ApiError, Client
from modelkeeper.protocol.errors import ErrorCode, ProtocolError

UrlOption = Annotated[
    str | None, typer.Option("--url", help=f"Service URL (default: $MODELKEEPER_URL or {DEFAULT_URL}).")
]
TokenOption = Annotated[
    str | None, typer.Option("--token", help="Bearer token (default: $MODELKEEPER_TOKEN).")
]
ApiJsonOption = Annotated[bool, json_option("Print the API's JSON answer.")]
JobJsonOption = Annotated[bool, json_option("Print the job's result as JSON.")]
MODEL_HELP = "Model handle (as ls shows it), id, name, path or hash prefix."
DeviceOption = Annotated[str | None, typer.Option("--device", "-d", help="Device id (cuda:0, cpu...).")]

err = Console(stderr=True)
T = TypeVar("T")


def _client(url: str | None, token: str | None) -> Client:
    return Client(url, token=token)


def service_url(url: str | None) -> str:
    """The URL a command talks to: ``--url``, else ``$MODELKEEPER_URL``, else the default."""
    return url or os.environ.get("MODELKEEPER_URL") or DEFAULT_URL


def call(url: str | None, token: str | None, fn: Callable[[Client], T]) -> T:
    """``fn(client)``; an error answer, an unreachable service or a local error ends the command
    with a message that says which (a model the service does not know: with close names)."""
    try:
        with _client(url, token) as c:
            try:
                return fn(c)
            except ApiError as exc:
                if exc.error_code == "MODEL_NOT_FOUND" and isinstance(exc.details.get("ref"), str):
                    exc.details["suggestions"] = _suggestions(c, exc.details["ref"])
                raise
    except typer.Exit:
        raise
    except Exception as exc:
        raise _fail(exc, service_url(url)) from None


def _suggestions(client: Client, ref: str) -> list[str]:
    try:
        listing = client.list_models(status="all", limit=1000)["items"]
    except (ApiError, httpx.HTTPError, KeyError, TypeError):
        return []
    return close_models(ref, listing)


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


def _fail(exc: Exception, url: str) -> typer.Exit:
    """The command's end for ``exc`` (:func:`~modelkeeper.cli.common.error_exit`): an error answer
    as the service sent it, a failed job by its code and job, an unreachable service by its URL."""
    if isinstance(exc, JobFailed):
        text = [f"{exc.error_code} (job {exc.job_id}): {exc.message}"]
        return error_exit(exc.message, exc.error_code, exc.details, text=text)
    if isinstance(exc, ApiError):
        return error_exit(exc.message, exc.error_code, exc.details, text=_api_error(exc))
    if isinstance(exc, ProtocolError):
        return fail(exc)
    if isinstance(exc, httpx.TimeoutException):
        said = f"the service at {url} did not answer in time ({type(exc).__name__}) {exc}".strip()
        return error_exit(said, ErrorCode.TIMEOUT.value, {"url": url}, text=[said])
    if isinstance(exc, httpx.TransportError):
        said = f"cannot reach the service at {url}: {exc}"
        hint = "start it (modelkeeper serve), or point at another with --url or MODELKEEPER_URL"
        return error_exit(said, ErrorCode.UNREACHABLE.value, {"url": url}, text=[said, hint])
    # on this side: an option the request cannot carry, a file that cannot be read...
    said = str(exc) or type(exc).__name__
    return error_exit(said, ErrorCode.INVALID_REQUEST.value, text=[said])


def _api_error(exc: ApiError) -> list[str]:
    errors = exc.details.get("errors")
    if exc.status_code == 422 and isinstance(errors, list) and errors:
        first, *rest = invalid_fields(e for e in errors if isinstance(e, dict))
        return [f"{exc.error_code}: {first}", *rest]
    lines = [f"{exc.error_code} (HTTP {exc.status_code}): {exc.message}"]
    if exc.status_code == 401:
        lines.append("pass the service's token with --token, or set MODELKEEPER_TOKEN")
    if exc.error_code == "ALREADY_LOADED":
        lines.append("to load it again in the form asked: modelkeeper load ... --reload")
    matches = [str(m) for m in exc.details.get("matches") or []]
    if matches and not all(m in exc.message for m in matches):  # not said twice
        lines.append("matches: " + ", ".join(matches))
    if exc.details.get("suggestions"):
        lines.append("did you mean " + " or ".join(exc.details["suggestions"]) + "?")
    ref = exc.details.get("ref")
    if exc.error_code == "MODEL_NOT_FOUND" and isinstance(ref, str) and looks_like_path(ref):
        lines.append("paths are relative to the service's model roots (or absolute, inside one)")
    return lines


def size(n: float | None) -> str:
    return human_size(n or 0)


def print_json(data: Any) -> None:
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


class _Terminated(Exception):
    """SIGTERM while the command follows the job it started."""


def finish(client: Client, answer: dict[str, Any], as_json: bool) -> dict[str, Any]:
    """A started job followed to its end; its error becomes the command's failure.

    The job is this command's: Ctrl-C (SIGINT) or SIGTERM while it runs asks the service to cancel
    it (the worker stops at its next step), says ``cancelled job j-...`` on stderr and exits 130
    (143 for SIGTERM), rather than leaving the job running unseen. (``jobs watch`` follows a job
    it did not start: its Ctrl-C leaves the job alone.)"""
    started = answer["job"]

    def terminated(signum: int, frame: object) -> None:
        raise _Terminated

    previous = None
    if threading.current_thread() is threading.main_thread():
        previous = signal.signal(signal.SIGTERM, terminated)
    try:
        job = follow_job(client, started, quiet=as_json)
    except (KeyboardInterrupt, _Terminated) as exc:
        _cancel(client, started)
        raise typer.Exit(130 if isinstance(exc, KeyboardInterrupt) else 143) from None
    finally:
        if previous is not None:
            signal.signal(signal.SIGTERM, previous)
    if job["state"] != "succeeded":
        raise JobFailed.of(job)
    return job


def _cancel(client: Client, job: dict[str, Any]) -> None:
    """Cancel ``job`` for a command interrupted while it waited, and say so (or why not)."""
    try:
        state = client.cancel_job(job["id"])["state"]
    except (ApiError, httpx.HTTPError) as exc:
        err.print(f"interrupted; could not cancel job {job['id']} ({job['kind']}): {exc}", highlight=False)
        return
    if state == "running":  # the service's wait for the worker ran out: it stops at its next step
        err.print(f"cancelling job {job['id']} ({job['kind']}): it stops at its next step", highlight=False)
    elif state == "cancelled":
        err.print(f"cancelled job {job['id']} ({job['kind']})", highlight=False)
    else:
        err.print(f"interrupted; job {job['id']} ({job['kind']}) had already {state}", highlight=False)
