"""Partial residency: keep as many blocks of a module on the device as a budget allows, stream the rest.

A module is cut into *units* (UNet resnets and transformer blocks, Flux/SD3 transformer blocks,
text-encoder layers; a generic fallback groups leaf modules), chosen per architecture in
:data:`UNIT_RULES`. Resident units get their weights copied to the device once. Streamed units keep
their weights in host memory (the page-locked RAM-cache segment, or a pinned copy when the load
came from disk) and are copied into a device *ring* just ahead of their use:

- a forward pre-hook on the unit makes sure it is in the ring (a copy on a side stream, issued
  earlier by a prefetch when the order of calls is known), makes the compute stream wait for that
  copy, points the unit's parameters at their ring views, and prefetches the next streamed units
  into the free part of the ring, past the end of the order into the next pass's first units (the
  copy engine keeps working while a pass's tail computes);
- a forward post-hook records when the compute that reads the unit has been issued, so a later copy
  into the same bytes waits for it on the GPU (no host synchronisation anywhere);
- the module's forward (a *pass*) records the order of unit calls, which the next pass prefetches
  by; its end points every parameter back at its host copy (the state at rest, which LoRAs patch);
  what the ring holds stays valid while its host copies are unchanged (same address, same version
  counter). A pass's first unit goes to the ring's start, so every pass places its units where the
  last one did and finds their parameter views made (no host allocation per step once it settles);
  every place is ALIGN-aligned, so each weight keeps the address alignment of the resident load.

Each unit is copied as a few contiguous runs of host memory (tensors of one block sit together in a
safetensors file), so a copy is one or two large DMA transfers, not one per tensor. Outputs are
bit-identical to the resident module: the same kernels read the same bytes, only from elsewhere.
Packed weights (fp8, scaled fp8, GGUF blocks: :mod:`modelkeeper.worker.storage`) stream packed:
the ring receives the stored bytes (half or a quarter of the decoded ones over the link), and the
layer's decode hook, which runs after the unit's pre-hook, decodes them on the device as it does
for a resident packed layer.
On a CPU worker the "device" is the CPU: streamed weights live in their own host buffers and are
copied into the ring before use (synchronously), which exercises the same mechanics.
"""

from __future__ import annotations

import os
import re
import threading
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from modelkeeper.worker import storage
from modelkeeper.worker.mapping import MappingTable, is_segment

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
#: Ring positions whose parameter views a unit keeps (placements repeat from pass to pass; a view
#: costs a few microseconds of host time per weight, a thousand and more weights a pass).
VIEW_CACHE = 4
#: The ring holds at least three of the largest units (one in use, the next arriving, the wrap);
#: beyond that it prefetches up to this many bytes ahead (``MODELKEEPER_STREAM_POOL_MB``), capped at the streamed total.
POOL_TARGET = int(float(os.environ.get("MODELKEEPER_STREAM_POOL_MB", "0")) * 1024 * 1024)


# ----------------------------------------------------------------------------- units


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
    offset: int | None = None
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


def _owners(module: torch.nn.Module) -> dict[int, list[tuple[torch.nn.Module, str]]]:
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
    owners = _owners(module)
    units: list[Unit] = []
    for name, mods in _unit_modules(module, class_name):
        inside = {id(sub) for m in mods for sub in m.modules()}
        weights: dict[int, Weight] = {}
        for m in mods:
            for sub in m.modules():
                for param in sub._parameters.values():
                    if param is None or id(param) in weights:
                        continue
                    places = owners[id(param)]
                    if all(id(owner) in inside for owner, _ in places):
                        weights[id(param)] = Weight(param, list(places))
        if weights:
            units.append(Unit(name, mods, list(weights.values())))
    return units


