"""Response bodies of the API, so that ``/openapi.json`` documents every answer.

The models describe what the orchestrator already returns, field for field and in its order: a
route declaring one answers the same JSON as before. Fixed shapes refuse unknown fields (a field
the service starts returning without its model here is a test failure, not silent drift); open
content (worker results, job parameters and progress, history data) is an open object. A field the
service leaves out in some answers is typed ``X | MISSING``: absent from the schema's ``required``
and from the answer when not given, never turned into ``null``. Registry and protocol models are
reused where they are the shape: models and pages (:mod:`modelkeeper.registry.records`), a
device's memory (:class:`modelkeeper.protocol.messages.MemoryInfo`).
"""

from __future__ import annotations

from typing import Any, Generic, Literal, TypeVar

from pydantic import MISSING, BaseModel, ConfigDict, Field

from modelkeeper.orchestrator.jobs import JobState
from modelkeeper.orchestrator.workers import SlotState
from modelkeeper.protocol.messages import MemoryInfo
from modelkeeper.registry.records import HistoryEntry, ModelRecord, ModelSummary, UserMeta

ResultT = TypeVar("ResultT")

#: Open content: what a worker answered, a job's parameters, progress or result.
Open = dict[str, Any]


class _Fixed(BaseModel):
    model_config = ConfigDict(extra="forbid")


class _Open(BaseModel):
    """An object whose named fields are always there, beside others the worker may add."""

    model_config = ConfigDict(extra="allow")


# ---------------------------------------------------------------------- errors


class ErrorBody(_Fixed):
    """Every error answer (``api/errors.py``, the token and body-size doors)."""

    error: str = Field(description="What went wrong, naming the file, field or device.")
    error_code: str = Field(
        description="The protocol's error code (MODEL_NOT_FOUND, INSUFFICIENT_MEMORY...), or "
        "NOT_FOUND, FORBIDDEN, NOT_READY, MISSING_PART, INCOMPATIBLE_PART, METHOD_NOT_ALLOWED, UNAUTHORIZED, "
        "BODY_TOO_LARGE from "
        "the HTTP layer. Each code has one HTTP status."
    )
    details: Open = Field(description="Context: the field, path, device, leases... (may be empty).")


class NoMemory(_Fixed):
    """A device's memory before its worker ever reported it (a worker that did not start)."""


# ---------------------------------------------------------------------- jobs


class JobError(_Fixed):
    error_code: str
    error: str
    details: Open | MISSING = MISSING


class JobInfo(_Fixed):
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


class JobAccepted(_Fixed):
    """202: the job started (``wait_for_completion: false``); follow it at ``/api/jobs/{id}``."""

    job: JobInfo


class JobDone(_Fixed, Generic[ResultT]):
    """200: the job ran to its end; ``result`` is also the job's ``result``."""

    job: JobInfo
    result: ResultT


# ---------------------------------------------------------------------- placements and devices


class AppliedLora(_Fixed):
    name: str = Field(description="Key of the LoRA in the worker.")
    lora: str = Field(description="The LoRA model's name.")
    strength: float


