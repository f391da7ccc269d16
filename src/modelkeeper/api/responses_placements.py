"""Response bodies about what is placed on the devices: placements and device status, loads,
unloads, freeing a device's memory, reconciling with the workers, operations (validate, benchmark,
optimize) and LoRAs on loaded models, and where a model is served (``route``)."""

from __future__ import annotations

from typing import Literal

from pydantic import MISSING, Field

from modelkeeper.api.responses import FixedShape, JobDone, Open, OpenShape
from modelkeeper.orchestrator.workers import SlotState
from modelkeeper.protocol.messages import MemoryInfo

# ---------------------------------------------------------------------- placements and devices


class AppliedLora(FixedShape):
    name: str = Field(description="Key of the LoRA in the worker.")
    lora: str = Field(description="The LoRA model's name.")
    strength: float


class PlacementInfo(FixedShape):
    """A model on one device (its VRAM tier)."""

    model_id: str
    handle: str = Field(description="The model's handle when it was placed (what to type for it).")
    name: str
    type: str
    device: str
    state: Literal["loading", "loaded", "unloading"]
    components: dict[str, str] = Field(description="Component -> name in the worker.")
    sources: dict[str, str] = Field(description="Component -> where it was read from: ram, disk.")
    bytes: int = Field(
        description="Bytes it holds against the device budget: the stored form; offloaded, the resident "
        "weights and the ring (what unloading frees)."
    )
    streamed_bytes: int | MISSING = Field(
        MISSING, description="Weights kept in RAM and streamed in as it runs (offload); not in `bytes`."
    )
    dtype: str | MISSING | None = Field(
        MISSING, description="Compute dtype: asked, else its components' (null when they differ)."
    )
    storage_dtype: str | MISSING | None = Field(
        MISSING,
        description="The dtype its weights are kept in when not the compute dtype (fp8, a GGUF quant); null: "
        "the compute dtype.",
    )
    offload: str | int | MISSING = Field(
        MISSING, description="The offload it was loaded with: none, auto, bytes."
    )
    keep_loaded: bool
    loaded_at: float | None
    last_used: float
    load_seconds: float | None
    keep_alive: float = Field(description="Seconds it stays after its last use; -1 never (0: at once).")
    expires_at: float | None = Field(
        description="When it is unloaded for idleness (null: never, or now in use)."
    )
    timings: dict[str, dict[str, float]] = Field(description="Component -> seconds per step.")
    loras: dict[str, AppliedLora] = Field(description="LoRA model id -> how it is applied.")
    leases: int = Field(description="Leases holding the model on this device.")
    parts: dict[str, str] | MISSING = Field(
        MISSING, description="A transformer-only model: role -> the model id of the part loaded for it."
    )
    shared: dict[str, list[str]] | MISSING = Field(
        MISSING,
        description="Parts this placement shares with others on the device (one module there): component "
        "-> the other models holding it.",
    )
    shared_bytes: int | MISSING = Field(
        MISSING,
        description="Of `bytes`, those of shared parts: the device holds them once for all their models.",
    )
    node: str | MISSING = Field(MISSING, description="Cluster mode: the node of the device.")
    local_id: str | MISSING = Field(MISSING, description="Cluster mode: the model's id on that node.")
    loading: bool | MISSING = Field(MISSING, description="Cluster mode: a load is in flight there.")


class DroppedLora(FixedShape):
    """A LoRA a reload dropped: as applied before it."""

    lora_id: str
    handle: str
    strength: float | None


class LoadedPlacement(PlacementInfo):
    """A load's result on one device."""

    evicted: list[str] | MISSING = Field(MISSING, description="Models unloaded to make room.")
    already_loaded: bool | MISSING = Field(MISSING, description="True: it was loaded before the call.")
    coalesced: bool | MISSING = Field(MISSING, description="True: joined a load already in flight.")
    reloaded: dict[str, str | int | None] | MISSING = Field(
        MISSING, description="With reload: the form (dtype, storage_dtype, offload) it was loaded in before."
    )
    dropped_loras: list[DroppedLora] | MISSING = Field(
        MISSING,
        description="With reload: the LoRAs applied before it, which the reload dropped (apply them again).",
    )


