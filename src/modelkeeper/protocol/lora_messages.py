"""Messages of the LoRA commands: apply a LoRA to loaded models (``model.load_lora``), change its
strength, take it off; and the one table of the roles a LoRA may target (``LORA_ROLES``).
``messages.py`` maps each command to its pair (``COMMAND_MODELS``).
"""

from __future__ import annotations

from enum import StrEnum
from typing import Literal

from pydantic import Field

from modelkeeper.protocol.message_base import _Open, _Strict


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
