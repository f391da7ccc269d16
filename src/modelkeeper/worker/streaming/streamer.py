"""The streamer: places a host-built module on the device with partial residency and streams the
rest through the hooks of its units.

- a forward pre-hook on each streamed unit makes sure it is in the ring (a copy on a side stream,
  issued earlier by a prefetch when the order of calls is known), makes the compute stream wait for
  that copy, points the unit's parameters at their ring views, and prefetches the next streamed
  units to their places while those are free, past the end of the order into the next pass's
  first units (the copy engine keeps working while a pass's tail computes);
- a forward post-hook records when the compute that reads the unit has been issued, so a later copy
  into the same bytes waits for it on the GPU (no host synchronisation anywhere);
- the module's forward (a *pass*) records the order of unit calls, which the next pass prefetches
  by, each call at its place in the ring (laid out once per order: :meth:`Ring.arrange`); its end
  points every parameter back at its host copy (the state at rest, which LoRAs patch).

Which units stay resident is :mod:`~modelkeeper.worker.streaming.plan`'s; where they go in the ring
is :mod:`~modelkeeper.worker.streaming.ring`'s.
"""

from __future__ import annotations

import os
import threading
from collections.abc import Callable
from typing import Any

import torch

from modelkeeper.worker import storage
from modelkeeper.worker.streaming.plan import choose_resident, pool_limit, pool_size, ring_pays
from modelkeeper.worker.streaming.ring import Link, Ring, Schedule, StreamStats, release
from modelkeeper.worker.streaming.units import (
    PASS_ROOTS,
    Unit,
    Weight,
    find_units,
    owners,
    param_view,
    plan_copy,
)

#: The ring holds at least three of the largest units (one in use, the next arriving, the wrap);
#: beyond that it may take up to this many bytes (``MODELKEEPER_STREAM_POOL_MB``), capped at the
#: streamed total and cut to whole laps (``plan.pool_size``): the prefetch runs about a lap ahead.
POOL_TARGET = int(float(os.environ.get("MODELKEEPER_STREAM_POOL_MB", "0")) * 1024 * 1024)


