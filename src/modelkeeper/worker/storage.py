"""Weights kept on the device in a packed form and decoded layer by layer as the model runs.

Three packed forms, one mechanism:

- ``float8`` (e4m3fn, e5m2): the tensors of an fp8 file as they are, or weights cast down on
  request (``storage_dtype``); decoded by an upcast to the compute dtype.
- ``scaled float8`` (ComfyUI's ``scaled_fp8`` files): fp8 weights with a per-layer
  ``scale_weight``; decoded by an upcast and a multiplication.
- ``gguf`` (Q8_0, Q6_K, Q4_K, Q4_0, ...): the file's blocks as bytes; decoded by diffusers' GGUF
  dequantisation functions.

Only the layers diffusers' layerwise casting would hook (Linear, Conv, Embedding:
``_GO_LC_SUPPORTED_PYTORCH_LAYERS``) keep a packed form; every other tensor (norm weights, embeddings
kept as parameters, buffers) is decoded once at load. A packed layer gets a forward pre-hook that puts
the decoded tensor in place of the stored one and a forward hook that puts the stored one back; for a
layer whose parent reads its weight's dtype (T5's ``wo``) the hooks sit on the parent (:func:`hook_site`).

Why not diffusers' ``LayerwiseCastingHook`` itself: it casts the module with ``module.to(dtype)``
before and after each forward, which gives every parameter new storage. The worker's tensors are
views of one allocation per file; after the first step the casts would hold new fp8 copies while
the skipped layers kept the whole file buffer alive (twice the bytes), and each step would pay a
cast back down. Swapping the tensor keeps the stored view untouched and costs one upcast per layer.

A packed weight can carry an *adjustment* (:func:`set_adjust`): a function the pre-hook applies to
the freshly decoded tensor, in the compute dtype, before the layer runs. LoRAs use it
(:mod:`modelkeeper.worker.lora`): the stored bytes are never written, so taking a LoRA off is exact
by construction and a strength change is a scalar read at the next forward.
"""

from __future__ import annotations

import dataclasses
import math
import re
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any

import torch

FLOAT8 = (torch.float8_e4m3fn, torch.float8_e5m2)
PLAIN_FLOATS = (torch.float32, torch.float16, torch.bfloat16, torch.float64)

#: Layers a storage cast skips (by module name, as diffusers' patterns): embeddings of positions and
#: patches, the first and last projections, and the final modulation. diffusers' default also skips
#: every module named ``norm*``, which keeps the AdaLN modulation linears of Flux and SD3 (a quarter
#: of Flux's weights) in bf16; fp8 files keep those in fp8, and so does this worker.
SKIP_PATTERNS = ("pos_embed", "patch_embed", "^proj_in$", "^proj_out$", "norm_out", "conv_in", "conv_out")

#: Marker keys of ComfyUI's scaled fp8 files, and the per-layer scales they carry.
SCALED_MARKER = "scaled_fp8"
SCALE_SUFFIXES = (".scale_weight", ".scale_input")


def hookable_classes() -> tuple[type[torch.nn.Module], ...]:
    from diffusers.hooks._common import _GO_LC_SUPPORTED_PYTORCH_LAYERS

    return tuple(_GO_LC_SUPPORTED_PYTORCH_LAYERS)


# ----------------------------------------------------------------------------- packed tensors


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
            return dequantize(stored, self.quant, self.shape).to(dtype)
        out = stored.to(dtype)
        if self.scale is not None:
            out = out * self.scale.to(dtype)
        return out


def dequantize(stored: torch.Tensor, quant: Any, shape: tuple[int, ...]) -> torch.Tensor:
    """The GGUF blocks of ``stored`` (uint8) as a float tensor of ``shape``, by diffusers' functions."""
    from diffusers.quantizers.gguf.utils import GGML_QUANT_SIZES, dequantize_functions

    _block, type_size = GGML_QUANT_SIZES[quant]
    blocks = stored.reshape(-1, type_size)
    decode: Callable[..., torch.Tensor] = dequantize_functions[quant]
    return decode(blocks, _block, type_size).reshape(shape)


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


# ----------------------------------------------------------------------------- casting while reading


class _Origin(torch.Tensor):
    """A meta tensor tagged with the file key it comes from; the tag follows it through a key
    conversion (renames, chunks, concatenations), so each converted key knows its source."""

    origin: str

    @staticmethod
    def tag(tensor: torch.Tensor, origin: str) -> _Origin:
        out = tensor.as_subclass(_Origin)
        out.origin = origin
        return out

    @classmethod
    def __torch_function__(
        cls, func: Callable[..., Any], types: Iterable[type], args: tuple[Any, ...] = (), kwargs: Any = None
    ) -> Any:
        origin = _origin_in(args)
        with torch._C.DisableTorchFunctionSubclass():
            result = func(*args, **(kwargs or {}))
        return _retag(result, origin)


