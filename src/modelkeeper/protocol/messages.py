"""Typed messages of the worker protocol.

Envelope (one JSON object per line)::

    request   {"type": "model.load_unet", "request_id": "r-1", "data": {...}}
    response  {"success": true, "data": {...}, "request_id": "r-1"}
    error     {"success": false, "error": "...", "error_code": "FILE_NOT_FOUND", "request_id": "r-1", "data": {...}}
    event     {"event": "progress", "request_id": "r-1", "data": {...}}

Each command's ``data`` has a request model and a result model below; ``COMMAND_MODELS`` maps a
command type to the pair. Unknown fields are refused, so a typo is an error, not a silent default.
"""

from __future__ import annotations

from enum import StrEnum
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field

from modelkeeper.protocol.commands import CommandType
from modelkeeper.protocol.errors import ErrorCode

PROTOCOL_VERSION = "1.0"


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid")


class _Open(BaseModel):
    """Results may grow fields; readers ignore what they do not know."""

    model_config = ConfigDict(extra="allow")


# ----------------------------------------------------------------------------- envelope


class Request(_Strict):
    type: str = Field(description="Command type, `<domain>.<verb>`; see CommandType.")
    request_id: str = Field(min_length=1, max_length=200)
    data: dict[str, Any] = Field(default_factory=dict)


class Response(_Strict):
    success: Literal[True] = True
    data: dict[str, Any] = Field(default_factory=dict)
    request_id: str | None


class ErrorResponse(_Strict):
    success: Literal[False] = False
    error: str
    error_code: ErrorCode
    request_id: str | None
    data: dict[str, Any] = Field(default_factory=dict)


class EventType(StrEnum):
    PROGRESS = "progress"
    STATE = "state"
    MEMORY_PRESSURE = "memory_pressure"
    LOG = "log"


class Event(_Strict):
    event: EventType
    request_id: str | None = None
    data: dict[str, Any] = Field(default_factory=dict)


# ----------------------------------------------------------------------------- shared parts


class ModelKind(StrEnum):
    """What a worker can hold. ``text_encoder`` is also accepted as ``encoder``."""

    UNET = "unet"
    TRANSFORMER = "transformer"
    VAE = "vae"
    TEXT_ENCODER = "text_encoder"
    TOKENIZER = "tokenizer"
    CONTROLNET = "controlnet"
    LORA = "lora"


class KeyLayout(StrEnum):
    AUTO = "auto"
    DIFFUSERS = "diffusers"
    ORIGINAL = "original"  # the LDM / SGM / OpenCLIP layout of single-file checkpoints


class DType(StrEnum):
    FLOAT32 = "float32"
    FLOAT16 = "float16"
    BFLOAT16 = "bfloat16"
    FLOAT8_E4M3FN = "float8_e4m3fn"  # storage only: kept in memory, upcast layer by layer to compute
    FLOAT8_E5M2 = "float8_e5m2"  # storage only


class DeviceInfo(_Open):
    kind: str = Field(description="cuda or cpu")
    index: int | None
    name: str


class MemoryInfo(_Open):
    total_bytes: int
    free_bytes: int
    reserve_bytes: int
    budget_bytes: int = Field(description="What models may use: total minus the reserve, or as configured.")
    models_bytes: int = Field(description="Bytes of the tensors of the loaded models.")
    allocated_bytes: int | None = Field(None, description="Allocator view (CUDA); process RSS on CPU.")


# ----------------------------------------------------------------------------- hello


class HelloRequest(_Strict):
    protocol_version: str | None = None
    client: str | None = None


class HelloResult(_Open):
    protocol_version: str
    worker_version: str
    pid: int
    device: DeviceInfo
    memory: MemoryInfo
    torch_version: str
    diffusers_version: str
    transformers_version: str
    capabilities: list[str]
    model_kinds: list[str]


# ----------------------------------------------------------------------------- loads


