"""The orchestrator's view of where each model is: one :class:`Placement` per (model, device).

A placement is ``loading``, ``loaded`` or ``unloading``; a failed load leaves no placement but a
``failed`` entry (with the reason) in ``StateView.failures`` until the next attempt. Disk and RAM
tiers come from the registry and the cache; this module keeps the VRAM tier.
"""

from __future__ import annotations

import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from enum import StrEnum
from typing import Any

from modelkeeper.orchestrator.forms import LoadForm
from modelkeeper.protocol.messages import LoadedModelInfo, LoadResult


def held_bytes(info: LoadResult | LoadedModelInfo) -> int:
    """What a loaded component holds against its device's budget, as its worker reports it: all its
    bytes, or (offloaded) its resident weights and its ring (docs/OFFLOAD.md); the bytes it streams
    from RAM are the placement's ``streamed_bytes``, apart."""
    if info.device_bytes is not None:
        return info.device_bytes
    return info.resident_bytes if info.resident_bytes is not None else info.bytes


class PlacementState(StrEnum):
    LOADING = "loading"
    LOADED = "loaded"
    UNLOADING = "unloading"


@dataclass
class Placement:
    model_id: str
    name: str
    type: str
    device: str
    state: PlacementState = PlacementState.LOADING
    components: dict[str, str] = field(default_factory=dict)  # component -> worker name
    sources: dict[str, str] = field(default_factory=dict)  # component -> ram / disk
    segments: dict[str, str] = field(default_factory=dict)  # component -> cache component id
    timings: dict[str, dict[str, float]] = field(default_factory=dict)  # component -> seconds by step
    loras: dict[str, dict[str, Any]] = field(default_factory=dict)  # LoRA model id -> name, strength, keys
    parts: dict[str, str] = field(default_factory=dict)  # role -> part's model id (docs/PARTS.md)
    #: component -> the worker's share key: placements on one device with one key hold one module
    shares: dict[str, str] = field(default_factory=dict)
    component_bytes: dict[str, int] = field(default_factory=dict)  # component -> its bytes on the device
    #: component -> the form its weights are kept packed in (float8_e4m3fn, gguf:Q4_K...), as loaded
    packed: dict[str, str] = field(default_factory=dict)
    bytes: int = 0  # against the device's budget (the stored form; offloaded: the resident part and ring)
    streamed_bytes: int = 0  # weights kept in RAM and streamed in as the model runs (offload)
    keep_loaded: bool = False
    loaded_at: float | None = None
    last_used: float = field(default_factory=time.time)
    load_seconds: float | None = None
    handle: str = ""  # the model's handle when it was placed (registry/handles.py)
    keep_alive: float = -1.0  # seconds after the last use before it is unloaded; -1 never
    busy: int = 0  # operations running on it: never unloaded for idleness meanwhile
    form: LoadForm = field(default_factory=LoadForm)  # dtype, storage dtype, offload (forms.py)

    @property
    def expires_at(self) -> float | None:
        """When it is unloaded for idleness (None: never, or an operation runs on it now)."""
        if self.keep_alive < 0 or self.busy or self.state is not PlacementState.LOADED:
            return None
        return self.last_used + self.keep_alive

    @contextmanager
    def in_use(self) -> Iterator[None]:
        """Marks an operation on the model: its idle clock restarts when the operation ends."""
        self.busy += 1
        try:
            yield
        finally:
            self.busy -= 1
            self.last_used = time.time()

    def info(self, leases: int = 0) -> dict[str, Any]:
        return {
            "model_id": self.model_id,
            "handle": self.handle or self.name,
            "name": self.name,
            "type": self.type,
            "device": self.device,
            "state": self.state.value,
            "components": dict(self.components),
            "sources": dict(self.sources),
            "bytes": self.bytes,
            "streamed_bytes": self.streamed_bytes,
            **self.form.info(),
            "keep_loaded": self.keep_loaded,
            "loaded_at": self.loaded_at,
            "last_used": self.last_used,
            "load_seconds": self.load_seconds,
            "keep_alive": self.keep_alive,
            "expires_at": self.expires_at,
            "timings": dict(self.timings),
            "loras": {k: dict(v) for k, v in self.loras.items()},
            "leases": leases,
            **({"parts": dict(self.parts)} if self.parts else {}),
        }


@dataclass
class Failure:
    model_id: str
    device: str
    error_code: str
    error: str
    at: float = field(default_factory=time.time)

    def info(self) -> dict[str, Any]:
        return {"device": self.device, "error_code": self.error_code, "error": self.error, "at": self.at}


class StateView:
    def __init__(self) -> None:
        self.placements: dict[tuple[str, str], Placement] = {}
        self.failures: dict[tuple[str, str], Failure] = {}

    def get(self, model_id: str, device: str) -> Placement | None:
        return self.placements.get((model_id, device))

    def put(self, p: Placement) -> None:
        self.placements[(p.model_id, p.device)] = p
        self.failures.pop((p.model_id, p.device), None)

    def remove(self, model_id: str, device: str) -> Placement | None:
        return self.placements.pop((model_id, device), None)

    def on_device(self, device: str) -> list[Placement]:
        return [p for p in self.placements.values() if p.device == device]

    def shared_with(self, p: Placement) -> dict[str, list[str]]:
        """Component -> the other models on ``p``'s device that hold its module too (a shared part:
        one module in the worker, its bytes counted once on the device)."""
        out: dict[str, list[str]] = {}
        for label, key in p.shares.items():
            others = sorted(
                q.model_id for q in self.on_device(p.device) if q is not p and key in q.shares.values()
            )
            if others:
                out[label] = others
        return out

    def info(self, p: Placement, leases: int = 0) -> dict[str, Any]:
        """``p.info`` with, for a placement that shares parts, ``shared`` (component -> the other
        models holding it) and ``shared_bytes`` (of its ``bytes``, those the device holds once for
        them all)."""
        shared = self.shared_with(p)
        if not shared:
            return p.info(leases)
        held = sum(p.component_bytes.get(label, 0) for label in shared)
        return {**p.info(leases), "shared": shared, "shared_bytes": held}

    def of_model(self, model_id: str) -> list[Placement]:
        return [p for p in self.placements.values() if p.model_id == model_id]

    def fail(self, model_id: str, device: str, code: str, error: str) -> None:
        self.failures[(model_id, device)] = Failure(model_id, device, code, error)

    def failures_of(self, model_id: str) -> list[Failure]:
        return [f for f in self.failures.values() if f.model_id == model_id]
