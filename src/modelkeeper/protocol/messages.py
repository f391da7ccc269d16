"""Typed messages of the worker protocol.

Envelope (one JSON object per line)::

    request   {"type": "model.load_unet", "request_id": "r-1", "data": {...}}
    response  {"success": true, "data": {...}, "request_id": "r-1"}
    error     {"success": false, "error": "...", "error_code": "FILE_NOT_FOUND", "request_id": "r-1", "data": {...}}
    event     {"event": "progress", "request_id": "r-1", "data": {...}}

Each command's ``data`` has a request model and a result model; ``COMMAND_MODELS`` maps a
command type to the pair. Unknown fields are refused, so a typo is an error, not a silent default.
This module holds the envelope, the events and the messages of the status, info, memory and
model-operation commands; the load and unload messages are in ``load_messages.py``, the LoRA ones in
``lora_messages.py``, the bases and shared parts in ``message_base.py``. Every message is importable
from here (``__all__``), so callers need not know which of them defines it.
"""

from __future__ import annotations

from enum import StrEnum
from typing import Any, Literal

from pydantic import BaseModel, Field, field_validator

from modelkeeper.protocol.commands import CommandType
from modelkeeper.protocol.errors import ErrorCode
from modelkeeper.protocol.load_messages import LoadRequest, LoadResult, UnloadRequest, UnloadResult
from modelkeeper.protocol.lora_messages import (
    LORA_ROLES,
    LoadLoraRequest,
    LoadLoraResult,
    LoraRole,
    LoraRoleMatch,
    SetLoraStrengthRequest,
    SetLoraStrengthResult,
    UnloadLoraRequest,
    UnloadLoraResult,
)
from modelkeeper.protocol.message_base import (
    DeviceInfo,
    DType,
    KeyLayout,
    MemoryInfo,
    ModelKind,
    _Held,
    _Open,
    _Strict,
)

PROTOCOL_VERSION = "1.0"


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


# ----------------------------------------------------------------------------- info and status


class ModelInfoRequest(_Strict):
    name: str | None = Field(None, description="One model; all when omitted.")
    fingerprint: bool = Field(
        False, description="Add a content hash of each model's live weights (runs on the device thread)."
    )


class LoadedModelInfo(_Held):
    loaded_at: float
    last_used: float
    source: dict[str, Any]
    streaming: dict[str, Any] | None = Field(
        None, description="Offloaded models: ring bytes, units, passes, fetches, misses, copied bytes."
    )


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


ValidationLevel = Literal["header", "weights", "functional"]


class ValidateModelRequest(_Strict):
    name: str = Field(min_length=1)
    level: ValidationLevel = "header"
    batch: int = Field(1, ge=1, le=64)


class ValidationCheck(_Open):
    name: str = Field(
        description="structure, dtypes, device (header); finite, statistics (weights); "
        "forward, encode, decode (functional)."
    )
    level: ValidationLevel
    passed: bool = Field(description="False: the model is broken in this respect.")
    detail: str = Field(description="One line for a person.")
    seconds: float
    data: dict[str, Any] = Field(
        description="Figures of the check, their keys depending on it (counts, ranges, shapes, example names); "
        'a NaN figure is written as the string "NaN".'
    )


class ValidateModelResult(_Open):
    name: str
    class_name: str
    level: ValidationLevel = Field(description="The level asked for; the checks of the levels below ran too.")
    passed: bool = Field(description="All checks passed.")
    checks: list[ValidationCheck]
    seconds: float


class BenchmarkModelRequest(_Strict):
    name: str = Field(min_length=1)
    resolution: int | None = Field(None, ge=8, le=4096)
    batch: int = Field(1, ge=1, le=64)
    steps: int = Field(10, ge=1, le=10000)
    warmup: int = Field(2, ge=0, le=1000)
    tokens: int | None = Field(None, ge=1, le=4096)


class BenchmarkFigure(_Open):
    """The timing of one part of a module over ``steps`` passes."""

    part: str = Field(description="forward (denoiser, text encoder), encode or decode (VAE).")
    dtype: str = Field(description="Dtype of the output.")
    batch: int
    resolution: int | None = Field(description="Pixels per side; null for text encoders.")
    tokens: int | None = Field(description="Text tokens of the inputs.")
    inputs: dict[str, list[int]] = Field(description="Shape of each input.")
    output_shape: list[int]
    warmup: int
    steps: int
    median_s: float
    p90_s: float = Field(description="Nearest-rank 90th percentile.")
    mean_s: float
    min_s: float
    max_s: float
    iterations_per_second: float = Field(description="1 / median_s.")
    items_per_second: float = Field(description="batch / median_s.")
    peak_memory_bytes: int = Field(description="Peak memory of the passes above what was allocated before.")
    memory_method: str = Field(
        description="How the peak was measured: cuda.max_memory_allocated, or rss_delta (sampled process RSS)."
    )
    seconds: float = Field(description="Wall time of warm-up and timed passes.")


class BenchmarkModelResult(_Open):
    name: str
    class_name: str
    device: str = Field(description="The worker's device.")
    figures: list[BenchmarkFigure] = Field(description="One per part of the module.")
    seconds: float


#: The options of ``model.optimize_model`` and the values each takes.
OPTIMIZE_OPTIONS: dict[str, str] = {
    "dtype": "float32, float16 or bfloat16",
    "channels_last": "true or false",
    "attention": "sdpa or default",
    "vae_slicing": "true or false",
    "vae_tiling": "true or false",
    "compile": "true, false or a dict of torch.compile options",
}


