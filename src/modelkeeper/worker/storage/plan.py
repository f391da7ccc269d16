"""The storage plan of a load: which tensors of a file stay packed (fp8, scaled fp8, GGUF, or a
storage cast to fp8), which are decoded now, and in which compute dtype (:func:`plan_storage`);
where a packed layer's decode hooks go (:func:`hook_site`); and the bytes a load will hold, before
it reads (:func:`estimate_bytes`).
"""

from __future__ import annotations

import math
import re
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any

import torch

from modelkeeper.worker.storage.forms import FLOAT8, PLAIN_FLOATS, Packed, ScaledFloat8

#: Layers a storage cast skips (by module name, as diffusers' patterns): embeddings of positions and
#: patches, the first and last projections, and the final modulation. diffusers' default also skips
#: every module named ``norm*``, which keeps the AdaLN modulation linears of Flux and SD3 (a quarter
#: of Flux's weights) in bf16; fp8 files keep those in fp8, and so does this worker.
SKIP_PATTERNS = ("pos_embed", "patch_embed", "^proj_in$", "^proj_out$", "norm_out", "conv_in", "conv_out")


def hookable_classes() -> tuple[type[torch.nn.Module], ...]:
    from diffusers.hooks._common import _GO_LC_SUPPORTED_PYTORCH_LAYERS

    return tuple(_GO_LC_SUPPORTED_PYTORCH_LAYERS)


@dataclass
class StoragePlan:
    """What a load keeps packed: per owning module, the packed parameters; the compute dtype."""

    compute: torch.dtype
    packed: dict[str, dict[str, Packed]] = field(default_factory=dict)  # module name -> attr -> Packed

    @property
    def form(self) -> str | None:
        """The dominant packed form, by elements (None when nothing is packed)."""
        counts: dict[str, int] = {}
        for attrs in self.packed.values():
            for p in attrs.values():
                counts[p.form] = counts.get(p.form, 0) + math.prod(p.shape)
        return max(counts, key=lambda f: counts[f]) if counts else None

    def logical_shapes(self) -> dict[str, tuple[int, ...]]:
        return {
            f"{owner}.{attr}" if owner else attr: p.shape
            for owner, attrs in self.packed.items()
            for attr, p in attrs.items()
        }


def _gguf_type(tensor: torch.Tensor) -> Any:
    return getattr(tensor, "quant_type", None)


def _logical_shape(tensor: torch.Tensor) -> tuple[int, ...]:
    shape = getattr(tensor, "quant_shape", None)
    return tuple(shape) if shape is not None else tuple(tensor.shape)


def needs_plan(state: Mapping[str, torch.Tensor], storage: torch.dtype | None) -> bool:
    """Whether a load needs packing at all: fp8 or GGUF tensors in the file, or a storage cast."""
    if storage is not None and storage in FLOAT8:
        return True
    return any(t.dtype in FLOAT8 or _gguf_type(t) is not None for t in state.values())


def compute_dtype_for(state: Mapping[str, torch.Tensor], requested: torch.dtype | None) -> torch.dtype:
    """The requested compute dtype; else bfloat16 for a GGUF file (its plain tensors are a mix of F32
    and F16 fallbacks); else the dominant plain float dtype of the unpacked tensors (an fp8 file keeps
    its norms and biases in it); else bfloat16."""
    if requested is not None:
        return requested
    counts: dict[torch.dtype, int] = {}
    for t in state.values():
        if _gguf_type(t) is not None:
            return torch.bfloat16
        if t.dtype in PLAIN_FLOATS:
            counts[t.dtype] = counts.get(t.dtype, 0) + t.numel()
    return max(counts, key=lambda d: counts[d]) if counts else torch.bfloat16


def packable_owners(module: torch.nn.Module) -> dict[str, torch.nn.Module]:
    """The layers that can keep a packed form, by name. Inside a module the class keeps in full
    precision (``_keep_in_fp32_modules``) that has children of its own, the layers are decoded at
    load, never packed: code above them may read their weights' dtype (diffusers' time embedders);
    a kept module that is itself a layer (T5's ``wo``) packs, decoded by hooks on its parent
    (:func:`hook_site`)."""
    hookable = hookable_classes()
    keep = set(getattr(module, "_keep_in_fp32_modules", None) or ())
    return {
        name: m
        for name, m in module.named_modules()
        if isinstance(m, hookable) and not keep.intersection(name.split(".")[:-1])
    }


