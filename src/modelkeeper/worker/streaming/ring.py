"""The ring: one device buffer that streamed units are copied into just ahead of their use.

Once a pass has recorded the order of its units, each call of a unit has a fixed place in each pass
of a short cycle (:meth:`Ring.arrange`, the laps of
:func:`~modelkeeper.worker.streaming.plan.lay_out_cycle`): every cycle puts each unit where the last
one did and finds its parameter views made, at any ring size. A unit with no place (the first pass,
a unit the recorded order lacks) goes at the head, first fit in ring order around what is in use or
prefetched. Every place is ALIGN-aligned (each weight keeps the address alignment of the resident
load). Copies run on a side stream (:class:`Link`); each place is fenced by the compute that last
read it, so a later copy into the same bytes waits for it on the GPU (no host synchronisation).
What the ring holds stays valid while its host copies are unchanged (same address, same version
counter).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch

from modelkeeper.worker.streaming.plan import lay_out_cycle
from modelkeeper.worker.streaming.units import Unit, align_up, param_view, plan_copy

#: Ring positions whose parameter views a unit keeps (once a pass is recorded a unit has a place per
#: pass of the cycle, ``plan.CYCLE`` at most, and per call if a pass calls it twice; a few more serve
#: the first passes and orders that alternate; a view costs a few microseconds of host time per
#: weight, a thousand and more a pass).
VIEW_CACHE = 8


class Link:
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


@dataclass(eq=False)
class _Region:
    """Bytes of the ring: a unit's, or (``unit`` None) bytes last read by compute up to ``fence``."""

    start: int
    end: int
    unit: Unit | None
    fence: Any = None

    def done(self) -> Any:
        return self.unit.done if self.unit is not None else self.fence


