"""Response bodies of the API, so that ``/openapi.json`` documents every answer.

The models describe what the orchestrator already returns, field for field and in its order: a
route declaring one answers the same JSON as before. Fixed shapes refuse unknown fields (a field
the service starts returning without its model here is a test failure, not silent drift); open
content (worker results, job parameters and progress, history data) is an open object. A field the
service leaves out in some answers is typed ``X | MISSING``: absent from the schema's ``required``
and from the answer when not given, never turned into ``null``. Registry and protocol models are
reused where they are the shape: models and pages (:mod:`modelkeeper.registry.records`), a
device's memory (:class:`modelkeeper.protocol.messages.MemoryInfo`).

This module holds those conventions (:class:`FixedShape`, :class:`OpenShape`), the error body, a job
and its answers (202 accepted, 200 done), and the statuses every route documents. The bodies of
each resource are in a sibling: ``responses_placements`` (devices, loads, unloads, memory, LoRAs,
operations, routing), ``responses_cache`` (the RAM cache), ``responses_catalog`` (scans, installs,
listings, model details) and ``responses_service`` (status, leases, health).
"""

from __future__ import annotations

from typing import Any, Generic, TypeVar

from pydantic import MISSING, BaseModel, ConfigDict, Field

from modelkeeper.orchestrator.jobs import JobState

ResultT = TypeVar("ResultT")

#: Open content: what a worker answered, a job's parameters, progress or result.
Open = dict[str, Any]


class FixedShape(BaseModel):
    model_config = ConfigDict(extra="forbid")


class OpenShape(BaseModel):
    """An object whose named fields are always there, beside others the worker may add."""

    model_config = ConfigDict(extra="allow")


# ---------------------------------------------------------------------- errors


class ErrorBody(FixedShape):
    """Every error answer (``api/errors.py``, the token and body-size doors)."""

    error: str = Field(description="What went wrong, naming the file, field or device.")
    error_code: str = Field(
        description="The protocol's error code (MODEL_NOT_FOUND, INSUFFICIENT_MEMORY...), or "
        "NOT_FOUND, FORBIDDEN, NOT_READY, MISSING_PART, INCOMPATIBLE_PART, METHOD_NOT_ALLOWED, UNAUTHORIZED, "
        "BODY_TOO_LARGE from "
        "the HTTP layer. Each code has one HTTP status."
    )
    details: Open = Field(description="Context: the field, path, device, leases... (may be empty).")


# ---------------------------------------------------------------------- jobs


class JobError(FixedShape):
    error_code: str
    error: str
    details: Open | MISSING = MISSING


class JobInfo(FixedShape):
    id: str
    kind: str = Field(description="scan, cache, load, validate, benchmark, optimize")
    state: JobState
    params: Open
    progress: Open = Field(description="done, total, unit, step, message... as the job reports them.")
    result: Any = Field(description="The job's result once it succeeded (null before).")
    error: JobError | None
    created_at: float
    started_at: float | None
    finished_at: float | None


class JobAccepted(FixedShape):
    """202: the job started (``wait_for_completion: false``); follow it at ``/api/jobs/{id}``."""

    job: JobInfo


class JobDone(FixedShape, Generic[ResultT]):
    """200: the job ran to its end; ``result`` is also the job's ``result``."""

    job: JobInfo
    result: ResultT


# ---------------------------------------------------------------------- documented statuses

_ERROR = "An error (401, 403, 404, 409, 413, 422, 503, 504, 507...): the status follows `error_code`."

#: Every route: an error body for any status it does not list.
ERRORS: dict[int | str, dict[str, Any]] = {"default": {"model": ErrorBody, "description": _ERROR}}

#: Routes whose success is not JSON (metrics text, event streams): their errors still are. (A
#: ``model`` would be documented under the route's own media type.)
JSON_ERRORS: dict[int | str, dict[str, Any]] = {
    "default": {
        "description": _ERROR,
        "content": {"application/json": {"schema": {"$ref": "#/components/schemas/ErrorBody"}}},
    }
}

#: Routes that start a job: without waiting, 202 with the job.
ACCEPTED: dict[int | str, dict[str, Any]] = {
    202: {"model": JobAccepted, "description": "The job started (`wait_for_completion: false`)."}
}
