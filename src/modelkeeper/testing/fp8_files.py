"""fp8 forms of a state dict, as fp8 files hold them: plain fp8 weights, and ComfyUI's scaled fp8.

Weights (tensors of two or more dimensions) are stored in fp8; the rest (biases, norm scales) in
bfloat16, as published fp8 files keep them. ComfyUI's scaled form divides each ``*.weight`` by a
per-tensor scale (its largest magnitude over fp8's largest value) before the cast, and stores the
scale as ``<layer>.scale_weight`` beside a ``scaled_fp8`` marker tensor at the file's prefix.
"""

from __future__ import annotations

from collections.abc import Mapping

import torch

#: The packed forms a demo safetensors file can hold (``bfloat16``: none, the full-precision twin).
FP8_FORMS = ("bfloat16", "float8_e4m3fn", "float8_e5m2", "scaled_float8_e4m3fn")


def fp8_state(state: Mapping[str, torch.Tensor], dtype: torch.dtype) -> dict[str, torch.Tensor]:
    """Weights of two or more dimensions in ``dtype``, every other tensor in bfloat16."""
    return {k: v.to(dtype) if v.ndim >= 2 else v.to(torch.bfloat16) for k, v in state.items()}


def scaled_fp8_state(
    state: Mapping[str, torch.Tensor], *, prefix: str = "", dtype: torch.dtype = torch.float8_e4m3fn
) -> dict[str, torch.Tensor]:
    """ComfyUI's scaled fp8 form of ``state`` (see the module docstring); the marker goes at ``prefix``."""
    largest = torch.finfo(dtype).max
    out: dict[str, torch.Tensor] = {prefix + "scaled_fp8": torch.empty(0, dtype=dtype)}
    for key, value in state.items():
        if value.ndim >= 2 and key.endswith(".weight"):
            scale = (value.abs().max().float() / largest).clamp_min(torch.finfo(torch.float32).tiny)
            out[key] = (value.float() / scale).to(dtype)
            out[key.removesuffix(".weight") + ".scale_weight"] = scale.reshape(1)
        else:
            out[key] = value.to(torch.bfloat16)
    return out


def packed_state(
    state: Mapping[str, torch.Tensor], form: str, *, prefix: str = ""
) -> dict[str, torch.Tensor]:
    """``state`` in one of :data:`FP8_FORMS`."""
    if form == "bfloat16":
        return {k: v.to(torch.bfloat16) if v.is_floating_point() else v for k, v in state.items()}
    if form.startswith("scaled_"):
        return scaled_fp8_state(state, prefix=prefix, dtype=getattr(torch, form.removeprefix("scaled_")))
    if form in FP8_FORMS:
        return fp8_state(state, getattr(torch, form))
    raise ValueError(f"unknown fp8 form {form!r} (known: {', '.join(FP8_FORMS)})")


__all__ = ["FP8_FORMS", "fp8_state", "packed_state", "scaled_fp8_state"]
