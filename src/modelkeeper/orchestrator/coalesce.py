"""Coalescing: concurrent requests for one load share it. The first caller runs it; the others
join, get its result marked ``coalesced`` (or its error), and never start a second load. Used by
the loads of one host and of a cluster alike."""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable, Hashable
from typing import Any

from modelkeeper.orchestrator.jobs import Job
from modelkeeper.protocol.errors import ErrorCode, ProtocolError

InFlight = dict[Any, asyncio.Future[dict[str, Any]]]


async def coalesced(
    inflight: InFlight, key: Hashable, job: Job, what: str, run: Callable[[], Awaitable[dict[str, Any]]]
) -> dict[str, Any]:
    """``run()``, unless a run under ``key`` is in ``inflight`` already: then its result, joined.
    ``what`` names the load in the joiner's progress message."""
    joined = inflight.get(key)
    if joined is not None:
        job.progress(message=f"joined {what} already in flight", force=True)
        return {**(await asyncio.shield(joined)), "coalesced": True}
    fut: asyncio.Future[dict[str, Any]] = asyncio.get_running_loop().create_future()
    fut.add_done_callback(
        lambda f: f.cancelled() or f.exception()
    )  # a joiner-less error is not "never retrieved"
    inflight[key] = fut
    try:
        result = await run()
    except BaseException as exc:
        if not fut.done():
            fut.set_exception(
                exc if isinstance(exc, Exception) else ProtocolError("load cancelled", ErrorCode.CANCELLED)
            )
        raise
    finally:
        inflight.pop(key, None)
    fut.set_result(result)
    return result
