"""The first scan of the model roots, as readiness sees it: ``/health/ready`` waits for it, so a
client that waits for readiness then asks for a model finds it (a load right after ready answered
404 while the roots were still being scanned).

States (``FirstScan.state``):

- ``off``: ``scan_on_start`` is off, nothing to wait for (the registry serves what it holds);
- ``running``: the start's scan job has not registered the roots yet: not ready;
- ``done``: the roots are registered (the ``registry.scanned`` event). Hashing may go on in the
  same job; readiness does not wait for it (a model loads before its hash is known);
- ``failed``: the job failed or was cancelled before registering the roots. The service is ready
  anyway, with the error in the body: the registry of earlier runs still serves, and a restart
  (what a load balancer or an orchestrator would do to a service that never gets ready) cannot
  mend an unreadable root. A later scan that registers the roots (``POST
  /api/model/cache/refresh``, the watcher's) makes it ``done``.

It follows the bus: the events say all of it, in order, whichever task published them.
"""

from __future__ import annotations

import logging
from typing import Any, Literal

from modelkeeper.orchestrator.events import Event, EventBus

log = logging.getLogger(__name__)

ScanState = Literal["off", "running", "done", "failed"]
FAILED = frozenset({"job.failed", "job.cancelled"})


class FirstScan:
    """See the module docstring. ``follow(job_id)`` once the start's scan job is submitted."""

    def __init__(self, bus: EventBus, *, enabled: bool) -> None:
        self.state: ScanState = "running" if enabled else "off"
        self.job_id: str | None = None
        self.error: str | None = None
        bus.on_delivery(self._on_event)

    @property
    def pending(self) -> bool:
        """True while readiness waits for it."""
        return self.state == "running"

    def follow(self, job_id: str) -> None:
        self.job_id = job_id

    def info(self) -> dict[str, Any]:
        return {"state": self.state, "job_id": self.job_id, "error": self.error}

    def _on_event(self, event: Event) -> None:
        kind = event["type"]
        if kind == "registry.scanned":
            if self.state in ("running", "failed"):  # the roots are known, whichever scan did it
                self.state, self.error = "done", None
        elif self.state == "running" and self.job_id is not None and event.get("job") == self.job_id:
            if kind == "job.succeeded":  # registry.scanned comes first; a scan that never sent it
                self.state = "done"
            elif kind in FAILED:
                error = (event.get("info") or {}).get("error") or {}
                self.state, self.error = "failed", str(error.get("error") or kind.removeprefix("job."))
                log.warning(
                    "the first scan %s: %s; readiness no longer waits for it",
                    kind.removeprefix("job."),
                    self.error,
                )
