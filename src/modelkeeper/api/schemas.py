"""Request bodies of the API. Field names follow the seed's controller (``model_id``,
``device_id``, ``wait_for_completion``, ``timeout_seconds``, ``force``, ``priority``)."""

from __future__ import annotations

from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field

from modelkeeper.orchestrator.workers import Priority

PriorityName = Literal["low", "normal", "high", "critical"]

# Descriptions several bodies share (the OpenAPI spec shows them on every field; tests/api/test_openapi.py
# checks that every request-body field has one).
MODEL_REF = "The model: its handle (as ls shows it), id, name, path under a model root, or hash prefix."
WAIT = "False: answer 202 with a job at once."
TIMEOUT = "Time limit in seconds, queue included (default: the request_timeout setting)."
ON_DEVICE = "This device only (default: every device holding the model, or every loaded model's)."
COMPONENT = (
    "One loaded component by its label, as the placement's components name it (unet, vae...); default: all."
)


class _Body(BaseModel):
    # strict: a JSON ``true`` is no number and ``"1"`` no integer, as the schema says (an integer
    # still passes for a float); lax validation accepted them (found by the fuzz test)
    model_config = ConfigDict(extra="forbid", strict=True)


class _Operation(_Body):
    wait_for_completion: bool = Field(True, description=WAIT)
    timeout_seconds: float | None = Field(None, gt=0, le=86400, description=TIMEOUT)
    priority: PriorityName = Field(
        "normal",
        description="Queue order on the device: low < normal < high < critical; queued operations of "
        "higher priority start first, then by arrival; a running one is not interrupted.",
    )

    @property
    def priority_value(self) -> int:
        return int(Priority[self.priority.upper()])


class LoadBody(_Operation):
    model_id: str | None = Field(
        None,
        min_length=1,
        max_length=4096,
        description=f"{MODEL_REF} Required, except where the path names the model (not used there).",
    )
    device_id: str | None = Field(
        None,
        max_length=64,
        description="Device. Omitted: placement chooses one (POST /api/model/{model_id}/load, /vram/load), "
        "except POST /api/model/load, which then loads on every device. Not used where the path names "
        "the device.",
    )
    force: bool = Field(False, description="Evict leased or kept models to make room (and with reload, "
                        "unload a leased model).")  # fmt: skip
    reload: bool = Field(
        False,
        description="Loaded already in another dtype, storage_dtype or offload: unload it and load it again "
        "with the options asked; an option left out keeps the placement's value (back to the file's dtype "
        "or no storage_dtype: unload, then load). Its LoRAs are dropped: the result lists them in "
        "dropped_loras. Without it such a load is refused with 409 ALREADY_LOADED (details.loras: the "
        "LoRAs a reload would drop); options left out ask for nothing, so a plain load returns the model "
        "as it is loaded.",
    )
    keep_loaded: bool = Field(
        False, description="Reload after a worker restart; never evicted without force."
    )
    keep_alive: float | None = Field(
        None,
        ge=-1,
        description="Seconds the model stays after its last use (0: unloaded as soon as no lease or "
        "operation holds it; -1: never). Default: the service's keep_alive setting.",
    )
    dtype: Literal["float32", "float16", "bfloat16"] | None = Field(
        None, description="Compute dtype (the weights are cast on load); default: the file's."
    )
    offload: Literal["none", "auto"] | Annotated[int, Field(strict=True, ge=0)] | None = Field(
        None,
        description="Partial residency: 'none' (all on the device, else 507), 'auto' (what fits stays, the "
        "rest streams from RAM as the model runs) or a byte count to keep resident. Default: none.",
    )
    storage_dtype: Literal["float8_e4m3fn", "float8_e5m2"] | None = Field(
        None,
        description="Keep the weights in this dtype on the device and upcast them layer by layer as the "
        "model runs (about half the bytes of fp16/bf16). fp8 and GGUF files stay packed without it.",
    )


class UnloadBody(_Body):
    model_id: str | None = Field(
        None,
        min_length=1,
        max_length=4096,
        description=f"{MODEL_REF} Required by POST /api/model/unload; not used where the path names the model.",
    )
    device_id: str | None = Field(
        None, max_length=64, description="This device only (default: every device holding the model)."
    )
    force: bool = Field(
        False, description="Unload even when leased (its leases end) or loading (after the load)."
    )
    timeout_seconds: float | None = Field(None, gt=0, le=86400, description=TIMEOUT)


class ValidateBody(_Operation):
    device_id: str | None = Field(None, max_length=64, description=ON_DEVICE)
    component: str | None = Field(None, max_length=64, description=COMPONENT)
    level: Literal["header", "weights", "functional"] = Field(
        "header",
        description="header: keys, shapes and dtypes; weights: every tensor read (NaN or Inf fail); "
        "functional: a forward pass with tiny inputs. Each level includes the ones before.",
    )
    batch: int = Field(1, ge=1, le=64, description="Batch size of the functional level's inputs.")

    def worker_data(self) -> dict[str, Any]:
        return {"level": self.level, "batch": self.batch}


class BenchmarkBody(_Operation):
    device_id: str | None = Field(None, max_length=64, description=ON_DEVICE)
    component: str | None = Field(None, max_length=64, description=COMPONENT)
    resolution: int | None = Field(
        None,
        ge=8,
        le=4096,
        multiple_of=8,
        description="Pixels per side, a multiple of 8 up to 4096 (default: the size its config was made for, "
        "else 512); text encoders take none.",
    )
    batch: int = Field(1, ge=1, le=64, description="Inputs per pass.")
    steps: int = Field(
        10, ge=1, le=10000, description="Passes timed (the answer gives their median and p90)."
    )
    warmup: int = Field(2, ge=0, le=1000, description="Passes run first, not timed.")
    tokens: int | None = Field(
        None, ge=1, le=4096, description="Text tokens per input (default: 77, 256 for T5)."
    )

    def worker_data(self) -> dict[str, Any]:
        return self.model_dump(
            include={"resolution", "batch", "steps", "warmup", "tokens"}, exclude_none=True
        )


