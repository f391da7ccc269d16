"""``modelkeeper jobs``: the jobs of a running service (list, watch one to its end, cancel, show)."""

from __future__ import annotations

from typing import Annotated, Any

import typer
from rich.console import Console

from modelkeeper.cli.choices import JobState
from modelkeeper.cli.common import error_exit, json_requested
from modelkeeper.cli.remote import ApiJsonOption, TokenOption, UrlOption, call, follow_job, print_json
from modelkeeper.cli.tables import Column, print_table
from modelkeeper.client import FINISHED, Client
from modelkeeper.protocol.errors import ErrorCode

jobs_app = typer.Typer(help="Jobs of a running service.", invoke_without_command=True)


#: The id ``jobs watch``, ``cancel`` and ``show`` take: never cut; a parameter folds after its ``=``.
JOB_COLUMNS = (
    Column("id", whole=True),
    Column("kind"),
    Column("state"),
    Column("params", breaks=("/=", ".-_")),
    Column("seconds"),
    Column("error"),
)


@jobs_app.callback()
def jobs_list(
    ctx: typer.Context,
    state: Annotated[
        JobState | None,
        typer.Option(help="Only jobs in this state: queued, running, succeeded, failed, cancelled."),
    ] = None,
    as_json: ApiJsonOption = False,
    url: UrlOption = None,
    token: TokenOption = None,
) -> None:
    """List jobs, newest first (the default)."""
    if ctx.invoked_subcommand is not None:
        return
    data = call(url, token, lambda c: c.jobs(state=state))
    if as_json:
        print_json(data)
        return
    if not data:  # one line, as the other empty listings: no table of headers only
        typer.echo(f"no {state} jobs" if state else "no jobs")
        return
    rows = []
    for j in data:
        secs = (j["finished_at"] or 0) - (j["started_at"] or 0) if j["finished_at"] else None
        params = ", ".join(f"{k}={v}" for k, v in j["params"].items() if v not in (None, False))
        error = (j.get("error") or {}).get("error_code", "")
        rows.append([j["id"], j["kind"], j["state"], params, f"{secs:.2f}" if secs else "-", error])
    print_table(Console(), "jobs", JOB_COLUMNS, rows)


@jobs_app.command("watch")
def jobs_watch(
    job_id: str, as_json: ApiJsonOption = False, url: UrlOption = None, token: TokenOption = None
) -> None:
    """Follow a job's progress until it ends."""
    as_json = as_json or json_requested()  # jobs --json watch
    job = call(url, token, lambda c: follow_job(c, c.job(job_id), quiet=as_json))
    if as_json:
        print_json(job)
        return
    Console().print(f"{job['id']} {job['kind']}: {job['state']}")


@jobs_app.command("cancel")
def jobs_cancel(
    job_id: str, as_json: ApiJsonOption = False, url: UrlOption = None, token: TokenOption = None
) -> None:
    """Cancel a job (queued or running); one already finished is left as it is (exit 1)."""

    def run(c: Client) -> tuple[str, dict[str, Any]]:
        before: str = c.job(job_id)["state"]
        return before, c.cancel_job(job_id) if before not in FINISHED else c.job(job_id)

    before, job = call(url, token, run)
    if before in FINISHED:
        said = f"job {job['id']} ({job['kind']}) already {before}; nothing to cancel"
        raise error_exit(
            said, ErrorCode.INVALID_REQUEST.value, {"job": job["id"], "state": before}, text=[said]
        )
    if as_json or json_requested():
        print_json(job)
        return
    Console().print(f"{job['id']} {job['kind']}: {job['state']}")


@jobs_app.command("show")
def jobs_show(
    job_id: str, as_json: ApiJsonOption = False, url: UrlOption = None, token: TokenOption = None
) -> None:
    """Print one job as JSON (always: --json is taken as by the other commands)."""
    print_json(call(url, token, lambda c: c.job(job_id)))