class LoadEverywhere(FixedShape):
    """A load on every device."""

    model_id: str
    placements: list[LoadedPlacement]


class NoMemory(FixedShape):
    """A device's memory before its worker ever reported it (a worker that did not start)."""


class DeviceStatus(FixedShape):
    """One device: its worker, memory and models."""

    id: str
    device: str
    state: SlotState
    pid: int | None
    name: str | None
    memory: MemoryInfo | NoMemory
    restarts: int
    last_error: str | None
    started_at: float | None
    queued: int
    running: str | None = Field(description="The operation the device runs now.")
    models: list[PlacementInfo]


class MemoryOptimized(FixedShape):
    """What ``POST /api/model/memory/optimize`` freed on one device."""

    device: str
    memory_before: MemoryInfo
    memory_after: MemoryInfo
    unloaded: list[str] = Field(description="Worker names of the models unloaded to meet the target.")
    freed_bytes: int
    target_met: bool
    lost: list[str] = Field(description="Models whose placement on the device ended (their ids).")
    kept: list[str] = Field(description="Worker names never unloaded: leased, kept, busy or loading.")


class DeviceReconciled(FixedShape):
    lost: list[str] = Field(description="Models the worker no longer held: dropped from the view.")
    adopted: list[str] = Field(description="Worker models of registered models: added to the view.")
    unmanaged: list[str] = Field(description="Worker models the registry does not know.")


class Reconciled(DeviceReconciled):
    devices: dict[str, DeviceReconciled] | MISSING = Field(
        MISSING, description="Each device's own (cluster mode: a node, or * for every node, may be named)."
    )


# ---------------------------------------------------------------------- unloading


class Unloaded(FixedShape):
    model_id: str
    handle: str = Field(description="The model's handle (what to type for it).")
    device: str
    freed_bytes: int
    reason: str | MISSING = MISSING
    memory_after: MemoryInfo | NoMemory | MISSING = MISSING


class UnloadAnswer(FixedShape):
    model_id: str
    handle: str = Field(description="The model's handle (what to type for it).")
    unloaded: list[Unloaded]


class Refused(FixedShape):
    model_id: str
    handle: str = Field(description="The model's handle (what to type for it).")
    device: str
    error: str


class UnloadAllAnswer(FixedShape):
    unloaded: list[Unloaded]
    refused: list[Refused] = Field(description="Models held by a lease or busy (pass force).")


# ---------------------------------------------------------------------- operations and LoRAs


class OperationResult(FixedShape):
    """validate / benchmark / optimize on one placement: the worker's answer per component."""

    model_id: str
    handle: str = Field(description="The model's handle (what to type for it).")
    device: str
    components: dict[str, Open]


class DeviceResult(OpenShape):
    """What one device's worker answered, with the device."""

    device: str


class LoraApplied(FixedShape):
    model_id: str
    lora_id: str
    applied: list[DeviceResult]


class LoraChanged(FixedShape):
    model_id: str
    lora_id: str
    devices: list[DeviceResult]


# ---------------------------------------------------------------------- job-or-result answers


class LoadDone(JobDone[LoadedPlacement]):
    pass


class LoadAnyDone(JobDone[LoadedPlacement | LoadEverywhere]):
    """One device (``device_id`` given) or every device."""


class OperationDone(JobDone[list[OperationResult]]):
    """One entry per placement."""


# ---------------------------------------------------------------------- routing


class RoutePlacement(FixedShape):
    node: str | None = Field(description="The node (cluster mode); null on one host.")
    device: str
    state: Literal["loading", "loaded", "unloading"]


class RouteInfo(FixedShape):
    """Where a model is served now."""

    model_id: str = Field(description="The model's id (in cluster mode, its cluster key).")
    name: str
    loaded: bool
    node: str | None = Field(description="The node of the placement to use (cluster mode).")
    device: str | None = Field(description="The device of the placement to use; null: loaded nowhere.")
    placements: list[RoutePlacement]
    ram_nodes: list[str] | MISSING = Field(
        MISSING, description="Nodes holding it in their RAM cache (cluster)."
    )
    disk_nodes: list[str] | MISSING = Field(MISSING, description="Nodes holding its file (cluster).")
