"""The RAM cache (``/api/model/cache``), jobs, events, leases, health and metrics."""

from __future__ import annotations

import asyncio
import inspect
from collections.abc import AsyncIterator, Callable
from typing import Annotated, Any

from fastapi import APIRouter, Depends, Query
from fastapi.responses import JSONResponse, PlainTextResponse, Response, StreamingResponse
from pydantic import StringConstraints

from modelkeeper.api.deps import Service
from modelkeeper.api.responses import ACCEPTED, ERRORS, JSON_ERRORS, JobInfo
from modelkeeper.api.responses_cache import CacheAnswer, CacheCleared, CacheView, SegmentDropped, SegmentInfo
from modelkeeper.api.responses_catalog import ScanDone
from modelkeeper.api.responses_service import LeaseInfo, Liveness, Readiness
from modelkeeper.api.schemas import CacheBody, LeaseBody, RenewBody
from modelkeeper.orchestrator.events import FINISHED, FrameSubscription, encode_frame
from modelkeeper.orchestrator.jobs import Job
from modelkeeper.orchestrator.metrics import CONTENT_TYPE
from modelkeeper.protocol.errors import ErrorCode, ProtocolError

cache = APIRouter(prefix="/api/model/cache", tags=["cache"], responses=ERRORS)
jobs = APIRouter(prefix="/api", tags=["jobs, events, leases"], responses=ERRORS)
health = APIRouter(tags=["health"], responses=ERRORS)


def _accepted(result: dict[str, Any]) -> Any:
    return JSONResponse(result, status_code=202) if "result" not in result else result


# ---------------------------------------------------------------------- cache


@cache.get("", response_model=CacheView)
async def cache_list(service: Service) -> dict[str, Any]:
    """Segments (size, hits, last use, models using them) and stats (bytes, budget, hit rate, evictions)."""
    return service.feed.view()


@cache.post("", response_model=CacheAnswer, responses=ACCEPTED)
async def cache_add(service: Service, body: CacheBody) -> Any:
    """Cache every component of ``model_id``, or the one component ``component_id``."""
    if body.model_id:
        on = _on_node(service, body.node)  # cluster mode: one node's cache
        return _accepted(await service.feed.cache_model(body.model_id, wait=body.wait_for_completion, **on))
    if body.component_id:
        return _accepted(await service.feed.cache_component(body.component_id, wait=body.wait_for_completion))
    raise ProtocolError("model_id or component_id: one is required", ErrorCode.INVALID_REQUEST)


@cache.delete("", response_model=CacheCleared)
async def cache_clear(
    service: Service, force: bool = False, node: str | None = Query(None, max_length=200)
) -> dict[str, Any]:
    """Drop every segment (ones a worker is loading from stay unless ``force``); in cluster mode
    of every node, or of ``node``."""
    cleared: dict[str, Any] = await _done(service.feed.clear(force=force, **_on_node(service, node)))
    return cleared


def _on_node(service: Service, node: str | None) -> dict[str, str]:
    """The ``node`` argument of a cluster's cache, when given (refused on one host)."""
    if node is None:
        return {}
    if not hasattr(service, "members"):
        raise ProtocolError("node: only in cluster mode", ErrorCode.INVALID_REQUEST, field="node")
    return {"node": node}


async def _done(result: Any) -> Any:
    """A cluster cache answers from its nodes (awaitable); one host's at once."""
    return await result if inspect.isawaitable(result) else result


@cache.post("/refresh", response_model=ScanDone, responses=ACCEPTED)
async def cache_refresh(service: Service, wait_for_completion: bool = False, hash: bool = True) -> Any:
    """Rescan the model roots (a job: new, changed, moved and deleted files), then hash what is new."""
    return _accepted(await service.catalog.scan(wait=wait_for_completion, hash=hash))


@cache.get("/{component_id:path}", response_model=SegmentInfo)
async def cache_get(service: Service, component_id: str) -> dict[str, Any]:
    """One segment (``node/component`` in cluster mode)."""
    return service.feed.get(component_id)


@cache.delete("/{component_id:path}", response_model=SegmentDropped)
async def cache_drop(service: Service, component_id: str, force: bool = False) -> dict[str, Any]:
    """Drop one segment and free its memory; workers are told to unmap it. ``component_id`` is its
    id as ``GET /api/model/cache`` lists it or a unique prefix of at least 8 digits, as
    ``modelkeeper cache drop`` takes (``node/component`` in cluster mode). A prefix of several
    segments is refused (422 INVALID_REQUEST, ``details.matches`` listing their ids); one that
    matches none is 404 NOT_FOUND naming it. A segment a worker is loading from is refused
    (409 BUSY) unless ``force``. Answers the full id and the bytes freed."""
    dropped: dict[str, Any] = await _done(service.feed.drop(component_id, force=force))
    return dropped


