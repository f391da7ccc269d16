"""Leases: an inference client holds a model so that it is neither evicted nor unloaded without
``force``. A lease names a model and optionally a device, and expires unless renewed."""

from __future__ import annotations

import builtins
import secrets
import time
from dataclasses import dataclass, field
from typing import Any

from modelkeeper.orchestrator.errors import LeaseNotFound


@dataclass
class Lease:
    model_id: str
    device: str | None
    holder: str
    ttl: float
    id: str = field(default_factory=lambda: "l-" + secrets.token_hex(6))
    created_at: float = field(default_factory=time.time)
    expires_at: float = 0.0

    def __post_init__(self) -> None:
        if not self.expires_at:
            self.expires_at = time.time() + self.ttl

    def info(self) -> dict[str, Any]:
        return {
            "id": self.id,
            "model_id": self.model_id,
            "device": self.device,
            "holder": self.holder,
            "ttl_seconds": self.ttl,
            "created_at": self.created_at,
            "expires_at": self.expires_at,
            "expires_in": round(max(0.0, self.expires_at - time.time()), 3),
        }


class LeaseTable:
    def __init__(self) -> None:
        self._leases: dict[str, Lease] = {}

    def _prune(self) -> None:
        now = time.time()
        for lid in [lid for lid, lease in self._leases.items() if lease.expires_at <= now]:
            del self._leases[lid]

    def grant(self, model_id: str, device: str | None, holder: str, ttl: float) -> Lease:
        self._prune()
        lease = Lease(model_id, device, holder, ttl)
        self._leases[lease.id] = lease
        return lease

    def renew(self, lease_id: str, ttl: float | None = None) -> Lease:
        lease = self.get(lease_id)
        if ttl is not None:
            lease.ttl = ttl
        lease.expires_at = time.time() + lease.ttl
        return lease

    def get(self, lease_id: str) -> Lease:
        self._prune()
        lease = self._leases.get(lease_id)
        if lease is None:
            raise LeaseNotFound(
                f"no lease {lease_id!r} (never granted, released or expired)", lease_id=lease_id
            )
        return lease

    def release(self, lease_id: str) -> Lease:
        lease = self.get(lease_id)
        del self._leases[lease_id]
        return lease

    def list(self, model_id: str | None = None) -> builtins.list[Lease]:
        self._prune()
        return [lease for lease in self._leases.values() if model_id is None or lease.model_id == model_id]

    def holding(self, model_id: str, device: str) -> builtins.list[Lease]:
        """Leases that protect ``model_id`` on ``device``."""
        return [lease for lease in self.list(model_id) if lease.device in (None, device)]

    def revoke(self, model_id: str, device: str) -> builtins.list[Lease]:
        gone = self.holding(model_id, device)
        for lease in gone:
            self._leases.pop(lease.id, None)
        return gone