def choose_resident(sizes: Sequence[int], budget: int, *, keep: Iterable[int] = ()) -> set[int]:
    """Which units (by index, in order of use) to keep resident within ``budget`` bytes.

    Resident units are spread evenly through the order (a resident unit's compute is time the copy
    engine uses for the next streamed one), then any room left takes the largest that still fit.
    ``keep`` are resident whatever the budget (counted against it first)."""
    chosen = set(keep)
    used = sum(sizes[i] for i in chosen)
    total = sum(sizes) or 1
    share = max(0.0, min(1.0, (budget - used) / total))
    seen = placed = 0
    for i, size in enumerate(sizes):
        seen += size
        if i in chosen:
            continue
        if placed + size <= share * seen and used + size <= budget:
            chosen.add(i)
            placed += size
            used += size
    for i in sorted(range(len(sizes)), key=lambda j: -sizes[j]):
        if i not in chosen and used + sizes[i] <= budget:
            chosen.add(i)
            used += sizes[i]
    return chosen


def _pool(streamed: Sequence[Unit], target: int) -> int:
    """The ring for ``streamed``: three of the largest (one in use, the next always finds room,
    wherever the ring wraps), or ``target`` bytes (at most all of them)."""
    if not streamed:
        return 0
    return max(3 * max(u.bound for u in streamed), min(target, sum(u.bound for u in streamed)))


def ring_pays(units: Sequence[Unit], resident: Iterable[int], target: int) -> set[int]:
    """``resident`` (indices into ``units``) grown until the ring takes fewer bytes than the units it
    streams: while it would take as many (a model of few blocks: the ring holds three of the largest),
    the largest streamed unit stays resident instead. So a streamed module never needs more device
    bytes than the same module resident (at worst it is resident whole, with no ring)."""
    chosen = set(resident)
    while True:
        streamed = [i for i in range(len(units)) if i not in chosen]
        if not streamed or _pool([units[i] for i in streamed], target) < sum(
            units[i].nbytes for i in streamed
        ):
            return chosen
        chosen.add(max(streamed, key=lambda i: units[i].nbytes))


def resident_limit(offload: str | int, required: int, free: int) -> int | None:
    """The resident bytes a load with ``offload`` may keep, or None to load the whole model as
    always (``none``; ``auto`` when it fits ``free``; a cap at least ``required``)."""
    if offload == "none":
        return None
    if offload == "auto":
        return None if required <= free else free
    assert isinstance(offload, int)
    return None if offload >= required else offload


def registered_host(
    files: Iterable[Path], table: MappingTable, device: torch.device
) -> Callable[[torch.Tensor], bool]:
    """Whether a host tensor lies in a page-locked RAM-cache segment of ``files`` (registered with
    CUDA here, once per segment): those stream as they are; others are pinned by a copy."""
    if device.type != "cuda":
        return lambda t: False
    ranges: list[tuple[int, int]] = []
    for path in files:
        if is_segment(path):
            mapping = table.get(path)
            mapping.register()
            if mapping.registered:
                ranges.append((mapping.host.data_ptr(), mapping.host.data_ptr() + mapping.host.numel()))
    return lambda t: any(start <= t.data_ptr() < end for start, end in ranges)


# ----------------------------------------------------------------------------- copies


class _Link:
    """Copies from host memory into device memory, and the events that order them against compute.
    On the CPU every copy is synchronous and events are None."""

    def __init__(self, device: torch.device) -> None:
        self.device = device
        self.cuda = device.type == "cuda"
        self.stream = torch.cuda.Stream(device) if self.cuda else None

    def copy(
        self, runs: list[tuple[torch.Tensor, int]], ring: torch.Tensor, base: int, waits: list[Any]
    ) -> Any:
        if self.stream is None:
            for src, dst in runs:
                ring[base + dst : base + dst + src.numel()].copy_(src)
            return None
        with torch.cuda.stream(self.stream):
            for event in waits:
                self.stream.wait_event(event)
            for src, dst in runs:
                ring[base + dst : base + dst + src.numel()].copy_(src, non_blocking=True)
            event = torch.cuda.Event()
            event.record(self.stream)
        return event

    def mark(self) -> Any:
        """An event after the compute issued so far."""
        if not self.cuda:
            return None
        event = torch.cuda.Event()
        event.record(torch.cuda.current_stream(self.device))
        return event

    def wait(self, event: Any) -> None:
        if event is not None:
            torch.cuda.current_stream(self.device).wait_event(event)

    def synchronize(self) -> None:
        if self.stream is not None:
            self.stream.synchronize()
            torch.cuda.current_stream(self.device).synchronize()


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