class LoadRequest(_Strict):
    """Data of every load command. ``model.load_model`` needs ``type``; the others imply it."""

    name: str = Field(min_length=1, max_length=500, description="Key under which the model is kept.")
    path: str = Field(min_length=1, description="A diffusers folder (pipeline or component) or a file.")
    type: ModelKind | Literal["encoder"] | None = None
    subfolder: str | None = Field(None, description="Component folder inside a pipeline folder.")
    variant: str | None = Field(None, description="Weight variant of a diffusers folder, e.g. fp16.")
    dtype: DType | None = Field(
        None,
        description="Compute dtype (float32, float16, bfloat16); default keeps the file's dtype "
        "(fp8 files: their norms and biases' dtype; quantized GGUF: bfloat16).",
    )
    storage_dtype: DType | None = Field(
        None,
        description="Dtype the weights are kept in on the device, upcast to the compute dtype layer by "
        "layer as it runs (float8_e4m3fn, float8_e5m2). Default: the file's own form (fp8 and GGUF "
        "files stay packed), else the compute dtype.",
    )
    layout: KeyLayout = KeyLayout.AUTO
    config: dict[str, Any] | str | None = Field(
        None, description="Model config for a single file: a dict or a path to config.json or a folder."
    )
    encoder: str | None = Field(None, description="clip_l, clip_g, t5 (a hint; the config decides).")
    estimated_size_mb: float | None = Field(None, ge=0)
    allow_evict: bool = Field(False, description="Unload least-recently-used models to make room.")
    replace: bool = Field(False, description="Unload a model of the same name first.")


class LoadResult(_Open):
    name: str
    type: str
    class_name: str
    device: str
    dtype: str | None
    bytes: int
    parameters: int
    tensors: int
    load_seconds: float
    source: dict[str, Any]
    evicted: list[str] = Field(default_factory=list)
    memory: MemoryInfo
    vocab_size: int | None = Field(None, description="Tokenizers only.")
    storage: str | None = Field(
        None,
        description="How the weights are kept when not in the compute dtype: float8_e4m3fn, "
        "float8_e5m2, scaled_float8_e4m3fn, or the dominant GGUF quant (gguf:Q8_0, ...).",
    )
    timings: dict[str, float] = Field(
        default_factory=dict, description="Seconds per stage: plan, read, convert, assemble, total."
    )


class UnloadRequest(_Strict):
    name: str = Field(min_length=1)


class UnloadResult(_Open):
    name: str
    freed_bytes: int
    memory_before: MemoryInfo
    memory_after: MemoryInfo


# ----------------------------------------------------------------------------- info and status


class ModelInfoRequest(_Strict):
    name: str | None = Field(None, description="One model; all when omitted.")
    fingerprint: bool = Field(
        False, description="Add a content hash of each model's live weights (runs on the device thread)."
    )


class LoadedModelInfo(_Open):
    name: str
    type: str
    class_name: str
    device: str
    dtype: str | None
    bytes: int
    parameters: int
    tensors: int
    load_seconds: float
    loaded_at: float
    last_used: float
    source: dict[str, Any]


class ModelInfoResult(_Open):
    models: list[LoadedModelInfo]
    model_count: int
    memory: MemoryInfo


class StatusRequest(_Strict):
    pass


class RunningOperation(_Open):
    request_id: str
    type: str
    name: str | None
    started_at: float
    progress: dict[str, Any] = Field(default_factory=dict)


class StatusResult(_Open):
    state: Literal["idle", "busy", "stopping"]
    device: DeviceInfo
    running: RunningOperation | None
    queued: int
    model_count: int
    memory: MemoryInfo
    uptime_seconds: float


class OptimizeMemoryRequest(_Strict):
    target_free_mb: float | None = Field(
        None, ge=0, description="Unload least-recently-used models until this much of the budget is free."
    )
    keep: list[str] = Field(default_factory=list, description="Names never unloaded by this call.")


class OptimizeMemoryResult(_Open):
    memory_before: MemoryInfo
    memory_after: MemoryInfo
    unloaded: list[str]
    freed_bytes: int
    target_met: bool


class CleanupRequest(_Strict):
    pass


class CleanupResult(_Open):
    unloaded: list[str]
    freed_bytes: int
    memory_after: MemoryInfo


class ReleaseSegmentsRequest(_Strict):
    paths: list[str] | None = Field(
        None, description="RAM-cache segments to unmap (and unregister from CUDA); all when omitted."
    )


class ReleaseSegmentsResult(_Open):
    released: list[str]