class PlacementInfo(_Fixed):
    """A model on one device (its VRAM tier)."""

    model_id: str
    handle: str = Field(description="The model's handle when it was placed (what to type for it).")
    name: str
    type: str
    device: str
    state: Literal["loading", "loaded", "unloading"]
    components: dict[str, str] = Field(description="Component -> name in the worker.")
    sources: dict[str, str] = Field(description="Component -> where it was read from: ram, disk.")
    bytes: int = Field(description="Bytes on the device: the stored form, the resident part when offloaded.")
    streamed_bytes: int | MISSING = Field(
        MISSING, description="Weights streamed from RAM as it runs (offload)."
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
    node: str | MISSING = Field(MISSING, description="Cluster mode: the node of the device.")
    local_id: str | MISSING = Field(MISSING, description="Cluster mode: the model's id on that node.")
    loading: bool | MISSING = Field(MISSING, description="Cluster mode: a load is in flight there.")


class LoadedPlacement(PlacementInfo):
    """A load's result on one device."""

    evicted: list[str] | MISSING = Field(MISSING, description="Models unloaded to make room.")
    already_loaded: bool | MISSING = Field(MISSING, description="True: it was loaded before the call.")
    coalesced: bool | MISSING = Field(MISSING, description="True: joined a load already in flight.")


class LoadEverywhere(_Fixed):
    """A load on every device."""

    model_id: str
    placements: list[LoadedPlacement]


class DeviceStatus(_Fixed):
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


class MemoryOptimized(_Fixed):
    """What ``POST /api/model/memory/optimize`` freed on one device."""

    device: str
    memory_before: MemoryInfo
    memory_after: MemoryInfo
    unloaded: list[str] = Field(description="Worker names of the models unloaded to meet the target.")
    freed_bytes: int
    target_met: bool
    lost: list[str] = Field(description="Models whose placement on the device ended (their ids).")
    kept: list[str] = Field(description="Worker names never unloaded: leased, kept, busy or loading.")


class DeviceReconciled(_Fixed):
    lost: list[str] = Field(description="Models the worker no longer held: dropped from the view.")
    adopted: list[str] = Field(description="Worker models of registered models: added to the view.")
    unmanaged: list[str] = Field(description="Worker models the registry does not know.")


class Reconciled(DeviceReconciled):
    devices: dict[str, DeviceReconciled] | MISSING = Field(
        MISSING, description="Each device's own (cluster mode: a node, or * for every node, may be named)."
    )


# ---------------------------------------------------------------------- the RAM cache


class CacheStats(_Fixed):
    segments: int
    bytes_used: int
    budget_bytes: int
    hits: int
    misses: int
    hit_rate: float
    evictions: int
    evicted_bytes: int
    shm_dir: str


class SegmentInfo(_Fixed):
    """One cached component."""

    component_id: str
    path: str
    bytes: int
    source: str
    tensor_count: int | None
    fill_seconds: float
    created_at: float
    last_used: float
    hits: int
    models: list[str]
    pinned: bool = Field(description="A worker is loading from it now.")
    node: str | MISSING = Field(
        MISSING, description="The node whose RAM cache holds it (cluster mode; ids are node/component)."
    )


class _ComponentLabel(_Fixed):
    component: str | MISSING = Field(MISSING, description="The model's component (caching a model).")


class CachedSegment(SegmentInfo, _ComponentLabel):  # the label comes first, as the service writes it
    pass


class NodeCache(_Fixed):
    """One node's RAM cache (cluster mode)."""

    stats: CacheStats
    segments: list[SegmentInfo]


class CacheView(_Fixed):
    stats: CacheStats
    segments: list[SegmentInfo]
    nodes: dict[str, NodeCache] | MISSING = Field(MISSING, description="Each node's cache (cluster mode).")


class CacheFilled(_Fixed):
    model_id: str | MISSING = MISSING
    segments: list[CachedSegment]


class CacheAnswer(_Fixed):
    """200 of ``POST /api/model/cache``: a component already cached answers at once, with no job."""

    job: JobInfo | MISSING = MISSING
    result: CacheFilled


class CacheCleared(_Fixed):
    dropped: int
    freed_bytes: int


class SegmentDropped(_Fixed):
    component_id: str
    freed_bytes: int


class JobCounts(_Fixed):
    """Jobs kept, by state."""

    queued: int
    running: int
    succeeded: int
    failed: int
    cancelled: int


class ServiceStatus(_Fixed):
    ready: bool
    uptime_seconds: float
    devices: list[DeviceStatus]
    cache: CacheStats | None
    jobs: JobCounts
    leases: int = Field(description="Active leases.")


# ---------------------------------------------------------------------- discovery


class ScanSummary(_Fixed):
    added: int
    updated: int
    unchanged: int
    moved: int
    rejected: int
    missing: int
    total: int


class RejectedFile(_Fixed):
    path: str
    status: str
    format: str | None
    type: str | None
    base: str | None
    variant: str | None
    encoder: str | None
    components: list[str]
    rule: str | None
    confidence: float | None
    model_id: str | None
    change: str
    error_code: str | None
    error: str | None


class Hashed(_Fixed):
    files: int
    bytes: int
    errors: int


class ScanResult(_Fixed):
    summary: ScanSummary
    seconds: float
    rejected: list[RejectedFile] = Field(description="The first 200 files refused.")
    missing: list[str] = Field(description="The first 200 paths gone since the last scan.")
    hashed: Hashed | MISSING = MISSING


# ---------------------------------------------------------------------- the registry


class NodeLocation(_Fixed):
    model_id: str = Field(description="The model's id in that node's registry.")
    path: str | None
    ram_bytes: int = Field(description="Bytes of it in that node's RAM cache.")


class ListedModel(ModelSummary):
    loaded_on: list[str] = Field(description="Devices the model is loaded on.")
    nodes: dict[str, NodeLocation] | MISSING = Field(
        MISSING, description="Cluster mode: where it lies on each node."
    )


class ModelPage(_Fixed):
    total: int
    offset: int
    limit: int
    items: list[ListedModel]


class ComponentUse(_Fixed):
    model_id: str
    name: str
    component: str


class ComponentEntry(_Fixed):
    """A component across every model holding it (one entry per content id once hashed)."""

    component_id: str | None
    kind: str
    base: str
    bytes: int
    tensor_count: int
    parameters: int
    dtypes: dict[str, int]
    models: list[ComponentUse]
    cached: bool
    nodes: list[str] | MISSING = Field(
        MISSING, description="The nodes whose registries hold it (cluster mode)."
    )


class _ModelName(_Fixed):
    model_id: str
    name: str


class ModelMetadata(UserMeta, _ModelName):  # model_id and name come first, as the service writes them
    pass


class IdentificationSummary(_Fixed):
    """What a model detail keeps of the identification (its components and file metadata are elsewhere)."""

    rule: str
    rules: dict[str, str]
    confidence: float
    loadable: bool
    hints: list[str]
    hint_conflicts: list[str]
    evidence: Open


class DiskTier(_Fixed):
    status: str
    path: str | None
    bytes: int


class RamTier(_Fixed):
    component_id: str
    bytes: int


class LoadFailure(_Fixed):
    device: str
    error_code: str
    error: str
    at: float


class Tiers(_Fixed):
    disk: DiskTier
    ram: list[RamTier]
    vram: list[PlacementInfo]
    failed: list[LoadFailure] = Field(description="The last failed load per device, until the next attempt.")


class Performance(_Fixed):
    loads: int
    last_load_seconds: float | None
    best_load_seconds: float | None
    last_validate: Open | None
    last_benchmark: Open | None
    last_optimize: Open | None


class PartInfo(_Fixed):
    """One part a transformer-only Flux or SD3 model is loaded with (``orchestrator/completion.py``)."""

    role: str = Field(
        description="Its slot in the pipeline: text_encoder, text_encoder_2, text_encoder_3, vae."
    )
    wants: str = Field(
        description="What fits the role, e.g. 'T5-XXL, 4096 wide' or 'VAE, 16 latent channels'."
    )
    status: Literal["auto", "pinned", "missing", "refused"] = Field(
        description="auto: chosen by base and shapes; pinned: the one in default_settings.parts; missing: "
        "none fits (a load answers 422 MISSING_PART); refused: the pinned one does not fit (422 INCOMPATIBLE_PART)."
    )
    model_id: str | None = Field(description="The part's model (None when missing or refused).")
    handle: str | None
    why: str = Field(description="Why this part, or why none.")


class ModelDetail(ModelRecord):
    identification: IdentificationSummary  # type: ignore[assignment]  # a summary in place of the full record
    state: Tiers
    performance: Performance
    history: list[HistoryEntry]
    parts: list[PartInfo] = Field(
        description="The text encoders and VAE a transformer-only Flux or SD3 file is loaded with, and "
        "what is missing (empty for other models)."
    )


class ClusterTiers(_Fixed):
    disk: list[dict[str, Any]] = Field(description="Nodes holding its file: node, path.")
    ram: list[dict[str, Any]] = Field(description="Nodes holding it in their RAM cache: node, bytes.")
    vram: list[PlacementInfo]


class ClusterModelDetail(_Fixed):
    """A model across the cluster (cluster mode): its key, where it lies on each node, its placements."""

    id: str = Field(description="The cluster key (content hash).")
    handle: str
    name: str
    type: str | None
    base: str | None
    variant: str | None
    format: str | None
    size: int | None
    path: str | None
    tags: list[str] | None
    status: str
    nodes: dict[str, NodeLocation]
    state: ClusterTiers


# ---------------------------------------------------------------------- unloading


class Unloaded(_Fixed):
    model_id: str
    device: str
    freed_bytes: int
    reason: str | MISSING = MISSING
    memory_after: MemoryInfo | NoMemory | MISSING = MISSING


class UnloadAnswer(_Fixed):
    model_id: str
    unloaded: list[Unloaded]


class Refused(_Fixed):
    model_id: str
    device: str
    error: str


class UnloadAllAnswer(_Fixed):
    unloaded: list[Unloaded]
    refused: list[Refused] = Field(description="Models held by a lease or busy (pass force).")


# ---------------------------------------------------------------------- operations and LoRAs


class OperationResult(_Fixed):
    """validate / benchmark / optimize on one placement: the worker's answer per component."""

    model_id: str
    device: str
    components: dict[str, Open]


class DeviceResult(_Open):
    """What one device's worker answered, with the device."""

    device: str


class LoraApplied(_Fixed):
    model_id: str
    lora_id: str
    applied: list[DeviceResult]


class LoraChanged(_Fixed):
    model_id: str
    lora_id: str
    devices: list[DeviceResult]


# ---------------------------------------------------------------------- leases and health


class LeaseInfo(_Fixed):
    id: str
    model_id: str
    device: str | None = Field(description="null: every device.")
    holder: str
    ttl_seconds: float
    created_at: float
    expires_at: float
    expires_in: float


class Liveness(_Fixed):
    live: bool


class PreloadState(_Fixed):
    """The models of ``settings.preload``: how many are still to load, which loaded, which failed."""

    pending: int
    loaded: list[dict[str, Any]]
    failed: list[dict[str, Any]]


class Readiness(_Fixed):
    """200 when ready, 503 (same body) when not."""

    ready: bool
    workers: dict[str, SlotState]
    preload: PreloadState


# ---------------------------------------------------------------------- job-or-result answers


class LoadDone(JobDone[LoadedPlacement]):
    pass


class LoadAnyDone(JobDone[LoadedPlacement | LoadEverywhere]):
    """One device (``device_id`` given) or every device."""


class OperationDone(JobDone[list[OperationResult]]):
    """One entry per placement."""


class ScanDone(JobDone[ScanResult]):
    pass


class RoutePlacement(_Fixed):
    node: str | None = Field(description="The node (cluster mode); null on one host.")
    device: str
    state: Literal["loading", "loaded", "unloading"]


class RouteInfo(_Fixed):
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


class InstalledFileInfo(_Fixed):
    path: str = Field(description="Relative to the installed model's path.")
    bytes: int
    sha256: str
    reused: bool = Field(description="True: linked from content already registered, not downloaded.")


class InstallResultInfo(_Fixed):
    """An installed and registered model."""

    model_id: str
    name: str
    type: str
    source: str = Field(description="The source, without credentials.")
    kind: Literal["hub", "url", "civitai"]
    revision: str | None = Field(description="The Hub commit or the CivitAI version id.")
    path: str
    bytes: int
    transferred_bytes: int = Field(description="Bytes fetched by this install (less when resumed or reused).")
    seconds: float
    files: list[InstalledFileInfo]
    node: str | MISSING = Field(MISSING, description="The node it was installed onto (cluster mode).")


class InstallDone(JobDone[InstallResultInfo]):
    pass


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
