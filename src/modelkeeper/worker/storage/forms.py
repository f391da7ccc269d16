"""Packed tensors: the stored forms of weights (fp8, scaled fp8, GGUF blocks) and how each one
becomes its compute form (:class:`Packed`). ComfyUI's scaled fp8 files carry a scale per layer;
:func:`split_scales` attaches it to its weight (:class:`ScaledFloat8`) so that it follows the
weight through a key conversion.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import Any

import torch

from modelkeeper.worker.storage import dequant

FLOAT8 = (torch.float8_e4m3fn, torch.float8_e5m2)
PLAIN_FLOATS = (torch.float32, torch.float16, torch.bfloat16, torch.float64)

#: Marker keys of ComfyUI's scaled fp8 files, and the per-layer scales they carry.
SCALED_MARKER = "scaled_fp8"
SCALE_SUFFIXES = (".scale_weight", ".scale_input")


@dataclass(frozen=True)
class Packed:
    """How one stored tensor becomes its compute form: ``form`` is ``float8_e4m3fn``,
    ``scaled_float8_e4m3fn`` or ``gguf:Q8_0`` (and so on); ``shape`` is the logical shape."""

    form: str
    shape: tuple[int, ...]
    scale: torch.Tensor | None = None
    quant: Any = None  # gguf.GGMLQuantizationType for GGUF tensors

    def decode(self, stored: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
        if self.quant is not None:
            return dequant.decode(stored, self.quant, self.shape, dtype)
        out = stored.to(dtype)
        if self.scale is not None:
            out = out * self.scale.to(dtype)
        return out


class ScaledFloat8(torch.Tensor):
    """An fp8 tensor that carries its ComfyUI ``scale_weight`` through key conversions (chunks,
    splits, renames), so the scale still belongs to each piece after conversion. Unwrapped before
    the module adopts it: no subclass is left in a loaded model."""

    scale: torch.Tensor

    @staticmethod
    def wrap(tensor: torch.Tensor, scale: torch.Tensor) -> ScaledFloat8:
        out = tensor.as_subclass(ScaledFloat8)
        out.scale = scale
        return out

    @classmethod
    def __torch_function__(
        cls, func: Callable[..., Any], types: Iterable[type], args: tuple[Any, ...] = (), kwargs: Any = None
    ) -> Any:
        scale = _scale_in(args)
        with torch._C.DisableTorchFunctionSubclass():
            result = func(*args, **(kwargs or {}))
        return _rewrap(result, scale)


def _scale_in(args: Iterable[Any]) -> torch.Tensor | None:
    for arg in args:
        if isinstance(arg, ScaledFloat8):
            return arg.scale
        if isinstance(arg, list | tuple):
            found = _scale_in(arg)
            if found is not None:
                return found
    return None


def _rewrap(result: Any, scale: torch.Tensor | None) -> Any:
    if scale is None:
        return result
    if isinstance(result, torch.Tensor) and result.dtype in FLOAT8:
        return ScaledFloat8.wrap(result, scale)
    if type(result) in (list, tuple):
        return type(result)(_rewrap(r, scale) for r in result)
    return result


def split_scales(state: dict[str, torch.Tensor]) -> tuple[dict[str, torch.Tensor], bool]:
    """``state`` without ComfyUI's scale tensors, each scaled fp8 weight wrapped with its scale;
    True when the file was a scaled fp8 file (it carries the ``scaled_fp8`` marker or scales)."""
    scales = {
        k: v for k, v in state.items() if k.endswith(SCALE_SUFFIXES) or k.rpartition(".")[2] == SCALED_MARKER
    }
    if not scales:
        return state, False
    out: dict[str, torch.Tensor] = {}
    for key, tensor in state.items():
        if key in scales:
            continue
        scale = scales.get(key.removesuffix(".weight") + ".scale_weight") if key.endswith(".weight") else None
        scaled = scale is not None and tensor.dtype in FLOAT8
        out[key] = ScaledFloat8.wrap(tensor, scale.float().reshape(())) if scaled else tensor  # type: ignore[union-attr]
    return out, True


def is_scale_key(key: str) -> bool:
    return key.endswith(SCALE_SUFFIXES) or key.rpartition(".")[2] == SCALED_MARKER