class LoadLoraRequest(_Strict):
    name: str = Field(min_length=1, description="Key of the LoRA.")
    path: str = Field(min_length=1, description="A LoRA file: kohya, LyCORIS LoHa/LoKr, diffusers or PEFT.")
    targets: dict[str, str] = Field(
        description="Role to loaded model name: unet or transformer, text_encoder, text_encoder_2."
    )
    strength: float = 1.0
    role_strength: dict[str, float] | None = None
    strict: bool = Field(False, description="Refuse a LoRA with any key that matches no layer.")
    min_match: float = Field(0.5, ge=0, le=1, description="Least share of keys that must match a layer.")


class SetLoraStrengthRequest(_Strict):
    name: str = Field(min_length=1)
    strength: float
    role_strength: dict[str, float] | None = None


class UnloadLoraRequest(_Strict):
    name: str = Field(min_length=1)


class ValidateModelRequest(_Strict):
    name: str = Field(min_length=1)
    level: Literal["header", "weights", "functional"] = "header"
    batch: int = Field(1, ge=1, le=64)


class BenchmarkModelRequest(_Strict):
    name: str = Field(min_length=1)
    resolution: int | None = Field(None, ge=8, le=4096)
    batch: int = Field(1, ge=1, le=64)
    steps: int = Field(10, ge=1, le=10000)
    warmup: int = Field(2, ge=0, le=1000)
    tokens: int | None = Field(None, ge=1, le=4096)


class OptimizeModelRequest(_Strict):
    name: str = Field(min_length=1)
    options: dict[str, Any] = Field(
        default_factory=dict,
        description="dtype (float32|float16|bfloat16), channels_last, attention (sdpa|default), "
        "vae_slicing, vae_tiling, compile",
    )
    measure: bool = Field(True, description="Time a forward pass before and after.")
    revert: bool = Field(False, description="Undo what earlier optimize_model calls applied.")


class CancelRequest(_Strict):
    target_request_id: str = Field(min_length=1)


class CancelResult(_Open):
    target_request_id: str
    found: bool
    state: Literal["queued", "running", "unknown"]


class ShutdownRequest(_Strict):
    pass


class ShutdownResult(_Open):
    stopping: bool


# ----------------------------------------------------------------------------- events


class ProgressData(_Open):
    stage: str
    done: int
    total: int
    unit: str = "bytes"


class StateData(_Open):
    name: str
    state: Literal["loading", "loaded", "unloading", "unloaded", "failed"]
    reason: str | None = None
    error_code: ErrorCode | None = None


COMMAND_MODELS: dict[CommandType, tuple[type[BaseModel], type[BaseModel]]] = {
    CommandType.WORKER_HELLO: (HelloRequest, HelloResult),
    CommandType.WORKER_SHUTDOWN: (ShutdownRequest, ShutdownResult),
    CommandType.CONTROL_CANCEL: (CancelRequest, CancelResult),
    CommandType.LOAD_MODEL: (LoadRequest, LoadResult),
    CommandType.LOAD_UNET: (LoadRequest, LoadResult),
    CommandType.LOAD_VAE: (LoadRequest, LoadResult),
    CommandType.LOAD_ENCODER: (LoadRequest, LoadResult),
    CommandType.LOAD_TOKENIZER: (LoadRequest, LoadResult),
    CommandType.UNLOAD_MODEL: (UnloadRequest, UnloadResult),
    CommandType.GET_MODEL_INFO: (ModelInfoRequest, ModelInfoResult),
    CommandType.GET_STATUS: (StatusRequest, StatusResult),
    CommandType.OPTIMIZE_MEMORY: (OptimizeMemoryRequest, OptimizeMemoryResult),
    CommandType.CLEANUP: (CleanupRequest, CleanupResult),
    CommandType.RELEASE_SEGMENTS: (ReleaseSegmentsRequest, ReleaseSegmentsResult),
    CommandType.LOAD_LORA: (LoadLoraRequest, _Open),
    CommandType.SET_LORA_STRENGTH: (SetLoraStrengthRequest, _Open),
    CommandType.UNLOAD_LORA: (UnloadLoraRequest, _Open),
    CommandType.VALIDATE_MODEL: (ValidateModelRequest, _Open),
    CommandType.BENCHMARK_MODEL: (BenchmarkModelRequest, _Open),
    CommandType.OPTIMIZE_MODEL: (OptimizeModelRequest, _Open),
}

EVENT_MODELS: dict[EventType, type[BaseModel]] = {
    EventType.PROGRESS: ProgressData,
    EventType.STATE: StateData,
    EventType.MEMORY_PRESSURE: MemoryInfo,
}