def hook_site(module: torch.nn.Module, name: str) -> str:
    """Where the decode hooks of the packed layer ``name`` go: the layer itself, or its parent for a
    layer the class keeps in full precision (``_keep_in_fp32_modules``), whose dtype the parent's
    forward reads before calling it. T5's feed-forward casts its hidden states to ``wo.weight.dtype``:
    decoded from the parent's pre-hook, that is the compute dtype, not fp8 or GGUF bytes. A parent
    without a forward of its own (a ModuleList) leaves the hooks on the layer."""
    keep = set(getattr(module, "_keep_in_fp32_modules", None) or ())
    parent, _, leaf = name.rpartition(".")
    if leaf not in keep:
        return name
    if isinstance(module.get_submodule(parent), torch.nn.ModuleList | torch.nn.ModuleDict):
        return name
    return parent


def skipped(name: str, patterns: Iterable[str]) -> bool:
    """Whether the module ``name`` matches one of the skip ``patterns`` (a storage cast leaves it)."""
    return any(re.search(p, name) for p in patterns)


def plan_storage(
    module: torch.nn.Module,
    state: dict[str, torch.Tensor],
    *,
    compute: torch.dtype | None,
    storage: torch.dtype | None,
    skip: Iterable[str] = SKIP_PATTERNS,
) -> tuple[dict[str, torch.Tensor], StoragePlan]:
    """Decide the stored form of every tensor of ``state`` (keys of ``module``'s state dict).

    Packed tensors of the file (fp8, scaled fp8, GGUF) stay packed where their layer can decode them
    as it runs (see :func:`packable_owners`), else they are decoded now. With ``storage`` (an fp8
    dtype) the plain weights of the
    layers a storage cast does not skip are cast down. Every other floating tensor is put in the
    compute dtype. Tensors kept as they are stay views of the file's buffer unless most of that
    buffer was replaced anyway (then they are copied, so the buffer is freed).
    """
    dtype = compute_dtype_for(state, compute)
    owners = packable_owners(module)
    skip = tuple(skip)
    plan = StoragePlan(dtype)
    out: dict[str, torch.Tensor] = {}
    kept: list[str] = []
    replaced = kept_bytes = 0
    for key, tensor in state.items():
        owner, _, attr = key.rpartition(".")
        packable = owner in owners and attr in owners[owner]._parameters
        quant = _gguf_type(tensor)
        scale = tensor.scale if isinstance(tensor, ScaledFloat8) else None
        plain = tensor.as_subclass(torch.Tensor) if (quant is not None or scale is not None) else tensor
        if quant is not None or tensor.dtype in FLOAT8:
            packed = _packed_form(plain, quant, scale, _logical_shape(tensor))
            if packable:
                plan.packed.setdefault(owner, {})[attr] = packed
                out[key] = plain
                kept_bytes += plain.numel() * plain.element_size()
                continue
            out[key] = packed.decode(plain, dtype)
            replaced += plain.numel() * plain.element_size()
        elif tensor.is_floating_point() and storage in FLOAT8 and packable and not skipped(owner, skip):
            assert storage is not None
            plan.packed.setdefault(owner, {})[attr] = Packed(
                str(storage).removeprefix("torch."), tuple(tensor.shape)
            )
            out[key] = tensor.to(storage)
            replaced += tensor.numel() * tensor.element_size()
        elif tensor.is_floating_point() and tensor.dtype != dtype:
            out[key] = tensor.to(dtype)
            replaced += tensor.numel() * tensor.element_size()
        else:
            out[key] = tensor
            kept.append(key)
            kept_bytes += tensor.numel() * tensor.element_size()
    if replaced > kept_bytes:
        for key in kept:
            out[key] = out[key].clone()  # the file's buffer is mostly dead: do not keep it for these
    return out, plan


def _packed_form(
    plain: torch.Tensor, quant: Any, scale: torch.Tensor | None, shape: tuple[int, ...]
) -> Packed:
    if quant is not None:
        return Packed(f"gguf:{quant.name}", shape, quant=quant)
    name = str(plain.dtype).removeprefix("torch.")
    return Packed(f"scaled_{name}" if scale is not None else name, shape, scale=scale)


def estimate_bytes(shapes: Iterable[tuple[tuple[int, ...], int, bool]], storage: torch.dtype | None,
                   compute: torch.dtype | None) -> int:  # fmt: skip
    """Bytes a load will hold, before it reads: (shape, stored bytes, plain float) per tensor.
    With an fp8 ``storage``, floating weights of two or more dimensions count one byte each."""
    total = 0
    for shape, nbytes, is_float in shapes:
        if is_float and storage in FLOAT8 and len(shape) >= 2:
            total += math.prod(shape)
        elif is_float and compute is not None:
            total += math.prod(shape) * compute.itemsize
        else:
            total += nbytes
    return total