def _up(n: int) -> int:
    """``n`` rounded up to a multiple of ALIGN."""
    return n + (-n % ALIGN)


def _view(storage: torch.UntypedStorage, offset: int, like: torch.Tensor) -> torch.nn.Parameter:
    t = torch.empty(0, dtype=like.dtype, device=storage.device)
    t.set_(storage, offset // like.element_size(), like.shape, like.stride())
    return torch.nn.Parameter(t, requires_grad=False)


# ----------------------------------------------------------------------------- the streamer


@dataclass(eq=False)
class _Region:
    """Bytes of the ring: a unit's, or (``unit`` None) bytes last read by compute up to ``fence``."""

    start: int
    end: int
    unit: Unit | None
    fence: Any = None

    def done(self) -> Any:
        return self.unit.done if self.unit is not None else self.fence


@dataclass
class StreamStats:
    passes: int = 0
    fetches: int = 0
    misses: int = 0  # fetched on demand, not ahead
    bytes: int = 0  # copied into the ring
    views: int = 0  # parameter views made over the ring (host work; none once placements repeat)


class Streamer:
    """Places a host-built module on ``device`` with partial residency and streams the rest.

    ``resident_cap``: bytes of weights to keep resident at most (the rest of the module, whatever
    no unit holds, is resident whatever the cap); ``device_budget``: bytes the resident weights and
    the ring may take together. ``pinned``: whether a host tensor may be copied from as it is
    (page-locked); otherwise a streamed unit's weights are copied once into a pinned buffer of
    their own (CUDA). ``pool_bytes``: the bytes the ring may prefetch ahead (it holds at least three of the largest
    streamed units; default ``MODELKEEPER_STREAM_POOL_MB``).
    Call :meth:`close` before dropping the module.
    """

    def __init__(
        self,
        module: torch.nn.Module,
        device: torch.device,
        class_name: str,
        resident_cap: int,
        *,
        device_budget: int | None = None,
        pinned: Callable[[torch.Tensor], bool] = lambda t: False,
        pool_bytes: int | None = None,
    ) -> None:
        self.module = module
        self.device = device
        self.class_name = class_name
        self.stats = StreamStats()
        self._link = _Link(device)
        self._lock = threading.RLock()
        self._hooks: list[Any] = []
        self._held: list[torch.Tensor] = []  # device and pinned buffers this streamer owns
        self.units = find_units(module, class_name)
        self._anchors: dict[int, int] = {}  # host storage -> its first tensor (see plan_copy)
        for p in module.parameters():
            base = p.untyped_storage().data_ptr()
            self._anchors[base] = min(self._anchors.get(base, p.data_ptr()), p.data_ptr())
        in_units = {id(w.host) for u in self.units for w in u.weights}
        rest = [p for p in module.parameters() if id(p) not in in_units]
        first = next(iter(module.parameters()), None)  # `module.device` reads it: keep it resident
        keep = [
            i
            for i, u in enumerate(self.units)
            if first is not None and any(w.host is first for w in u.weights)
        ]
        sizes = [u.nbytes for u in self.units]
        target = POOL_TARGET if pool_bytes is None else pool_bytes
        self.rest_bytes = sum(p.numel() * p.element_size() for p in rest) + sum(
            b.numel() * b.element_size() for b in module.buffers()
        )
        budget = resident_cap - self.rest_bytes
        if device_budget is not None:  # the ring as if every unit streamed: an upper bound
            budget = min(budget, device_budget - self.rest_bytes - _pool(self.units, target))
        resident = ring_pays(self.units, choose_resident(sizes, budget, keep=keep), target)
        for i, unit in enumerate(self.units):
            unit.resident = i in resident
        streamed = [u for u in self.units if not u.resident]
        self.pool_bytes = _pool(streamed, target)
        self.resident_unit_bytes = sum(u.nbytes for u in self.units if u.resident)
        self.streamed_bytes = sum(u.nbytes for u in streamed)
        self._place_resident(rest, [u for u in self.units if u.resident])
        storage.move_scales(module, device)
        if device.type == "cuda":
            for unit in streamed:
                self._pin(unit, pinned)
        self._ring = torch.empty(self.pool_bytes, dtype=torch.uint8, device=device)
        self._ring_storage = self._ring.untyped_storage()
        self._regions: list[_Region] = []
        self._current: Unit | None = None
        self._head = 0
        self._order: dict[int, list[Unit]] = {}
        self._trace: list[Unit] | None = None
        self._root: int | None = None
        self._pos = 0
        self._streamed = streamed
        # a module of one pass (a UNet, a transformer: called step after step) prefetches past the
        # pass's end into the next; a VAE's encoder is not followed by another encode
        self._wraps = len(PASS_ROOTS.get(class_name, ("",))) == 1
        for unit in streamed:
            for m in unit.modules:
                # first of the unit's pre-hooks: a packed layer's decode hook reads the ring's bytes
                self._hooks.append(m.register_forward_pre_hook(self._pre_hook(unit), prepend=True))
                self._hooks.append(m.register_forward_hook(self._post_hook(unit), always_call=True))
        if streamed:
            for name in PASS_ROOTS.get(class_name, ("",)):
                root = module.get_submodule(name)
                self._hooks.append(root.register_forward_pre_hook(self._begin(id(root))))
                self._hooks.append(root.register_forward_hook(self._end(id(root)), always_call=True))

    # ------------------------------------------------------------------ figures

    @property
    def resident_bytes(self) -> int:
        """Weights kept on the device (the rest of the module and the resident units)."""
        return self.rest_bytes + self.resident_unit_bytes

    @property
    def device_bytes(self) -> int:
        """What this model holds on the device: resident weights and the ring."""
        return self.resident_bytes + self.pool_bytes

    def describe(self) -> dict[str, Any]:
        return {
            "resident_bytes": self.resident_bytes, "streamed_bytes": self.streamed_bytes,
            "pool_bytes": self.pool_bytes, "units": len(self.units),
            "streamed_units": len(self._streamed), "passes": self.stats.passes,
            "fetches": self.stats.fetches, "misses": self.stats.misses, "copied_bytes": self.stats.bytes,
            "views": self.stats.views,
        }  # fmt: skip

    # ------------------------------------------------------------------ placement

    def _place_resident(self, rest: list[torch.nn.Parameter], units: list[Unit]) -> None:
        """Copy the resident weights into one device allocation; buffers follow the module."""
        for m in self.module.modules():
            for attr, buf in m._buffers.items():
                if buf is not None and buf.device != self.device:
                    m._buffers[attr] = buf.to(self.device)
        if self.device.type == "cpu":
            return  # the host tensors are on the device already
        owners = _owners(self.module)
        weights = [Weight(p, owners[id(p)]) for p in rest] + [w for u in units for w in u.weights]
        weights = [w for w in weights if w.host.device != self.device]
        if not weights:
            return
        runs, where, size = plan_copy(weights, self._anchors)
        buffer = torch.empty(size, dtype=torch.uint8, device=self.device)
        for src, dst in runs:
            buffer[dst : dst + src.numel()].copy_(src, non_blocking=True)
        torch.cuda.synchronize(self.device)
        storage = buffer.untyped_storage()
        for w, offset in zip(weights, where, strict=True):
            param = _view(storage, offset, w.host)
            for owner, attr in w.places:
                owner._parameters[attr] = param
        self._held.append(buffer)

    def _pin(self, unit: Unit, pinned: Callable[[torch.Tensor], bool]) -> None:
        """Copy a streamed unit's weights that are not in page-locked memory into one pinned buffer
        (once, at load), so every later copy is a DMA transfer with no staging."""
        loose = [w for w in unit.weights if not pinned(w.host)]
        if not loose:
            return
        runs, where, size = plan_copy(loose, self._anchors)
        buffer = torch.empty(size, dtype=torch.uint8, pin_memory=True)
        for src, dst in runs:
            buffer[dst : dst + src.numel()].copy_(src)
        storage = buffer.untyped_storage()
        for w, offset in zip(loose, where, strict=True):
            w.host.data = _view(storage, offset, w.host).data

    # ------------------------------------------------------------------ hooks

    def _begin(self, root: int) -> Callable[..., None]:
        def hook(_module: torch.nn.Module, _args: Any) -> None:
            with self._lock:
                if self._trace is not None:
                    return  # a pass already runs (a root called inside another)
                self._root, self._trace, self._pos = root, [], 0
                self.stats.passes += 1
                for unit in self._streamed:  # host copies change between passes only (LoRAs)
                    if unit.valid and not self._held_ok(unit):
                        unit.valid = unit.pending = False
                self._prefetch(self._order.get(root, []), 0)

        return hook

    def _end(self, root: int) -> Callable[..., None]:
        def hook(_module: torch.nn.Module, _args: Any, _out: Any) -> None:
            with self._lock:
                if self._root != root:
                    return
                if self._trace:
                    self._order[root] = self._trace
                self._trace = self._root = None
                for unit in self._streamed:
                    if unit.active:
                        self._release(unit)
                self._current = None
                # the ring keeps what it holds (checked against the host copies before use) and
                # the copy engine starts on the next pass while this one's tail computes
                self._prefetch(self._order.get(root, []), 0)

        return hook

    def _pre_hook(self, unit: Unit) -> Callable[..., None]:
        def hook(_module: torch.nn.Module, _args: Any) -> None:
            with self._lock:
                if unit.active:
                    self._current = unit
                    return
                order = self._order.get(self._root, []) if self._root is not None else []
                if self._trace is not None and (not self._trace or self._trace[-1] is not unit):
                    self._trace.append(unit)
                self._advance(order, unit)
                held = unit.valid and unit.offset is not None
                if not (held if self._trace is not None else self._held_ok(unit)):
                    self.stats.misses += 1
                    self._fetch(unit, demand=True, first=bool(order) and order[0] is unit)
                unit.pending = False
                self._link.wait(unit.ready)
                assert unit.offset is not None
                params = unit.views.get(unit.offset)
                if params is None:
                    params = [
                        _view(self._ring_storage, unit.offset + at, w.host)
                        for w, at in zip(unit.weights, unit.where, strict=True)
                    ]
                    self.stats.views += len(params)
                    if len(unit.views) >= VIEW_CACHE:
                        del unit.views[next(iter(unit.views))]
                    unit.views[unit.offset] = params
                for w, p in zip(unit.weights, params, strict=True):
                    for owner, attr in w.places:
                        owner._parameters[attr] = p
                unit.active = True
                self._current = unit
                self._prefetch(order, self._pos)

        return hook

    def _post_hook(self, unit: Unit) -> Callable[..., None]:
        def hook(_module: torch.nn.Module, _args: Any, _out: Any) -> None:
            unit.done = self._link.mark()
            if self._current is unit:
                self._current = None

        return hook

    # ------------------------------------------------------------------ the ring

    def _advance(self, order: list[Unit], unit: Unit) -> None:
        """Move the position in the recorded order past ``unit`` (searching ahead if off track)."""
        if self._pos < len(order) and order[self._pos] is unit:
            self._pos += 1
            return
        for i in range(self._pos, len(order)):
            if order[i] is unit:
                self._pos = i + 1
                return

    def _prefetch(self, order: list[Unit], start: int) -> None:
        """Fetch the next units of ``order`` from ``start`` that the ring can take, and past the
        order's end the next pass's first ones: the copy engine keeps working through this pass's
        tail (a look no further ahead than the ring is long: each hook runs this)."""
        reach = self.pool_bytes
        n = len(order)
        for k in range(start, start + n if self._wraps else n):
            unit = order[k % n]
            reach -= _up(unit.size)
            if reach < 0:
                return
            if unit.valid and unit.offset is not None:
                unit.pending = unit is not self._current  # held from before: kept until it is used
                continue
            if not self._fetch(unit, demand=False, first=k % n == 0):
                return
            unit.pending = True

    def _moved(self, unit: Unit) -> bool:
        return any(w.host.data_ptr() != p for w, p in zip(unit.weights, unit.ptrs, strict=True))

    def _held_ok(self, unit: Unit) -> bool:
        """Whether the ring holds ``unit`` as its host copies are now: none moved (a LoRA gave it a
        private copy) and none was written since (a LoRA's strength changed in place)."""
        return (
            unit.valid
            and unit.offset is not None
            and not self._moved(unit)
            and all(w.host._version == v for w, v in zip(unit.weights, unit.versions, strict=True))
        )

    def _fetch(self, unit: Unit, *, demand: bool, first: bool = False) -> bool:
        """Copy ``unit`` into the ring; False (nothing done) when a prefetch finds no free room.
        ``first``: the first unit of a pass, placed at the ring's start when that is free, so each
        pass places its units as the last one did (and finds their views made)."""
        if not unit.runs or self._moved(unit):
            unit.runs, unit.where, unit.size = plan_copy(unit.weights, self._anchors)
            unit.ptrs = [w.host.data_ptr() for w in unit.weights]
            unit.views = {}
        size = _up(unit.size)  # every place in the ring ALIGN-aligned: plan_copy's offsets hold there
        start = self._room(size, demand, 0 if first else self._head)
        if start is None:
            return False
        hit = [r for r in self._regions if r.start < start + size and start < r.end]
        self._drop(unit)
        waits = [r.done() for r in hit if r.done() is not None]
        for region in hit:
            if region.unit is not None:
                self._drop(region.unit)
            if region in self._regions:
                self._regions.remove(region)
        unit.versions = [w.host._version for w in unit.weights]
        unit.ready = self._link.copy(unit.runs, self._ring, start, waits)
        unit.offset, unit.valid, unit.done = start, True, None
        self._regions.append(_Region(start, start + size, unit))
        self._head = start + size
        self.stats.fetches += 1
        self.stats.bytes += unit.size
        return True

    def _room(self, size: int, demand: bool, head: int) -> int | None:
        """Where ``size`` bytes go: the first place from ``head`` on, in ring order, that holds no
        unit in use or prefetched (a demand fetch takes the head, or the start, whatever is there)."""
        busy = [
            r for r in self._regions if r.unit is not None and (r.unit.pending or r.unit is self._current)
        ]
        if head + size <= self.pool_bytes and not any(r.start < head + size and head < r.end for r in busy):
            return head  # the usual case: the ring is filled in order
        candidates = sorted(
            {head, 0, *(r.end for r in busy)}, key=lambda c: (c - head) % (self.pool_bytes or 1)
        )
        for start in candidates:
            if start + size <= self.pool_bytes and not any(
                r.start < start + size and start < r.end for r in busy
            ):
                return start
        if demand:
            return head if head + size <= self.pool_bytes else 0
        return None

    def _drop(self, unit: Unit) -> None:
        """Forget ``unit``'s place in the ring (its parameters go back to the host copies); the
        bytes it occupied stay fenced by its last compute until something overwrites them."""
        if unit.active:
            self._release(unit)
        for region in self._regions:
            if region.unit is unit:
                region.fence, region.unit = unit.done, None
        unit.offset, unit.valid, unit.pending = None, False, False

    @staticmethod
    def _release(unit: Unit) -> None:
        for w in unit.weights:
            for owner, attr in w.places:
                owner._parameters[attr] = w.host
        unit.active = False

    def settle(self) -> None:
        """Point every streamed parameter back at its host copy and forget the ring's contents:
        the state at rest, which LoRAs patch and fingerprints read."""
        with self._lock:
            for unit in self._streamed:
                if unit.active:
                    self._release(unit)
                unit.valid = unit.pending = False

    def close(self) -> None:
        """Remove the hooks and give back the device and pinned memory (after pending copies)."""
        with self._lock:
            self._link.synchronize()
            self.settle()
            for handle in self._hooks:
                handle.remove()
            self._hooks.clear()
            self._regions.clear()
            for unit in self._streamed:
                unit.views.clear()
                unit.runs = []
            self._ring = torch.empty(0, dtype=torch.uint8, device=self.device)
            self._ring_storage = self._ring.untyped_storage()
            self._held.clear()