class Streamer:
    """Places a host-built module on ``device`` with partial residency and streams the rest.

    ``resident_cap``: bytes of weights to keep resident at most (the rest of the module, whatever
    no unit holds, is resident whatever the cap); ``device_budget``: bytes the resident weights and
    the ring may take together. ``pinned``: whether a host tensor may be copied from as it is
    (page-locked); otherwise a streamed unit's weights are copied once into a pinned buffer of
    their own (CUDA). ``pool_bytes``: the bytes the ring may take (at least three of the largest
    streamed units, cut to whole laps: :func:`~modelkeeper.worker.streaming.plan.pool_size`;
    default ``MODELKEEPER_STREAM_POOL_MB``).
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
        self._link = Link(device)
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
            budget = min(budget, device_budget - self.rest_bytes - pool_limit(self.units, target))
        resident = ring_pays(self.units, choose_resident(sizes, budget, keep=keep), target)
        for i, unit in enumerate(self.units):
            unit.resident = i in resident
        streamed = [u for u in self.units if not u.resident]
        self.pool_bytes = pool_size(streamed, target)
        self.resident_unit_bytes = sum(u.nbytes for u in self.units if u.resident)
        self.streamed_bytes = sum(u.nbytes for u in streamed)
        self._place_resident(rest, [u for u in self.units if u.resident])
        storage.move_scales(module, device)
        if device.type == "cuda":
            for unit in streamed:
                self._pin(unit, pinned)
        # a module of one pass (a UNet, a transformer: called step after step) prefetches past the
        # pass's end into the next; a VAE's encoder is not followed by another encode
        wraps = len(PASS_ROOTS.get(class_name, ("",))) == 1
        self.ring = Ring(device, self.pool_bytes, self._link, self._anchors, self.stats, wraps=wraps)
        self._order: dict[int, Schedule] = {}  # per pass root: the last pass as recorded
        self._trace: list[Unit] | None = None
        self._root: int | None = None
        self._pos = 0
        self._streamed = streamed
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
            "views": self.stats.views, "depth": self.stats.depth,
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
        places = owners(self.module)
        weights = [Weight(p, places[id(p)]) for p in rest] + [w for u in units for w in u.weights]
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
            param = param_view(storage, offset, w.host)
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
            w.host.data = param_view(storage, offset, w.host).data

    # ------------------------------------------------------------------ hooks

    def _begin(self, root: int) -> Callable[..., None]:
        def hook(_module: torch.nn.Module, _args: Any) -> None:
            with self._lock:
                if self._trace is not None:
                    return  # a pass already runs (a root called inside another)
                self._root, self._trace, self._pos = root, [], 0
                self.stats.passes += 1
                for unit in self._streamed:  # host copies change between passes only (LoRAs)
                    if unit.valid and not self.ring.held_ok(unit):
                        unit.valid = unit.pending = False
                self.ring.prefetch(self._order.get(root), 0)

        return hook

    def _end(self, root: int) -> Callable[..., None]:
        def hook(_module: torch.nn.Module, _args: Any, _out: Any) -> None:
            with self._lock:
                if self._root != root:
                    return
                old = self._order.get(root)
                if self._trace and old is not None and old.same(self._trace):
                    old.advance()  # the next pass of the cycle
                elif self._trace:
                    self._order[root] = self.ring.arrange(self._trace)  # the places from the next pass on
                self._trace = self._root = None
                for unit in self._streamed:  # at rest: none in use, none waiting for its call
                    if unit.active:
                        release(unit)
                    unit.pending = False  # one prefetched and not called (the order changed) frees its place
                self.ring.current = None
                # the ring keeps what it holds (checked against the host copies before use) and
                # the copy engine starts on the next pass while this one's tail computes
                self.ring.prefetch(self._order.get(root), 0)

        return hook

    def _pre_hook(self, unit: Unit) -> Callable[..., None]:
        def hook(_module: torch.nn.Module, _args: Any) -> None:
            with self._lock:
                if unit.active:
                    self.ring.current = unit
                    return
                order = self._order.get(self._root) if self._root is not None else None
                if self._trace is not None and (not self._trace or self._trace[-1] is not unit):
                    self._trace.append(unit)
                place = self._advance(order, unit)
                held = unit.valid and unit.offset is not None
                if not (held if self._trace is not None else self.ring.held_ok(unit)):
                    self.stats.misses += 1
                    self.ring.fetch(unit, demand=True, place=place)
                self.ring.use(unit)
                self.ring.prefetch(order, self._pos)

        return hook

    def _post_hook(self, unit: Unit) -> Callable[..., None]:
        def hook(_module: torch.nn.Module, _args: Any, _out: Any) -> None:
            unit.done = self._link.mark()
            if self.ring.current is unit:
                self.ring.current = None

        return hook

    # ------------------------------------------------------------------ the order and the state at rest

    def _advance(self, order: Schedule | None, unit: Unit) -> int | None:
        """Move the position in the recorded order past ``unit`` (searching ahead if off track);
        the place of this call, None when the order has no call of ``unit`` ahead."""
        if order is None:
            return None
        for i in range(self._pos, len(order.units)):
            if order.units[i] is unit:
                self._pos = i + 1
                return order.place(i)
        return None

    def settle(self) -> None:
        """Point every streamed parameter back at its host copy and forget the ring's contents:
        the state at rest, which LoRAs patch and fingerprints read."""
        with self._lock:
            for unit in self._streamed:
                if unit.active:
                    release(unit)
                unit.valid = unit.pending = False

    def close(self) -> None:
        """Remove the hooks and give back the device and pinned memory (after pending copies)."""
        with self._lock:
            self._link.synchronize()
            self.settle()
            for handle in self._hooks:
                handle.remove()
            self._hooks.clear()
            for unit in self._streamed:
                unit.views.clear()
                unit.runs = []
            self.ring.close()
            self._held.clear()
