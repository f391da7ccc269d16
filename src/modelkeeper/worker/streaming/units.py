"""Units: the blocks a module is streamed by, the parameters each one holds, and the plan of the
copies that bring a unit's host bytes to the device.

A module is cut into units per architecture (:data:`UNIT_RULES`: UNet resnets and transformer
blocks, Flux/SD3 transformer blocks, text-encoder layers; a generic fallback groups leaf modules up
to :data:`GROUP_BYTES`). A unit's weights are copied as a few contiguous runs of host memory
(:func:`plan_copy`: tensors of one block sit together in a safetensors file), each landing at the
address alignment it has in the resident load, so the same kernels read the same bytes.
"""

from __future__ import annotations

import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch

#: Module-name patterns of the units of each architecture (the outermost match is the unit).
_UNET_UNITS = (
    r"(down_blocks|up_blocks)\.\d+\.(resnets|downsamplers|upsamplers)\.\d+",
    r"mid_block\.resnets\.\d+",
    r"(down_blocks\.\d+\.|up_blocks\.\d+\.|mid_block\.)attentions\.\d+\.transformer_blocks\.\d+",
)
UNIT_RULES: dict[str, tuple[str, ...]] = {
    "UNet2DConditionModel": _UNET_UNITS,
    "ControlNetModel": _UNET_UNITS,
    "FluxTransformer2DModel": (r"transformer_blocks\.\d+", r"single_transformer_blocks\.\d+"),
    "SD3Transformer2DModel": (r"transformer_blocks\.\d+",),
    "CLIPTextModel": (r"(text_model\.)?encoder\.layers\.\d+",),
    "CLIPTextModelWithProjection": (r"(text_model\.)?encoder\.layers\.\d+",),
    "T5EncoderModel": (r"encoder\.block\.\d+",),
    "AutoencoderKL": (
        r"(encoder|decoder)\.(down_blocks|up_blocks)\.\d+\.(resnets|downsamplers|upsamplers)\.\d+",
        r"(encoder|decoder)\.mid_block\.(resnets|attentions)\.\d+",
    ),
}
#: Submodules whose forward is one pass (default: the module itself). A VAE is used through
#: ``encode`` and ``decode``, which call its encoder and decoder.
PASS_ROOTS: dict[str, tuple[str, ...]] = {"AutoencoderKL": ("encoder", "decoder")}
#: The generic fallback groups consecutive leaf modules up to this many bytes.
GROUP_BYTES = 64 * 1024 * 1024
#: Runs of host memory closer than this are copied as one (the gap is alignment padding).
MERGE_GAP = 4096
ALIGN = 256


@dataclass(eq=False)
class Weight:
    """One parameter of a unit: its host (at rest) object and every (owner, attribute) naming it."""

    host: torch.nn.Parameter
    places: list[tuple[torch.nn.Module, str]]

    @property
    def span(self) -> int:
        """Bytes from the first to past the last element (the tensor may be strided)."""
        t = self.host
        if t.numel() == 0:
            return 0
        return (sum((n - 1) * s for n, s in zip(t.shape, t.stride(), strict=True)) + 1) * t.element_size()


@dataclass(eq=False)
class Unit:
    """A block streamed or kept resident as a whole."""

    name: str
    modules: list[torch.nn.Module]
    weights: list[Weight]
    resident: bool = False
    # the copy plan: runs of host memory and where each weight lands (rebuilt when a host moves)
    runs: list[tuple[torch.Tensor, int]] = field(default_factory=list)  # (host uint8 view, dst)
    where: list[int] = field(default_factory=list)
    ptrs: list[int] = field(default_factory=list)
    versions: list[int] = field(default_factory=list)  # of the host tensors when last copied
    size: int = 0
    # ring state
    offset: int | None = None  # where the ring holds it
    valid: bool = False  # the ring holds this pass's copy
    pending: bool = False  # prefetched, not used yet
    active: bool = False  # parameters point at the ring
    ready: Any = None  # copy-stream event: the bytes have arrived
    done: Any = None  # compute-stream event: the last kernels reading them were issued
    views: dict[int, list[torch.nn.Parameter]] = field(default_factory=dict)

    @property
    def nbytes(self) -> int:
        return sum(w.host.numel() * w.host.element_size() for w in self.weights)

    @property
    def bound(self) -> int:
        """The most ring bytes any copy plan of this unit can need (each run adds alignment)."""
        return sum(w.span for w in self.weights) + 2 * ALIGN * (len(self.weights) + 1)


def owners(module: torch.nn.Module) -> dict[int, list[tuple[torch.nn.Module, str]]]:
    """Every (owner, attribute) naming each parameter of ``module``, by the parameter's id (a tied
    parameter has several)."""
    found: dict[int, list[tuple[torch.nn.Module, str]]] = {}
    for _, owner in module.named_modules(remove_duplicate=False):
        for attr, param in owner._parameters.items():
            if param is not None:
                places = found.setdefault(id(param), [])
                if (owner, attr) not in places:
                    places.append((owner, attr))
    return found