class OptimizeBody(_Operation):
    device_id: str | None = Field(None, max_length=64, description=ON_DEVICE)
    component: str | None = Field(None, max_length=64, description=COMPONENT)
    options: dict[str, Any] = Field(
        default_factory=dict,
        description="dtype (float32|float16|bfloat16), channels_last, attention (sdpa|default), "
        "vae_slicing, vae_tiling, compile (true or torch.compile options); each recorded for revert. "
        "An unknown option or value: 422 before any job.",
    )
    measure: bool = Field(
        True, description="Time a forward pass before and after (latency_before_s, latency_after_s, speedup)."
    )
    revert: bool = Field(
        False, description="Undo what earlier optimize calls applied, newest first (options are not used)."
    )

    def worker_data(self) -> dict[str, Any]:
        return {"options": self.options, "measure": self.measure, "revert": self.revert}


class SearchBody(_Body):
    type: str | None = Field(
        None,
        max_length=64,
        description="main, unet, transformer, vae, text_encoder, lora, controlnet or textual_inversion "
        "(aliases such as checkpoint or clip, and plurals, accepted; another word: 422 naming these).",
    )
    base: str | None = Field(
        None,
        max_length=64,
        description="sd1, sd2, sdxl, sdxl_refiner, sd3, flux...: the models stored under it and those that fit it.",
    )
    format: str | None = Field(None, max_length=64, description="safetensors, pickle, gguf or diffusers.")
    tag: str | None = Field(None, max_length=200, description="Models with this tag.")
    query: str | None = Field(
        None,
        max_length=1000,
        description="Words, each found in the name, description, tags or file paths (any case).",
    )
    status: Literal["ok", "missing", "all"] = Field(
        "ok", description="ok: a file is present; missing: every file is gone; all: both."
    )
    sort: Literal["name", "type", "base", "size", "created", "updated"] = Field(
        "name", description="Sort key (then the id)."
    )
    descending: bool = Field(False, description="Sort in descending order.")
    limit: int = Field(50, ge=1, le=1000, description="Models per page.")
    offset: int = Field(0, ge=0, le=1_000_000_000, description="Models skipped before the page.")

    def filters(self) -> dict[str, Any]:
        out = self.model_dump()
        out["status"] = None if self.status == "all" else self.status
        return out


class CacheBody(_Body):
    model_id: str | None = Field(None, min_length=1, max_length=4096, description="Cache every component.")
    component_id: str | None = Field(None, min_length=1, max_length=200, description="Cache one component.")
    node: str | None = Field(
        None,
        min_length=1,
        max_length=200,
        description="Cluster mode: the node whose RAM cache (default: every node with the file).",
    )
    wait_for_completion: bool = Field(True, description=WAIT)


class LeaseBody(_Body):
    model_id: str = Field(min_length=1, max_length=4096, description=MODEL_REF)
    device_id: str | None = Field(None, max_length=64, description="Hold on this device only (default: all).")
    holder: str = Field(
        "client", min_length=1, max_length=200, description="Who holds it: a name shown with the lease."
    )
    ttl_seconds: float | None = Field(
        None,
        gt=0,
        le=7 * 86400,
        description="Lifetime in seconds (default: the lease_ttl setting); renew it to hold longer.",
    )


class RenewBody(_Body):
    ttl_seconds: float | None = Field(
        None,
        gt=0,
        le=7 * 86400,
        description="Lifetime in seconds from now, kept for later renewals (default: the lease's own).",
    )


class LoraBody(_Operation):
    wait_for_completion: bool = Field(
        True, description="Not used: a LoRA is applied before the answer (no job)."
    )
    lora_id: str = Field(
        min_length=1,
        max_length=4096,
        description="The LoRA: its handle, id, name, path under a model root, or hash prefix.",
    )
    device_id: str | None = Field(
        None, max_length=64, description="One device (default: every one holding the model)."
    )
    strength: float = Field(
        1.0, ge=-10, le=10, description="Scale of the LoRA's change to the weights (1: as trained)."
    )


class StrengthBody(_Body):
    strength: float = Field(ge=-10, le=10, description="The new scale (1: as trained), set in place.")
    device_id: str | None = Field(
        None, max_length=64, description="This device only (default: every one where it is applied)."
    )


class InstallBody(_Body):
    source: str = Field(
        min_length=1,
        max_length=4096,
        description="A Hub repo (org/name[@revision][:file or folder]), an https URL, or a CivitAI "
        "model-version (civitai:ID or a model page URL).",
    )
    model_type: str | None = Field(
        None, max_length=64, description="Folder by type; default: from the source."
    )
    name: str | None = Field(None, max_length=255, description="File or folder name in the model root.")
    sha256: str | None = Field(
        None, pattern="^[0-9a-fA-F]{64}$", description="Expected SHA-256 (a URL declares none)."
    )
    wait_for_completion: bool = Field(True, description=WAIT)


class MemoryOptimizeBody(_Body):
    device_id: str = Field(max_length=64, description="The device whose memory to free (cuda:0, cpu).")
    target_free_mb: float | None = Field(
        None,
        ge=0,
        description="Unload least-recently-used idle models until this much of the budget is free.",
    )
    timeout_seconds: float | None = Field(
        None, gt=0, le=86400, description="Time limit of the worker's call in seconds (default: 120)."
    )