@dataclass(eq=False)
class Schedule:
    """A pass as recorded: its units in the order of their calls (a unit called twice, twice), the
    ring bytes each takes and where each call puts it in each pass of the cycle
    (:meth:`Ring.arrange`); ``phase``: the pass of the cycle that runs now (or runs next, at rest)."""

    units: list[Unit]
    sizes: list[int]
    places: list[list[int]]
    phase: int = 0

    def same(self, units: list[Unit]) -> bool:
        """Whether ``units`` (a pass just recorded) would be laid out as this one."""
        return self.units == units and self.sizes == [align_up(u.size) for u in units]

    def place(self, k: int) -> int:
        """The place of call ``k`` of this pass (past its end: of the next passes)."""
        n = len(self.units)
        return self.places[(self.phase + k // n) % len(self.places)][k % n]

    def advance(self) -> None:
        """The pass ended: the next one is the cycle's next."""
        self.phase = (self.phase + 1) % len(self.places)


@dataclass
class StreamStats:
    """What a streamer has done since its load (a model's info shows it as ``streaming``)."""

    passes: int = 0
    fetches: int = 0
    misses: int = 0  # fetched on demand, not ahead
    bytes: int = 0  # copied into the ring
    views: int = 0  # parameter views made over the ring (host work; none once placements repeat)
    depth: int = 0  # the most units prefetched ahead at once (arrived or on their way, not yet used)


def release(unit: Unit) -> None:
    """Point ``unit``'s parameters back at their host copies (the state at rest)."""
    for w in unit.weights:
        for owner, attr in w.places:
            owner._parameters[attr] = w.host
    unit.active = False


class Ring:
    """The device buffer of a streamer's streamed units and what each of its places holds.

    ``pool_bytes``: its size; ``anchors``: the host storages' first tensors (see :func:`plan_copy`);
    ``wraps``: whether a prefetch runs past the end of a pass into the next one (a module of one
    pass: a UNet or a transformer, called step after step). The caller holds the streamer's lock.
    """

    def __init__(
        self,
        device: torch.device,
        pool_bytes: int,
        link: Link,
        anchors: dict[int, int],
        stats: StreamStats,
        *,
        wraps: bool,
    ) -> None:
        self.device = device
        self.pool_bytes = pool_bytes
        self.link = link
        self.anchors = anchors
        self.stats = stats
        self.wraps = wraps
        self.buffer = torch.empty(pool_bytes, dtype=torch.uint8, device=device)
        self._storage = self.buffer.untyped_storage()
        self._regions: list[_Region] = []
        self.current: Unit | None = None  # the unit whose compute is being issued
        self._head = 0

    def arrange(self, units: list[Unit]) -> Schedule:
        """The schedule of a pass that called ``units`` in this order: each call's place in each
        pass of the cycle, the laps of :func:`lay_out_cycle`. Units the ring holds at none of their
        places are forgotten (copied again, to their places), so the next pass already runs in them."""
        sizes = [align_up(u.size) for u in units]
        schedule = Schedule(list(units), sizes, lay_out_cycle(sizes, self.pool_bytes))
        places: dict[int, set[int]] = {}
        for cycle_pass in schedule.places:
            for unit, place in zip(units, cycle_pass, strict=True):
                places.setdefault(id(unit), set()).add(place)
        for unit in units:
            if unit.offset is not None and unit.offset not in places[id(unit)] and unit is not self.current:
                self._drop(unit)
        return schedule

    def prefetch(self, schedule: Schedule | None, start: int) -> None:
        """Fetch the next units of ``schedule`` from ``start``, in order, while their places are
        free (no unit in use or prefetched there), and past its end the next pass's first ones:
        the copy engine keeps working through this pass's tail (a look no further ahead than the
        ring is long: each hook runs this)."""
        if schedule is None:
            return
        reach = self.pool_bytes
        ahead = 0
        n = len(schedule.units)
        for k in range(start, start + n if self.wraps else n):
            i = k % n
            unit = schedule.units[i]
            reach -= schedule.sizes[i]
            if reach < 0:
                break
            if unit.valid and unit.offset is not None:
                unit.pending = unit is not self.current  # held from before: kept until it is used
            elif self.fetch(unit, demand=False, place=schedule.place(k)):
                unit.pending = True
            else:
                break
            ahead += unit.pending
        self.stats.depth = max(self.stats.depth, ahead)

    def use(self, unit: Unit) -> None:
        """Make the compute stream wait for ``unit``'s copy and point its parameters at their ring
        views (made once per ring position, :data:`VIEW_CACHE`)."""
        unit.pending = False
        self.link.wait(unit.ready)
        assert unit.offset is not None
        params = unit.views.get(unit.offset)
        if params is None:
            params = [
                param_view(self._storage, unit.offset + at, w.host)
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
        self.current = unit

    @staticmethod
    def _moved(unit: Unit) -> bool:
        return any(w.host.data_ptr() != p for w, p in zip(unit.weights, unit.ptrs, strict=True))

    def held_ok(self, unit: Unit) -> bool:
        """Whether the ring holds ``unit`` as its host copies are now: none moved (a LoRA gave it a
        private copy) and none was written since (a LoRA's strength changed in place)."""
        return (
            unit.valid
            and unit.offset is not None
            and not self._moved(unit)
            and all(w.host._version == v for w, v in zip(unit.weights, unit.versions, strict=True))
        )

    def fetch(self, unit: Unit, *, demand: bool, place: int | None = None) -> bool:
        """Copy ``unit`` into the ring, at ``place`` (its schedule's) when it has one; False
        (nothing done) when a prefetch finds its place, or with none any room, in use or
        prefetched. A demand fetch whose place is taken goes elsewhere (first fit), and
        overwrites as a last resort."""
        if not unit.runs or self._moved(unit):
            unit.runs, unit.where, unit.size = plan_copy(unit.weights, self.anchors)
            unit.ptrs = [w.host.data_ptr() for w in unit.weights]
            unit.views = {}
        size = align_up(unit.size)  # every place in the ring ALIGN-aligned: plan_copy's offsets hold there
        if place is not None and place + size > self.pool_bytes:
            place = None  # a size changed since the schedule was laid out (a LoRA re-planned it)
        if place is not None and self._clear(self._taken(), place, size):
            start: int | None = place
        elif place is not None and not demand:
            return False  # wait for the place: the order's next units stay where they are
        else:
            start = self._room(size, demand, self._head)
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
        unit.ready = self.link.copy(unit.runs, self.buffer, start, waits)
        unit.offset, unit.valid, unit.done = start, True, None
        self._regions.append(_Region(start, start + size, unit))
        self._head = start + size
        self.stats.fetches += 1
        self.stats.bytes += unit.size
        return True

    def _taken(self) -> list[_Region]:
        """The regions of units in use or prefetched (a copy may not land there)."""
        return [r for r in self._regions if r.unit is not None and (r.unit.pending or r.unit is self.current)]

    @staticmethod
    def _clear(regions: list[_Region], start: int, size: int) -> bool:
        return not any(r.start < start + size and start < r.end for r in regions)

    def _room(self, size: int, demand: bool, head: int) -> int | None:
        """Where ``size`` bytes go: the first place from ``head`` on, in ring order, that holds no
        unit in use or prefetched (a demand fetch takes the head, or the start, whatever is there)."""
        busy = self._taken()
        if head + size <= self.pool_bytes and self._clear(busy, head, size):
            return head  # the usual case: the ring is filled in order
        candidates = sorted(
            {head, 0, *(r.end for r in busy)}, key=lambda c: (c - head) % (self.pool_bytes or 1)
        )
        for start in candidates:
            if start + size <= self.pool_bytes and self._clear(busy, start, size):
                return start
        if demand:
            return head if head + size <= self.pool_bytes else 0
        return None

    def _drop(self, unit: Unit) -> None:
        """Forget ``unit``'s place in the ring (its parameters go back to the host copies); the
        bytes it occupied stay fenced by its last compute until something overwrites them."""
        if unit.active:
            release(unit)
        for region in self._regions:
            if region.unit is unit:
                region.fence, region.unit = unit.done, None
        unit.offset, unit.valid, unit.pending = None, False, False

    def close(self) -> None:
        """Forget every place and give back the device buffer (the caller waited for pending copies)."""
        self._regions.clear()
        self.buffer = torch.empty(0, dtype=torch.uint8, device=self.device)
        self._storage = self.buffer.untyped_storage()