def _unit_modules(module: torch.nn.Module, class_name: str) -> list[tuple[str, list[torch.nn.Module]]]:
    rules = [re.compile(p + "$") for p in UNIT_RULES.get(class_name, ())]
    found: list[tuple[str, list[torch.nn.Module]]] = []
    if rules:
        taken: list[str] = []
        for name, sub in module.named_modules():
            if any(name.startswith(t + ".") for t in taken):
                continue
            if any(r.match(name) for r in rules):
                taken.append(name)
                found.append((name, [sub]))
        if found:
            return found
    # generic: consecutive leaves with parameters, grouped up to GROUP_BYTES
    group: list[tuple[str, torch.nn.Module]] = []
    size = 0
    for name, sub in module.named_modules():
        own = [p for p in sub._parameters.values() if p is not None]
        if not own or any(True for _ in sub.children()):
            continue
        nbytes = sum(p.numel() * p.element_size() for p in own)
        if group and size + nbytes > GROUP_BYTES:
            found.append((group[0][0], [m for _, m in group]))
            group, size = [], 0
        group.append((name, sub))
        size += nbytes
    if group:
        found.append((group[0][0], [m for _, m in group]))
    return found


def find_units(module: torch.nn.Module, class_name: str) -> list[Unit]:
    """The units of ``module`` in the order of its modules. A parameter also named outside its
    unit (a tied weight) stays with the resident rest of the module."""
    places_of = owners(module)
    units: list[Unit] = []
    for name, mods in _unit_modules(module, class_name):
        inside = {id(sub) for m in mods for sub in m.modules()}
        weights: dict[int, Weight] = {}
        for m in mods:
            for sub in m.modules():
                for param in sub._parameters.values():
                    if param is None or id(param) in weights:
                        continue
                    places = places_of[id(param)]
                    if all(id(owner) in inside for owner, _ in places):
                        weights[id(param)] = Weight(param, list(places))
        if weights:
            units.append(Unit(name, mods, list(weights.values())))
    return units


def _host_bytes(t: torch.Tensor, start: int, length: int) -> torch.Tensor:
    """A uint8 view of ``length`` bytes of ``t``'s storage from the data pointer ``start``."""
    storage = t.untyped_storage()
    out = torch.empty(0, dtype=torch.uint8)
    out.set_(storage, start - storage.data_ptr(), (length,), (1,))
    return out


def plan_copy(
    weights: Sequence[Weight], anchors: Mapping[int, int] | None = None
) -> tuple[list[tuple[torch.Tensor, int]], list[int], int]:
    """Runs of host bytes covering ``weights`` (neighbours in one storage merged) and where each
    weight lands: ``(runs as (host view, dst offset), dst offset per weight, size)``.

    Every weight lands at the alignment (modulo ALIGN) it has relative to its storage's *anchor*
    (``anchors``: storage address -> address of its first tensor; default the storage itself),
    which is where a resident load puts it: a component read from a file is one device buffer
    whose first tensor is ALIGN-aligned. The same alignment means the same kernels, so the same
    bits."""
    anchors = anchors or {}
    spans = sorted(
        (
            (w.host.data_ptr(), w.host.data_ptr() + w.span, w.host.untyped_storage().data_ptr(), i)
            for i, w in enumerate(weights)
        ),
        key=lambda s: (s[2], s[0]),
    )
    merged: list[list[int]] = []  # [start, end, storage, first index into spans, last]
    for k, (start, end, base, _) in enumerate(spans):
        if merged and merged[-1][2] == base and start <= merged[-1][1] + MERGE_GAP:
            merged[-1][1] = max(merged[-1][1], end)
            merged[-1][4] = k
        else:
            merged.append([start, end, base, k, k])
    runs: list[tuple[torch.Tensor, int]] = []
    where = [0] * len(weights)
    size = 0
    for start, end, base, first, last in merged:
        dst = size + (-size % ALIGN) + (start - anchors.get(base, base)) % ALIGN
        runs.append((_host_bytes(weights[spans[first][3]].host, start, end - start), dst))
        for k in range(first, last + 1):
            where[spans[k][3]] = dst + spans[k][0] - start
        size = dst + end - start
    return runs, where, size


def align_up(n: int) -> int:
    """``n`` rounded up to a multiple of ALIGN."""
    return n + (-n % ALIGN)


def param_view(storage: torch.UntypedStorage, offset: int, like: torch.Tensor) -> torch.nn.Parameter:
    """A parameter over ``storage`` from byte ``offset`` with the dtype, shape and strides of
    ``like``: where :func:`plan_copy` put that weight."""
    t = torch.empty(0, dtype=like.dtype, device=storage.device)
    t.set_(storage, offset // like.element_size(), like.shape, like.stride())
    return torch.nn.Parameter(t, requires_grad=False)