def optimize_option_problem(options: dict[str, Any]) -> tuple[str, str] | None:
    """The first of ``options`` that is unknown or has a bad value, with why; None when all are
    good. Checked where a request is taken: the service before any job, the worker before any change."""
    for key, value in options.items():
        if key not in OPTIMIZE_OPTIONS:
            return key, f"unknown optimisation {key!r} (known: {', '.join(OPTIMIZE_OPTIONS)})"
        good = {
            "dtype": value in ("float32", "float16", "bfloat16"),
            "attention": value in ("sdpa", "default"),
            "compile": isinstance(value, bool | dict),
        }.get(key, isinstance(value, bool))
        if not good:
            return key, f"{value!r} is not {OPTIMIZE_OPTIONS[key]}"
    return None


class OptimizeModelRequest(_Strict):
    name: str = Field(min_length=1)
    options: dict[str, Any] = Field(
        default_factory=dict,
        description="dtype (float32|float16|bfloat16), channels_last, attention (sdpa|default), "
        "vae_slicing, vae_tiling, compile",
    )

    @field_validator("options")
    @classmethod
    def _known(cls, options: dict[str, Any]) -> dict[str, Any]:
        problem = optimize_option_problem(options)
        if problem is not None:
            raise ValueError(f"{problem[0]}: {problem[1]}")
        return options

    measure: bool = Field(True, description="Time a forward pass before and after.")
    revert: bool = Field(False, description="Undo what earlier optimize_model calls applied.")


class AppliedOptimization(_Open):
    option: str
    before: str | bool = Field(
        description="The setting before: a dtype or attention processor name (str), or a flag (bool)."
    )
    after: str | bool = Field(description="The setting after, of the same kind as `before`.")
    lossless: bool | None = Field(
        None, description="dtype only: the cast keeps every value, so a revert restores the same bits."
    )


class SkippedOptimization(_Open):
    option: str
    reason: str = Field(description="Why it did not apply, e.g. `already float32`, `no 4-D weights`.")


class OptimizeModelResult(_Open):
    """An optimisation's report, or with ``revert`` only ``reverted`` and the byte counts."""

    name: str
    bytes_before: int = Field(description="Bytes of the model's tensors before the call.")
    bytes_after: int = Field(description="Bytes of the model's tensors after the call.")
    reverted: list[str] | None = Field(None, description="revert only: the options undone, newest first.")
    class_name: str | None = Field(None, description="Absent with revert.")
    applied: list[AppliedOptimization] | None = Field(None, description="Absent with revert.")
    skipped: list[SkippedOptimization] | None = Field(None, description="Absent with revert.")
    memory_before: int | None = Field(
        None, description="Device memory allocated (CUDA) or process RSS (CPU) before; absent with revert."
    )
    memory_after: int | None = Field(None, description="The same after; absent with revert.")
    latency_before_s: float | None = Field(
        None, description="Median seconds of a small forward pass before; null without measure."
    )
    latency_after_s: float | None = Field(None, description="The same after; null without measure.")
    speedup: float | None = Field(
        None, description="latency_before_s / latency_after_s; null without measure."
    )
    seconds: float | None = Field(None, description="Absent with revert.")
    unshared: list[str] | None = Field(
        None,
        description="The model's name when its module was shared (a part of several models) and left "
        "sharing to be changed (its own copy when another name held it); absent with revert.",
    )


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
    CommandType.LOAD_LORA: (LoadLoraRequest, LoadLoraResult),
    CommandType.SET_LORA_STRENGTH: (SetLoraStrengthRequest, SetLoraStrengthResult),
    CommandType.UNLOAD_LORA: (UnloadLoraRequest, UnloadLoraResult),
    CommandType.VALIDATE_MODEL: (ValidateModelRequest, ValidateModelResult),
    CommandType.BENCHMARK_MODEL: (BenchmarkModelRequest, BenchmarkModelResult),
    CommandType.OPTIMIZE_MODEL: (OptimizeModelRequest, OptimizeModelResult),
}

EVENT_MODELS: dict[EventType, type[BaseModel]] = {
    EventType.PROGRESS: ProgressData,
    EventType.STATE: StateData,
    EventType.MEMORY_PRESSURE: MemoryInfo,
}


__all__ = [
    "COMMAND_MODELS",
    "EVENT_MODELS",
    "LORA_ROLES",
    "OPTIMIZE_OPTIONS",
    "PROTOCOL_VERSION",
    "AppliedOptimization",
    "BenchmarkFigure",
    "BenchmarkModelRequest",
    "BenchmarkModelResult",
    "CancelRequest",
    "CancelResult",
    "CleanupRequest",
    "CleanupResult",
    "DType",
    "DeviceInfo",
    "ErrorResponse",
    "Event",
    "EventType",
    "HelloRequest",
    "HelloResult",
    "KeyLayout",
    "LoadLoraRequest",
    "LoadLoraResult",
    "LoadRequest",
    "LoadResult",
    "LoadedModelInfo",
    "LoraRole",
    "LoraRoleMatch",
    "MemoryInfo",
    "ModelInfoRequest",
    "ModelInfoResult",
    "ModelKind",
    "OptimizeMemoryRequest",
    "OptimizeMemoryResult",
    "OptimizeModelRequest",
    "OptimizeModelResult",
    "ProgressData",
    "ReleaseSegmentsRequest",
    "ReleaseSegmentsResult",
    "Request",
    "Response",
    "RunningOperation",
    "SetLoraStrengthRequest",
    "SetLoraStrengthResult",
    "ShutdownRequest",
    "ShutdownResult",
    "SkippedOptimization",
    "StateData",
    "StatusRequest",
    "StatusResult",
    "UnloadLoraRequest",
    "UnloadLoraResult",
    "UnloadRequest",
    "UnloadResult",
    "ValidateModelRequest",
    "ValidateModelResult",
    "ValidationCheck",
    "ValidationLevel",
    "optimize_option_problem",
]
