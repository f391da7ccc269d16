"""Folder conventions users already have (ComfyUI, A1111, InvokeAI), as hints.

A hint never overrides what the header says. It is reported (``hints``), a contradiction is
reported (``hint_conflicts``), and it breaks a tie only where the header cannot decide: a
4-channel VAE under InvokeAI's ``sdxl/vae`` is taken as an SDXL VAE.
"""

from __future__ import annotations

from dataclasses import dataclass

from modelkeeper.discovery.records import Base, ModelType

T = ModelType


@dataclass(frozen=True)
class FolderHint:
    name: str  # "folder:<name>"
    folder: str  # compared case-insensitively with each folder between the root and the file
    types: frozenset[ModelType]
    conventions: tuple[str, ...]


def _h(folder: str, types: tuple[ModelType, ...], *conventions: str) -> FolderHint:
    return FolderHint(f"folder:{folder}", folder, frozenset(types), conventions)


_DENOISER = (T.UNET, T.TRANSFORMER)

FOLDER_HINTS: tuple[FolderHint, ...] = (
    _h("checkpoints", (T.MAIN,), "comfyui"),
    _h("stable-diffusion", (T.MAIN,), "a1111"),
    _h("main", (T.MAIN,), "invokeai"),
    _h("unet", _DENOISER, "comfyui"),
    _h("diffusion_models", _DENOISER, "comfyui"),
    _h("vae", (T.VAE,), "comfyui", "a1111", "invokeai"),
    _h("vae_approx", (T.VAE,), "comfyui"),
    _h("loras", (T.LORA,), "comfyui"),
    _h("lora", (T.LORA,), "a1111", "invokeai"),
    _h("lycoris", (T.LORA,), "a1111"),
    _h("controlnet", (T.CONTROLNET,), "comfyui", "a1111", "invokeai"),
    _h("clip", (T.TEXT_ENCODER,), "comfyui"),
    _h("text_encoders", (T.TEXT_ENCODER,), "comfyui"),
    _h("text_encoder", (T.TEXT_ENCODER,), "a1111"),
    _h("t5_encoder", (T.TEXT_ENCODER,), "invokeai"),
    _h("clip_embed", (T.TEXT_ENCODER,), "invokeai"),
    _h("embeddings", (T.TEXTUAL_INVERSION,), "comfyui", "a1111"),
    _h("embedding", (T.TEXTUAL_INVERSION,), "invokeai"),
)

#: InvokeAI base folders: folder -> base.
BASE_FOLDERS: dict[str, Base] = {
    "sd-1": Base.SD1,
    "sd-2": Base.SD2,
    "sdxl": Base.SDXL,
    "sdxl-refiner": Base.SDXL_REFINER,
    "sd-3": Base.SD3,
    "flux": Base.FLUX,
}

_BY_FOLDER: dict[str, FolderHint] = {h.folder: h for h in FOLDER_HINTS}


@dataclass(frozen=True)
class PathHints:
    type_hint: FolderHint | None
    base: Base | None
    base_folder: str | None


def hints_for(folders: tuple[str, ...]) -> PathHints:
    """Hints of the folders between a scan root and a file (the nearest folder wins)."""
    type_hint: FolderHint | None = None
    base: Base | None = None
    base_folder: str | None = None
    for folder in folders:
        low = folder.lower()
        hint = _BY_FOLDER.get(low)
        if hint is not None:
            type_hint = hint
        if low in BASE_FOLDERS:
            base, base_folder = BASE_FOLDERS[low], folder
    return PathHints(type_hint, base, base_folder)