# ---------------------------------------------------------------------- jobs and events


@jobs.get("/jobs", response_model=list[JobInfo])
async def job_list(
    service: Service,
    state: str | None = Query(None, pattern="^(queued|running|succeeded|failed|cancelled)$"),
    kind: str | None = Query(None, max_length=32),
    limit: int = Query(100, ge=1, le=1000),
) -> list[dict[str, Any]]:
    """Jobs, newest first: those queued or running and the latest finished ones (the ``jobs_kept``
    setting bounds how many are remembered). ``state`` and ``kind`` (``load``, ``scan``, ``cache``,
    ``install``, ``validate``, ``benchmark``, ``optimize``; ``transfer`` in cluster mode) filter
    them; ``limit`` caps the list."""
    return [j.info() for j in service.jobs.list(state=state, kind=kind, limit=limit)]


@jobs.get("/jobs/{job_id}", response_model=JobInfo)
async def job_get(service: Service, job_id: str) -> dict[str, Any]:
    """One job: kind, state, parameters, progress, result or error, times. 404 NOT_FOUND for an
    unknown id, or a finished job forgotten since (beyond ``jobs_kept``)."""
    return service.jobs.get(job_id).info()


@jobs.delete("/jobs/{job_id}", response_model=JobInfo)
async def job_cancel(service: Service, job_id: str) -> dict[str, Any]:
    """Cancel a job; a worker operation in flight is told to stop."""
    job = service.jobs.cancel(job_id)
    if job.task is not None and not job.task.done():
        await asyncio.wait({job.task}, timeout=10)
    return job.info()


async def _job(service: Service, job_id: str) -> Job:
    """The job, looked up before a stream starts: an unknown id is a 404, not an empty stream."""
    return service.jobs.get(job_id)


class EventStream(StreamingResponse):
    """Server-Sent Events made by the bus (``bus.frames``: encoded once for all streams), sent as
    they are. Not FastAPI's ``EventSourceResponse``, whose routes encode every event per stream."""

    media_type = "text/event-stream"


SSE_HEADERS = {"Cache-Control": "no-cache", "X-Accel-Buffering": "no"}  # no proxy buffers the stream
SSE_EVENT_SCHEMA: dict[str, Any] = {  # one event on the wire, as OpenAPI 3.2 describes a stream's items
    "type": "object",
    "properties": {"data": {"type": "string"}, "event": {"type": "string"}, "id": {"type": "string"}},
}
SSE_DOC: dict[int | str, dict[str, Any]] = {
    200: {
        "description": "Server-Sent Events",
        "content": {"text/event-stream": {"itemSchema": SSE_EVENT_SCHEMA}},
    }
}
Prefixes = Annotated[list[Annotated[str, StringConstraints(max_length=64)]] | None, Query(max_length=32)]


async def _stream(
    subscribe: Callable[[], FrameSubscription],
    first: Callable[[], tuple[bytes, bool]],
    last: frozenset[str] = frozenset(),
) -> AsyncIterator[bytes]:
    """The frame ``first()`` makes, then the subscription's frames as they come (a burst in one
    write), until one whose type is in ``last`` has gone (or at once when ``first()`` says it was
    the last). Subscribed when the stream starts and closed with it, however it ends."""
    with subscribe() as sub:
        data, over = first()  # read after subscribing: no change slips between the two
        yield data
        while not over:
            batch = await sub.next_batch()
            yield b"".join(f.data for f in batch)
            over = any(f.type in last for f in batch)


def _sse(content: AsyncIterator[bytes]) -> EventStream:
    return EventStream(content, headers=SSE_HEADERS)


@jobs.get("/jobs/{job_id}/events", response_class=EventStream, responses={**JSON_ERRORS, **SSE_DOC})
async def job_events(service: Service, job: Annotated[Job, Depends(_job)]) -> Response:
    """The job's state now, then every change, until it finishes (Server-Sent Events)."""

    def state() -> tuple[bytes, bool]:
        return encode_frame("job.state", job.info(), 0), job.state.finished

    return _sse(_stream(lambda: service.bus.frames.subscribe(job=job.id), state, FINISHED))


