"""Response bodies about the service as a whole: its status (devices, RAM cache, jobs), leases,
liveness and readiness."""

from __future__ import annotations

from typing import Any

from pydantic import MISSING, Field

from modelkeeper.api.responses import FixedShape
from modelkeeper.api.responses_cache import CacheStats
from modelkeeper.api.responses_placements import DeviceStatus
from modelkeeper.orchestrator.firstscan import ScanState
from modelkeeper.orchestrator.workers import SlotState

# ---------------------------------------------------------------------- status


class JobCounts(FixedShape):
    """Jobs kept, by state."""

    queued: int
    running: int
    succeeded: int
    failed: int
    cancelled: int


class ServiceStatus(FixedShape):
    ready: bool
    uptime_seconds: float
    devices: list[DeviceStatus]
    cache: CacheStats | None
    jobs: JobCounts
    leases: int = Field(description="Active leases.")


# ---------------------------------------------------------------------- leases and health


class LeaseInfo(FixedShape):
    id: str
    model_id: str
    device: str | None = Field(description="null: every device.")
    holder: str
    ttl_seconds: float
    created_at: float
    expires_at: float
    expires_in: float
    loaded: bool | MISSING = Field(
        MISSING, description="A new lease: whether the model is loaded (or loading) where it holds it now."
    )
    note: str | MISSING = Field(
        MISSING, description="A new lease of a model not loaded: it holds the model from its next load."
    )


class Liveness(FixedShape):
    live: bool


class PreloadState(FixedShape):
    """The models of ``settings.preload``: how many are still to load, which loaded, which failed."""

    pending: int
    loaded: list[dict[str, Any]]
    failed: list[dict[str, Any]]


class FirstScanState(FixedShape):
    """The start's scan of the model roots: readiness waits while it is ``running``."""

    state: ScanState = Field(
        description="off: scan_on_start is off; running: the roots are being scanned (not ready); "
        "done: the roots are registered (hashing may go on: not waited for); failed: the scan job "
        "failed or was cancelled (ready anyway, on the registry as it was: error says why)."
    )
    job_id: str | None = Field(description="The scan job (GET /api/jobs/{job_id}); null when off.")
    error: str | None = Field(description="Why the scan failed; null otherwise.")


class Readiness(FixedShape):
    """200 when ready, 503 (same body) when not."""

    ready: bool
    workers: dict[str, SlotState]
    preload: PreloadState
    scan: FirstScanState