def _origin_in(args: Iterable[Any]) -> str | None:
    for arg in args:
        if isinstance(arg, _Origin):
            return arg.origin
        if isinstance(arg, list | tuple):
            found = _origin_in(arg)
            if found is not None:
                return found
    return None


def _retag(result: Any, origin: str | None) -> Any:
    if origin is None:
        return result
    if isinstance(result, torch.Tensor):
        return _Origin.tag(result, origin)
    if type(result) in (list, tuple):
        return type(result)(_retag(r, origin) for r in result)
    return result


def cast_sources(
    module: torch.nn.Module,
    tensors: Mapping[str, tuple[tuple[int, ...], torch.dtype]],
    convert: Callable[[dict[str, torch.Tensor]], dict[str, torch.Tensor]],
    *,
    skip: Iterable[str] = SKIP_PATTERNS,
) -> set[str]:
    """The file keys a storage cast packs: those whose tensors all become weights of layers that keep
    a packed form (see :func:`plan_storage`). Found by converting meta tensors tagged with their
    keys, so a load can cast each tensor as soon as it is read, before the key conversion."""
    meta = {
        k: _Origin.tag(torch.empty(shape, dtype=dtype, device="meta"), k)
        for k, (shape, dtype) in tensors.items()
    }
    converted = convert(dict(meta))
    owners = _packable_owners(module)
    skip = tuple(skip)
    castable: set[str] = set()
    kept: set[str] = set()
    for key, tensor in converted.items():
        origin = getattr(tensor, "origin", None)
        if origin is None:
            continue
        owner, _, attr = key.rpartition(".")
        packs = owner in owners and attr in owners[owner]._parameters and not _skipped(owner, skip)
        (castable if packs and tensor.is_floating_point() else kept).add(origin)
    return castable - kept


