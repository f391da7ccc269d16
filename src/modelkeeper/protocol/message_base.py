"""The bases of the protocol's messages and the parts several of them share.

Requests refuse unknown fields (``_Strict``: a typo is an error, not a silent default); results
accept them (``_Open``: they may grow fields). The kinds, layouts and dtypes a load names, the
device and memory figures and what a loaded model holds on its device (``_Held``) are used by the
load messages (``load_messages.py``) and the others (``messages.py``) alike.
"""

from __future__ import annotations

from enum import StrEnum

from pydantic import BaseModel, ConfigDict, Field


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid")


class _Open(BaseModel):
    """Results may grow fields; readers ignore what they do not know."""

    model_config = ConfigDict(extra="allow")


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


class _Held(_Open):
    """What a loaded model holds on its device and what it is: shared by a load's result and the
    model's info (the fields after these are each one's own)."""

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
    name: str
    type: str
    class_name: str
    device: str
    dtype: str | None
    bytes: int
    parameters: int
    tensors: int
    load_seconds: float
