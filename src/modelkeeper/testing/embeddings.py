"""Textual-inversion embeddings for the tiny text encoders, in the three layouts found in the wild.

- ``a1111``: ``{"emb_params": [n, width]}`` (A1111 / kohya for SD1 and SD2);
- ``diffusers``: ``{"<token>": [n, width]}`` (diffusers' ``textual_inversion.py``);
- ``sdxl``: ``{"clip_l": [n, 768], "clip_g": [n, 1280]}``, one tensor per SDXL text encoder.
"""

from __future__ import annotations

from pathlib import Path
from typing import Literal

import torch

from modelkeeper.testing.components import DEFAULT_SEED, ENCODER_HIDDEN_SIZE, seed_for
from modelkeeper.testing.files import write_safetensors
from modelkeeper.testing.original_layout import StateDict

EmbeddingLayout = Literal["a1111", "diffusers", "sdxl"]
EmbeddingBase = Literal["sd1", "sd2", "sdxl"]

DEFAULT_TOKEN = "<tiny-embedding>"


def embedding_state_dict(
    layout: EmbeddingLayout = "a1111",
    *,
    base: EmbeddingBase = "sd1",
    vectors: int = 2,
    token: str = DEFAULT_TOKEN,
    seed: int = DEFAULT_SEED,
) -> StateDict:
    """The tensors of a textual-inversion embedding of ``vectors`` tokens (float32, as trainers save them)."""
    gen = torch.Generator().manual_seed(seed_for(f"embedding:{layout}:{base}", seed))

    def vectors_of(width: int) -> torch.Tensor:
        return torch.randn((vectors, width), generator=gen) * 0.02

    if layout == "sdxl" or base == "sdxl":
        if layout != "sdxl" or base != "sdxl":
            raise ValueError("SDXL embeddings use the sdxl layout, and the sdxl layout is for SDXL only")
        return {
            "clip_l": vectors_of(ENCODER_HIDDEN_SIZE["clip_l"]),
            "clip_g": vectors_of(ENCODER_HIDDEN_SIZE["clip_g"]),
        }
    width = ENCODER_HIDDEN_SIZE["clip_h" if base == "sd2" else "clip_l"]
    if layout == "a1111":
        return {"emb_params": vectors_of(width)}
    return {token: vectors_of(width)}


def save_embedding(
    path: Path,
    layout: EmbeddingLayout = "a1111",
    *,
    base: EmbeddingBase = "sd1",
    vectors: int = 2,
    token: str = DEFAULT_TOKEN,
    seed: int = DEFAULT_SEED,
) -> Path:
    """Write a textual-inversion embedding as ``.safetensors`` (no metadata, as trainers write them)."""
    state_dict = embedding_state_dict(layout, base=base, vectors=vectors, token=token, seed=seed)
    return write_safetensors(state_dict, path)


__all__ = ["DEFAULT_TOKEN", "EmbeddingBase", "EmbeddingLayout", "embedding_state_dict", "save_embedding"]
