"""The orchestrator: one service that owns the registry, discovery, the RAM cache and one worker
process per device, and places, loads, unloads and measures models on request.

``Orchestrator(Settings(...))`` is the service (``service.py``); ``Settings`` every knob
(``settings.py``); jobs, leases, events and the per-device queues live in their own modules.
Errors: ``errors.py``.
"""

from modelkeeper.orchestrator.errors import (
    DeviceNotFound,
    JobNotFound,
    LeaseNotFound,
    LoadedDifferently,
    ModelInUse,
    NotLoadable,
    NotLoaded,
    NotPlaceable,
    OrchestratorError,
    PathOutsideRoots,
    ServiceNotReady,
)
from modelkeeper.orchestrator.jobs import Job, JobState
from modelkeeper.orchestrator.options import LoadOptions
from modelkeeper.orchestrator.service import Orchestrator
from modelkeeper.orchestrator.settings import Settings
from modelkeeper.orchestrator.workers import Priority

__all__ = [
    "DeviceNotFound",
    "Job",
    "JobNotFound",
    "JobState",
    "LeaseNotFound",
    "LoadOptions",
    "LoadedDifferently",
    "ModelInUse",
    "NotLoadable",
    "NotLoaded",
    "NotPlaceable",
    "Orchestrator",
    "OrchestratorError",
    "PathOutsideRoots",
    "Priority",
    "ServiceNotReady",
    "Settings",
]
