"""The decode hooks of packed layers, which run as the model runs.

A packed layer gets a forward pre-hook that puts the decoded tensor in place of the stored one and
a forward hook that puts the stored one back; for a layer whose parent reads its weight's dtype
(T5's ``wo``) the hooks sit on the parent (:func:`~modelkeeper.worker.storage.plan.hook_site`).

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
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch

from modelkeeper.worker.storage.forms import Packed
from modelkeeper.worker.storage.plan import StoragePlan, hook_site


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