@jobs.get("/events", response_class=EventStream, responses={**JSON_ERRORS, **SSE_DOC})
async def events(service: Service, type: Prefixes = None, exclude: Prefixes = None) -> Response:
    """Every event of the service (Server-Sent Events); ``type`` keeps those whose type starts with
    one of its values (``model.``, ``job.``; repeat it for several), ``exclude`` drops those whose
    type starts with one of its values (``worker.state``). ``job.progress`` comes at most 10 times
    a second per job (the latest within a step; every change of step), always before that job's
    next event. Each event is encoded once for all streams."""
    types, excluded = tuple(type or ()), tuple(exclude or ())
    return _sse(
        _stream(
            lambda: service.bus.frames.subscribe(types, excluded),
            lambda: (encode_frame("hello", {"subscribed": True}, 0), False),
        )
    )


# ---------------------------------------------------------------------- leases


@jobs.get("/leases", response_model=list[LeaseInfo])
async def lease_list(service: Service, model_id: str | None = None) -> list[dict[str, Any]]:
    """Leases still running (expired ones are dropped), each with its expiry; ``model_id`` keeps
    those of one model, named by its id as a lease shows it (``m-…``; a name matches nothing)."""
    return [lease.info() for lease in service.leases.list(model_id)]


@jobs.post("/leases", status_code=201, response_model=LeaseInfo)
async def lease_grant(service: Service, body: LeaseBody) -> dict[str, Any]:
    """Hold a model: it is neither evicted nor unloaded without force until the lease ends."""
    return await service.loads.grant_lease(body.model_id, body.device_id, body.holder, body.ttl_seconds)


@jobs.get("/leases/{lease_id}", response_model=LeaseInfo)
async def lease_get(service: Service, lease_id: str) -> dict[str, Any]:
    """One lease with its expiry (``expires_at``, ``expires_in`` seconds); 404 NOT_FOUND once
    released or expired."""
    return service.leases.get(lease_id).info()


@jobs.post("/leases/{lease_id}/renew", response_model=LeaseInfo)
async def lease_renew(service: Service, lease_id: str, body: RenewBody | None = None) -> dict[str, Any]:
    """Extend a lease: it expires ``ttl_seconds`` from now (no body: its own ttl again). 404
    NOT_FOUND once released or expired: grant a new one."""
    return service.leases.renew(lease_id, body.ttl_seconds if body else None).info()


@jobs.delete("/leases/{lease_id}", response_model=LeaseInfo)
async def lease_release(service: Service, lease_id: str) -> dict[str, Any]:
    """End a lease now: the model may be evicted or unloaded again. Answers the lease as it was;
    404 NOT_FOUND once released or expired."""
    return service.loads.release_lease(lease_id)


# ---------------------------------------------------------------------- health and metrics


@health.get("/health/live", response_model=Liveness)
async def live() -> dict[str, Any]:
    """Liveness: 200 while the process answers. Served without the bearer token; says nothing of
    the workers (readiness: ``/health/ready``)."""
    return {"live": True}


@health.get(
    "/health/ready",
    response_model=Readiness,
    responses={503: {"model": Readiness, "description": "Not ready."}},
)
async def ready(service: Service) -> Any:
    """Ready when the registry is open, at least one worker runs, the first scan of the model
    roots has registered them (``scan``; with ``scan_on_start``) and every model of the
    ``preload`` setting is loaded: a client that waits for ready finds every model of the roots.
    A failed preload keeps the service not ready (the body says why); a failed first scan does
    not (``scan.state`` ``failed`` and its error: the registry serves what it held, and a restart
    would not mend the roots). Hashing after the scan is not waited for."""
    workers = {s.id: s.state.value for s in service.pool.slots.values()}
    scan = service.first_scan
    ok = (
        service.ready
        and service.preloaded
        and not scan.pending
        and any(v == "ready" for v in workers.values())
    )
    body = {"ready": ok, "workers": workers, "preload": service.preload, "scan": scan.info()}
    return body if ok else JSONResponse(body, status_code=503)


@health.get("/metrics", response_class=PlainTextResponse, responses=JSON_ERRORS)
async def metrics(service: Service) -> Response:
    """Prometheus text format: ``modelkeeper_load_seconds`` (a histogram of one component's load, by
    device and source); the RAM cache's bytes, budget, segments, hits, misses and evictions; per
    device memory used and budget, worker up, restarts and models loaded; jobs by state; leases."""
    return Response(service.metrics.render(), media_type=CONTENT_TYPE)