def cast_while_reading(
    keys: set[str], storage: torch.dtype
) -> Callable[[dict[str, torch.Tensor]], dict[str, torch.Tensor]]:
    """A read transform: the tensors of ``keys`` cast to ``storage``, every other one copied out of
    the group's buffer, so each group's buffer is freed before the next group is read."""

    def transform(tensors: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        return {
            k: t.to(storage) if k in keys and t.is_floating_point() else t.clone() for k, t in tensors.items()
        }

    return transform


# ----------------------------------------------------------------------------- the plan


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


def _packable_owners(module: torch.nn.Module) -> dict[str, torch.nn.Module]:
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


def _skipped(name: str, patterns: Iterable[str]) -> bool:
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
    as it runs (see :func:`_packable_owners`), else they are decoded now. With ``storage`` (an fp8
    dtype) the plain weights of the
    layers a storage cast does not skip are cast down. Every other floating tensor is put in the
    compute dtype. Tensors kept as they are stay views of the file's buffer unless most of that
    buffer was replaced anyway (then they are copied, so the buffer is freed).
    """
    dtype = compute_dtype_for(state, compute)
    owners = _packable_owners(module)
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
        elif tensor.is_floating_point() and storage in FLOAT8 and packable and not _skipped(owner, skip):
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


# ----------------------------------------------------------------------------- hooks


@dataclass
class _Attached:
    plan: StoragePlan
    handles: list[Any]


def attach(module: torch.nn.Module, plan: StoragePlan) -> None:
    """Give every packed layer of ``module`` its decode hooks (see the module docstring). A layer
    that shares a packed tensor (a tied weight: T5's ``embed_tokens`` is its ``shared``) gets them too."""
    modules = dict(module.named_modules())
    by_tensor = {
        id(modules[owner]._parameters[attr]): packed
        for owner, attrs in plan.packed.items()
        for attr, packed in attrs.items()
    }
    for name, layer in modules.items():
        for attr, param in layer._parameters.items():
            if param is not None and id(param) in by_tensor and attr not in plan.packed.get(name, {}):
                plan.packed.setdefault(name, {})[attr] = by_tensor[id(param)]
    handles: list[Any] = []
    for owner, attrs in plan.packed.items():
        layer, site = modules[owner], modules[hook_site(module, owner)]
        handles.append(site.register_forward_pre_hook(_decoder(layer, attrs, plan.compute)))
        handles.append(site.register_forward_hook(_restorer(layer, attrs), always_call=True))
    module._modelkeeper_storage = _Attached(plan, handles)  # type: ignore[assignment]


def _decoder(layer: torch.nn.Module, attrs: dict[str, Packed], dtype: torch.dtype) -> Callable[..., None]:
    """The pre-hook that decodes ``layer``'s packed ``attrs``; registered on ``layer`` or on its
    parent (:func:`hook_site`), so it reads the layer it was made for, not the module it runs on."""

    def pre(_site: torch.nn.Module, _args: Any) -> None:
        stored = layer.__dict__.setdefault("_modelkeeper_stored", {})
        adjusts: dict[str, Adjust] = layer.__dict__.get(_ADJUST, {})
        for attr, packed in attrs.items():
            tensor = layer._parameters[attr]
            assert tensor is not None
            stored[attr] = tensor
            decoded = packed.decode(tensor, dtype)
            adjust = adjusts.get(attr)
            if adjust is not None:
                if (
                    decoded.data_ptr() == tensor.data_ptr()
                ):  # a decode that changed nothing: never the stored bytes
                    decoded = decoded.clone()
                with torch.no_grad():
                    decoded = adjust(decoded)
            layer._parameters[attr] = decoded  # type: ignore[assignment]

    return pre


#: A change to a decoded weight (in the compute dtype, a fresh tensor it may change in place).
Adjust = Callable[[torch.Tensor], torch.Tensor]
_ADJUST = "_modelkeeper_adjust"


def is_packed(module: torch.nn.Module, name: str) -> bool:
    """Whether ``name`` (a state-dict key of ``module``, ``layer.weight``) is stored packed."""
    plan = plan_of(module)
    owner, _, attr = name.rpartition(".")
    return plan is not None and attr in plan.packed.get(owner, {})


def set_adjust(module: torch.nn.Module, name: str, adjust: Adjust | None) -> None:
    """Give the packed weight ``name`` of ``module`` an adjustment applied after each decode (see the
    module docstring), or take it off (None). The stored tensor is never touched."""
    if not is_packed(module, name):
        raise ValueError(f"{name}: not a packed weight of this module")
    owner, _, attr = name.rpartition(".")
    layer = module.get_submodule(owner)
    adjusts: dict[str, Adjust] = layer.__dict__.setdefault(_ADJUST, {})
    if adjust is None:
        adjusts.pop(attr, None)
        if not adjusts:
            del layer.__dict__[_ADJUST]
    else:
        adjusts[attr] = adjust


def _restorer(layer: torch.nn.Module, attrs: dict[str, Packed]) -> Callable[..., None]:
    def post(_site: torch.nn.Module, _args: Any, _output: Any) -> None:
        stored = layer.__dict__.get("_modelkeeper_stored", {})
        for attr in attrs:
            if attr in stored:
                layer._parameters[attr] = stored.pop(attr)

    return post


def plan_of(module: torch.nn.Module) -> StoragePlan | None:
    """The storage plan attached to ``module`` (None: it holds plain tensors only)."""
    attached = module.__dict__.get("_modelkeeper_storage")
    return attached.plan if isinstance(attached, _Attached) else None


def detach(module: torch.nn.Module) -> None:
    """Remove the decode hooks (the module's tensors are about to be stripped or dropped)."""
    attached = module.__dict__.pop("_modelkeeper_storage", None)
    if isinstance(attached, _Attached):
        for handle in attached.handles:
            handle.remove()
        for owner in attached.plan.packed:  # adjustments belong to the weights going away
            module.get_submodule(owner).__dict__.pop(_ADJUST, None)


def compute_dtype(module: torch.nn.Module) -> torch.dtype | None:
    plan = plan_of(module)
    return plan.compute if plan is not None else None


def logical_shapes(module: torch.nn.Module) -> dict[str, tuple[int, ...]]:
    """The state-dict shapes the packed tensors stand for (GGUF tensors are stored as bytes)."""
    plan = plan_of(module)
    return plan.logical_shapes() if plan is not None else {}


def stored_forms(module: torch.nn.Module) -> dict[str, str]:
    """State-dict key -> packed form, for the packed tensors of ``module``."""
    plan = plan_of(module)
    if plan is None:
        return {}
    return {
        f"{owner}.{attr}" if owner else attr: p.form
        for owner, attrs in plan.packed.items()
        for attr, p in attrs.items()
    }


def move_scales(module: torch.nn.Module, device: torch.device) -> None:
    """Put what the decode hooks read beside the stored tensors (the scales of scaled fp8 weights) on
    ``device``: a module built on the host and placed on the device afterwards (partial residency,
    :mod:`modelkeeper.worker.streaming`) then decodes exactly as one loaded there."""
    plan = plan_of(module)
    for attrs in plan.packed.values() if plan is not None else ():
        for attr, packed in attrs.items():
            if packed.scale is not None and packed.scale.device != device:
                attrs[attr] = dataclasses.replace(packed, scale=packed.scale.to(device))


def parameter_count(module: torch.nn.Module) -> int:
    """Parameters by their logical shapes (a GGUF tensor's bytes are not its parameters)."""
    shapes = logical_shapes(module)
    total = 0
    for name, param in module.named_parameters():
        total += math.prod(shapes[name]) if name in shapes else param.numel()
    return total


__all__ = [
    "FLOAT8",
    "SKIP_PATTERNS",
    "Adjust",
    "Packed",
    "ScaledFloat8",
    "StoragePlan",
    "attach",
    "cast_sources",
    "cast_while_reading",
    "compute_dtype",
    "detach",
    "estimate_bytes",
    "is_packed",
    "is_scale_key",
    "logical_shapes",
    "needs_plan",
    "parameter_count",
    "plan_of",
    "plan_storage",
    "set_adjust",
    "split_scales",
    "stored_forms",
]
