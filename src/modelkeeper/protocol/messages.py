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
from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator

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
    offload: Literal["none", "auto"] | Annotated[int, Field(strict=True, ge=0)] = Field(
        "none",
        description="Partial residency: `none` loads the whole model or refuses it (INSUFFICIENT_MEMORY); "
        "`auto` keeps resident what fits the device budget and streams the rest of its blocks from host "
        "memory as the forward pass reaches them; a byte count keeps at most that many bytes of weights "
        "resident (the parts outside the blocks always are).",
    )
    share: str | None = Field(
        None,
        description="A token naming the weights and config (the orchestrator gives a part's model and "
        "content id). A load with one, `offload: none`, shares the module this worker holds under the same "
        "token, type, dtype and storage_dtype: one module, several names, freed with its last name.",
    )

    def share_key(self) -> str | None:
        """What a module loaded by this request is shared by (None: never shared): the token and the
        form it is loaded in. Two requests with one key load one module."""
        if self.share is None or self.offload != "none":
            return None
        form = [self.type or "", self.dtype or "file", self.storage_dtype or "file"]
        return "|".join([self.share, *(str(getattr(f, "value", f)) for f in form)])


class _Held(_Open):
    """What a loaded model holds on its device: shared by a load's result and the model's info."""

    resident_bytes: int | None = Field(None, description="Weights kept on the device (all unless offloaded).")
    streamed_bytes: int | None = Field(None, description="Weights streamed from host memory at each use.")
    device_bytes: int | None = Field(
        None,
        description="What it holds against the device budget: `bytes`, or (offloaded) its resident weights "
        "and its ring.",
    )
    share: str | None = Field(None, description="The key loads share this module by (LoadRequest.share_key).")
    shared_with: list[str] = Field(
        default_factory=list,
        description="Other names of the same module (a shared part): its bytes count once.",
    )


class LoadResult(_Held):
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


class LoadedModelInfo(_Held):
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


class LoraRole(StrEnum):
    """The modules a LoRA may patch, by the role they play in a pipeline: the one table of roles
    that requests, results, the worker and the orchestrator share. ``unet`` and ``transformer``
    both name the denoiser (a LoRA file's denoiser keys go to whichever of them is given)."""

    UNET = "unet"
    TRANSFORMER = "transformer"
    TEXT_ENCODER = "text_encoder"
    TEXT_ENCODER_2 = "text_encoder_2"
    TEXT_ENCODER_3 = "text_encoder_3"


LORA_ROLES: tuple[LoraRole, ...] = tuple(LoraRole)


class LoadLoraRequest(_Strict):
    name: str = Field(min_length=1, description="Key of the LoRA.")
    path: str = Field(min_length=1, description="A LoRA file: kohya, LyCORIS LoHa/LoKr, diffusers or PEFT.")
    targets: dict[LoraRole, str] = Field(
        description="Role to loaded model name: unet or transformer, text_encoder, text_encoder_2, text_encoder_3."
    )
    strength: float = 1.0
    role_strength: dict[LoraRole, float] | None = Field(
        None, description="Strength per role, overriding `strength` for that role's module."
    )
    strict: bool = Field(False, description="Refuse a LoRA with any key that matches no layer.")
    min_match: float = Field(0.5, ge=0, le=1, description="Least share of keys that must match a layer.")


class LoraRoleMatch(_Open):
    layers: int = Field(description="Layers of the file patched into this role's module.")
    keys: int = Field(description="Keys of the file those layers hold.")


class LoadLoraResult(_Open):
    name: str
    source: str = Field(description="The file read.")
    format: str = Field(
        description="kohya, peft, diffusers-old, loha, lokr or full; a file mixing them joins them with '+'."
    )
    strength: float
    role_strength: dict[LoraRole, float] = Field(description="Per-role overrides of `strength`.")
    targets: dict[LoraRole, str] = Field(description="Role to the loaded model patched, as requested.")
    roles: dict[LoraRole, LoraRoleMatch] = Field(description="What matched, per target role.")
    matched_keys: int
    unmatched_keys: int = Field(
        description="Keys that matched no layer, including keys that are no LoRA key."
    )
    unmatched: list[str] = Field(description="The first 50 of those keys.")
    skipped_roles: list[str] = Field(
        description="Roles the file has keys for but no target was given; `(no prefix)` for keys without one."
    )
    params_patched: int = Field(description="Weights this LoRA changes.")
    factor_bytes: int = Field(description="Bytes of its prepared factors, kept on the device.")
    backup_bytes: int = Field(
        description="Bytes of originals backed up for weights no LoRA had patched before."
    )
    backup_place: Literal["device", "cpu", "none"] = Field(
        description="Where those originals are kept: the device, pinned host memory, or none were needed."
    )
    unshared: list[str] = Field(
        default_factory=list,
        description="Targets whose module was shared (a part of several models) and left sharing to be "
        "patched: given their own copy when another name still held it.",
    )
    read_seconds: float
    prepare_seconds: float
    apply_seconds: float
    seconds: float


class SetLoraStrengthRequest(_Strict):
    name: str = Field(min_length=1)
    strength: float
    role_strength: dict[LoraRole, float] | None = Field(
        None, description="Replaces the per-role overrides; omitted keeps them."
    )


class SetLoraStrengthResult(_Open):
    name: str
    strength: float
    previous: float = Field(description="The strength before this call.")
    role_strength: dict[LoraRole, float] = Field(description="The per-role overrides now in force.")
    params_patched: int = Field(description="Weights re-derived from their originals.")
    seconds: float


class UnloadLoraRequest(_Strict):
    name: str = Field(min_length=1)


class UnloadLoraResult(_Open):
    name: str
    params_restored: int = Field(
        description="Weights only this LoRA patched: their originals copied back, bitwise."
    )
    params_rederived: int = Field(description="Weights other LoRAs still patch: re-derived without this one.")
    freed_bytes: int = Field(description="Backups and factors released.")
    seconds: float


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
