"""Placement: which device takes a model, and which models make room for it. A pure policy.

Functions of a :class:`DeviceView` list, with no I/O and no clock: the load path builds the views
from its workers, placements and leases, asks, and acts on the answer elsewhere (the loads part).
Errors are :class:`NotPlaceable`, whose message says what holds each device.

The order, for :func:`choose_device`: the device already holding (or loading) the model; else the
one with the most free budget that fits it; else the one with the most room once its evictable
models (loaded, not leased, not kept loaded, unless ``force``) are gone. :func:`plan_eviction`
picks, on one device, the least recently used evictable models until the model fits (or, given
``value``, the least valuable ones).

A cluster adds tiers: :func:`choose_placement` answers from a :class:`ClusterView` (devices grouped
by node, each node's RAM cache and files on disk, kept indexed as the view changes) with a
:class:`Placement`: the device, the tier its bytes come from, and what to evict there.
"""

from __future__ import annotations

import heapq
from collections.abc import Callable, Collection, Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from enum import StrEnum
from functools import partial
from typing import Any

from modelkeeper.orchestrator.errors import NotPlaceable


@dataclass(frozen=True)
class Resident:
    """A model on a device, as placement sees it."""

    model_id: str
    bytes: int
    last_used: float
    loaded: bool = True  # False while loading or unloading: never evicted
    leased: bool = False
    keep_loaded: bool = False

    def evictable(self, force: bool) -> bool:
        return self.loaded and (force or not (self.leased or self.keep_loaded))


@dataclass(frozen=True)
class DeviceView:
    """One ready device: its budget, the bytes its models use, and what is on it."""

    id: str
    budget: int
    used: int
    residents: tuple[Resident, ...] = field(default_factory=tuple)
    loading: frozenset[str] = frozenset()  # model ids being loaded there now
    node: str = ""  # the host it belongs to, in a cluster
    busy_until: float = 0.0  # when the work queued on it ends, on the caller's clock; 0: idle

    @property
    def free(self) -> int:
        return self.budget - self.used

    def holds(self, model_id: str) -> bool:
        return model_id in self.loading or any(r.model_id == model_id for r in self.residents)

    def evictable(self, force: bool, keep: str) -> list[Resident]:
        """Models that may go to make room for ``keep``, least recently used first."""
        out = [r for r in self.residents if r.model_id != keep and r.evictable(force)]
        return sorted(out, key=lambda r: r.last_used)


def choose_device(devices: Sequence[DeviceView], model_id: str, need: int, *, force: bool = False) -> str:
    """The id of the device that should load ``model_id`` (``need`` bytes); see the module docstring."""
    if not devices:
        raise NotPlaceable("no worker is running", required_bytes=need)
    for d in devices:
        if d.holds(model_id):
            return d.id
    if all(d.budget < need for d in devices):
        budgets = {d.id: d.budget for d in devices}
        raise NotPlaceable(
            f"model {model_id} needs {need} bytes, more than the budget of any device ("
            + ", ".join(f"{d}: {b} bytes" for d, b in budgets.items())
            + ")",
            required_bytes=need,
            budgets=budgets,
        )
    fits = [d for d in devices if d.free >= need]
    if fits:
        return max(fits, key=lambda d: d.free).id
    after = {d.id: d.free + sum(r.bytes for r in d.evictable(force, model_id)) for d in devices}
    room = [d for d in devices if after[d.id] >= need]
    if room:
        return max(room, key=lambda d: after[d.id]).id
    held = {
        d.id: [r.model_id for r in d.residents if r.model_id != model_id and not r.evictable(force)]
        for d in devices
    }
    raise NotPlaceable(
        f"model {model_id} needs {need} bytes; no device has room even after evicting the models "
        "that are not leased or kept loaded ("
        + "; ".join(
            f"{d.id}: {after[d.id]} bytes, held by {', '.join(held[d.id]) or 'nothing'}" for d in devices
        )
        + "); unload a model, release its lease, or pass force",
        required_bytes=need,
        devices=after,
        held=sorted({m for ms in held.values() for m in ms}),
    )


def plan_eviction(
    device: DeviceView,
    model_id: str,
    need: int,
    *,
    force: bool = False,
    value: Callable[[Resident], float] | None = None,
) -> list[str]:
    """The models to unload from ``device`` so that ``model_id`` (``need`` bytes) fits; empty when
    it fits already. Least recently used first, or, given ``value``, least valuable first (ties by
    recency)."""
    if need > device.budget:
        raise NotPlaceable(
            f"model {model_id} needs {need} bytes; the budget of {device.id} is {device.budget} bytes",
            required_bytes=need,
            budget_bytes=device.budget,
            device=device.id,
        )
    if device.used + need <= device.budget:
        return []
    chosen: list[Resident] = []
    freed = 0
    candidates = device.evictable(force, model_id)
    if value is not None:
        candidates.sort(key=value)
    for r in candidates:
        if device.used + need - freed <= device.budget:
            break
        chosen.append(r)
        freed += r.bytes
    if device.used + need - freed > device.budget:
        held = [r.model_id for r in device.residents if r not in chosen and r.model_id != model_id]
        raise NotPlaceable(
            f"model {model_id} needs {need} bytes on {device.id}: {device.free} free of {device.budget}, "
            f"and the other models there are leased, kept loaded or busy ({', '.join(held) or 'none'}); "
            "unload one, release its lease, or pass force",
            required_bytes=need,
            free_bytes=device.free,
            device=device.id,
            held=held,
        )
    return [r.model_id for r in chosen]


# --- A cluster: devices grouped by node, with each node's RAM cache and disk -----------------------


class Tier(StrEnum):
    """Where a placement's bytes come from, as :class:`Bandwidths` prices them."""

    VRAM = "vram"  # already on the device, or being loaded there
    RAM = "ram"  # the node's RAM cache
    DISK = "disk"  # the node's own disk
    PEER_RAM = "peer_ram"  # another node's RAM cache, over the network
    PEER_DISK = "peer_disk"  # another node's disk, over the network


@dataclass(frozen=True)
class Bandwidths:
    """Bytes per second into a device from each tier; the defaults are measured (docs/CLUSTER.md)."""

    ram: float = 55e9
    disk: float = 2e9
    network: float = 12.5e9

    def seconds(self, tier: Tier, nbytes: int) -> float:
        """Estimated seconds to bring ``nbytes`` to a device from ``tier`` (a peer's bytes flow at
        the slower of its tier and the network)."""
        if tier is Tier.VRAM:
            return 0.0
        if tier is Tier.RAM:
            rate = self.ram
        elif tier is Tier.DISK:
            rate = self.disk
        else:
            rate = min(self.network, self.ram if tier is Tier.PEER_RAM else self.disk)
        return nbytes / rate


@dataclass(frozen=True)
class NodeView:
    """One host of a cluster: the models in its RAM cache and the files on its disk."""

    id: str
    ram_cached: frozenset[str] = frozenset()
    on_disk: frozenset[str] = frozenset()


@dataclass(frozen=True)
class Placement:
    """The answer of :func:`choose_placement`."""

    device: str
    node: str
    tier: Tier
    source: str  # the node the bytes come from ("" when already on the device)
    ready_s: float  # estimated seconds until the model is ready there: work queued ahead, then the load
    evict: tuple[str, ...] = ()  # models to unload from the device first


class ClusterView:
    """A cluster as placement sees it, kept indexed so that a decision never scans every device.

    Mutable on purpose: its owner (the driver's cluster state, or a simulator) reports each change
    (:meth:`put_device`, :meth:`drop_device`, :meth:`set_ram`, :meth:`set_disk`,
    :meth:`drop_node`) and the indexes follow: which devices hold each model (the idle ones apart,
    the busy ones in a heap by the end of their work), which nodes cache or store it, and which
    devices of each node are idle (``busy_until == 0``), the nodes bucketed by their number of idle
    devices. :meth:`of` builds one from plain views, for tests and one-off use. The indexes are
    insertion-ordered, so the same changes give the same answers.

    ``reload_weight`` prices a model's way back when choosing what to evict (see
    :func:`choose_placement`; 10, as the RAM cache weighs its refills, ``cache.store.COST_WEIGHT``);
    ``scan_nodes`` bounds how many nodes of a tier a decision compares.
    """

    def __init__(
        self, bandwidths: Bandwidths | None = None, *, reload_weight: float = 10.0, scan_nodes: int = 4
    ):
        self.bandwidths = bandwidths or Bandwidths()
        self.reload_weight = reload_weight
        self.scan_nodes = scan_nodes
        self._devices: dict[str, DeviceView] = {}
        self._holders: _Index = {}  # model -> devices holding or loading it
        self._idle_holders: _Index = {}  # model -> the idle ones of those
        self._busy_holders: dict[str, _Heap] = {}  # model -> (busy_until, device) of the busy ones
        self._ram: _Index = {}  # model -> nodes caching it in RAM
        self._disk: _Index = {}  # model -> nodes with its file
        self._node_ram: _Index = {}
        self._node_disk: _Index = {}
        self._node_devices: _Index = {}
        self._idle: _Index = {}  # node -> its idle devices
        self._by_idle: dict[int, dict[str, None]] = {}  # number of idle devices -> nodes
        self._budgets: dict[int, int] = {}  # budget -> number of devices with it
        self._busy: _Heap = []  # every busy device

    @classmethod
    def of(cls, devices: Sequence[DeviceView], nodes: Sequence[NodeView] = (), **options: Any) -> ClusterView:
        view = cls(**options)
        for d in devices:
            view.put_device(d)
        for n in nodes:
            for m in sorted(n.ram_cached):
                view.set_ram(n.id, m, True)
            for m in sorted(n.on_disk):
                view.set_disk(n.id, m, True)
        return view

    # reading

    def __len__(self) -> int:
        return len(self._devices)

    def device(self, device_id: str) -> DeviceView:
        return self._devices[device_id]

    def devices(self) -> list[DeviceView]:
        return list(self._devices.values())

    def node(self, node_id: str) -> NodeView:
        return NodeView(
            node_id,
            frozenset(self._node_ram.get(node_id, ())),
            frozenset(self._node_disk.get(node_id, ())),
        )

    def holders(self, model_id: str) -> Collection[str]:
        return self._holders.get(model_id, {}).keys()

    def ram_nodes(self, model_id: str) -> Collection[str]:
        """The nodes caching ``model_id`` in RAM, the first to cache it first."""
        return self._ram.get(model_id, {}).keys()

    def disk_nodes(self, model_id: str) -> Collection[str]:
        return self._disk.get(model_id, {}).keys()

    def max_budget(self) -> int:
        return max(self._budgets, default=0)

    def idle_holder(self, model_id: str) -> DeviceView | None:
        """An idle device holding ``model_id``, if any (O(1))."""
        first = next(iter(self._idle_holders.get(model_id, ())), None)
        return None if first is None else self._devices[first]

    def soonest_holder(self, model_id: str) -> DeviceView | None:
        """The busy device holding ``model_id`` whose work ends first (amortised O(log holders))."""
        heap = self._busy_holders.get(model_id, [])
        holders = self._holders.get(model_id, {})
        while heap:
            until, device_id = heap[0]
            d = self._devices.get(device_id)
            if d is not None and d.busy_until == until and device_id in holders:
                return d
            heapq.heappop(heap)
        return None

    def soonest_busy(self, count: int) -> list[DeviceView]:
        """The ``count`` busy devices whose work ends first (O(count log devices), amortised)."""
        heap, out = self._busy, dict[str, DeviceView]()
        while heap and len(out) < count:
            until, device_id = heapq.heappop(heap)
            d = self._devices.get(device_id)
            if d is not None and d.busy_until == until:
                out[device_id] = d
        for d in out.values():
            heapq.heappush(heap, (d.busy_until, d.id))
        return list(out.values())

    # changes

    def put_device(self, view: DeviceView) -> None:
        """Add a device, or replace what is known of it."""
        if view.id in self._devices:
            self.drop_device(view.id)
        self._devices[view.id] = view
        _add(self._node_devices, view.node, view.id)
        self._budgets[view.budget] = self._budgets.get(view.budget, 0) + 1
        for m in _models_on(view):
            _add(self._holders, m, view.id)
            if view.busy_until == 0:
                _add(self._idle_holders, m, view.id)
            else:
                holders = self._holders[m]
                _push(
                    self._busy_holders.setdefault(m, []),
                    (view.busy_until, view.id),
                    2 * len(holders) + 8,
                    partial(self._busy_entries, holders),
                )
        if view.busy_until == 0:
            self._set_idle(view.node, view.id, True)
        else:
            _push(self._busy, (view.busy_until, view.id), 2 * len(self._devices) + 64, self._busy_entries)

    def drop_device(self, device_id: str) -> None:
        view = self._devices.pop(device_id)
        _discard(self._node_devices, view.node, device_id)
        self._budgets[view.budget] -= 1
        if not self._budgets[view.budget]:
            del self._budgets[view.budget]
        for m in _models_on(view):
            _discard(self._holders, m, device_id)
            _discard(self._idle_holders, m, device_id)
        self._set_idle(view.node, device_id, False)

    def set_ram(self, node: str, model_id: str, cached: bool) -> None:
        self._set(self._ram, self._node_ram, node, model_id, cached)

    def set_disk(self, node: str, model_id: str, present: bool) -> None:
        self._set(self._disk, self._node_disk, node, model_id, present)

    def drop_node(self, node: str) -> None:
        """Forget a node (lost or removed): its devices, its RAM cache, its files."""
        for d in list(self._node_devices.get(node, {})):
            self.drop_device(d)
        self._node_devices.pop(node, None)
        self._idle.pop(node, None)
        for m in self._node_ram.pop(node, {}):
            _discard(self._ram, m, node)
        for m in self._node_disk.pop(node, {}):
            _discard(self._disk, m, node)

    def _busy_entries(self, among: Iterable[str] | None = None) -> _Heap:
        """Fresh heap entries of the busy devices (of ``among``), to replace stale ones."""
        devices = self._devices.values() if among is None else map(self._devices.__getitem__, among)
        return [(d.busy_until, d.id) for d in devices if d.busy_until]

    @staticmethod
    def _set(by_model: _Index, by_node: _Index, node: str, model_id: str, present: bool) -> None:
        if present:
            _add(by_model, model_id, node)
            _add(by_node, node, model_id)
        else:
            _discard(by_model, model_id, node)
            _discard(by_node, node, model_id)

    def _set_idle(self, node: str, device_id: str, idle: bool) -> None:
        devices = self._idle.setdefault(node, {})
        before = len(devices)
        if idle:
            devices[device_id] = None
        else:
            devices.pop(device_id, None)
        after = len(devices)
        if after == before:
            return
        if before:
            bucket = self._by_idle[before]
            del bucket[node]
            if not bucket:
                del self._by_idle[before]
        if after:
            self._by_idle.setdefault(after, {})[node] = None

    # helpers of choose_placement

    def idle_nodes(self, among: Collection[str] | None) -> Iterator[str]:
        """Nodes with an idle device, most idle devices first (then by name when ``among`` is
        small), restricted to ``among`` when given."""
        if among is not None and len(among) <= 4 * self.scan_nodes:
            ranked = [n for n in among if self._idle.get(n)]
            ranked.sort(key=lambda n: (-len(self._idle[n]), n))
            yield from ranked
            return
        for count in sorted(self._by_idle, reverse=True):
            for n in self._by_idle[count]:
                if among is None or n in among:
                    yield n

    def tier_at(self, node: str, model_id: str) -> Tier:
        """The fastest tier ``model_id`` would come from to a device of ``node`` (a peer's RAM
        cache over the network beats the node's own disk)."""
        ram, disk = self._ram.get(model_id), self._disk.get(model_id)
        if ram and node in ram:
            return Tier.RAM
        local = disk is not None and node in disk
        bw = self.bandwidths
        if ram and (not local or min(bw.network, bw.ram) > bw.disk):
            return Tier.PEER_RAM
        return Tier.DISK if local else Tier.PEER_DISK

    def eviction_value(self, node: str) -> Callable[[Resident], float]:
        """How much a resident of ``node`` is worth keeping: its last use, plus ``reload_weight``
        times the seconds it would take to bring back from the best tier left to it."""
        weight, bw = self.reload_weight, self.bandwidths
        known: dict[str, float] = {}

        def value(r: Resident) -> float:
            v = known.get(r.model_id)
            if v is None:
                v = known[r.model_id] = r.last_used + weight * bw.seconds(
                    self.tier_at(node, r.model_id), r.bytes
                )
            return v

        return value

    def best_device(
        self, among: Collection[str] | None, model_id: str, need: int, force: bool
    ) -> tuple[DeviceView, tuple[str, ...]] | None:
        """The idle device of the nodes ``among`` (all nodes: None) that takes ``model_id`` at the
        least cost: the most free budget where it fits as is; else the device whose most valuable
        victim is least valuable. Looks at ``scan_nodes`` nodes at most, those with the most idle
        devices first."""
        best: tuple[tuple[int, float], DeviceView, tuple[str, ...]] | None = None
        for scanned, node in enumerate(self.idle_nodes(among)):
            if scanned >= self.scan_nodes:
                break
            value = self.eviction_value(node)
            for device_id in self._idle[node]:
                d = self._devices[device_id]
                if d.budget < need:
                    continue
                if d.free >= need:
                    key: tuple[int, float] = (0, -d.free)
                    victims: tuple[str, ...] = ()
                else:
                    try:
                        victims = tuple(plan_eviction(d, model_id, need, force=force, value=value))
                    except NotPlaceable:
                        continue
                    by_id = {r.model_id: r for r in d.residents}
                    key = (1, max(value(by_id[v]) for v in victims))
                if best is None or key < best[0]:
                    best = (key, d, victims)
        return None if best is None else (best[1], best[2])


_Index = dict[str, dict[str, None]]  # key -> an insertion-ordered set
_Heap = list[tuple[float, str]]  # (busy_until, device), lazy: stale entries are skipped, then rebuilt


def _models_on(view: DeviceView) -> list[str]:
    on = [r.model_id for r in view.residents]
    return on + sorted(view.loading.difference(on))


def _push(
    heap: _Heap,
    entry: tuple[float, str],
    limit: int,
    fresh: Callable[[], _Heap],
) -> None:
    """Push onto a lazy heap; past ``limit`` entries (stale ones pile up), rebuild it from ``fresh``."""
    heapq.heappush(heap, entry)
    if len(heap) > limit:
        heap[:] = fresh()
        heapq.heapify(heap)


def _add(index: _Index, key: str, item: str) -> None:
    index.setdefault(key, {})[item] = None


def _discard(index: _Index, key: str, item: str) -> None:
    items = index.get(key)
    if items is not None:
        items.pop(item, None)
        if not items:
            del index[key]


def choose_placement(
    cluster: ClusterView, model_id: str, need: int, *, now: float = 0.0, force: bool = False
) -> Placement:
    """Where ``model_id`` (``need`` bytes) should be served from now: the candidate with the least
    estimated time to ready.

    Candidates, in the order of the tiers: the devices already holding it (ready when their queued
    work ends); an idle device of a node caching it in RAM; one of a node with its file; then an
    idle device of any node, fed by a peer (from a peer's RAM cache if one has it, else its disk).
    A candidate is priced by ``busy_until - now`` plus the load at :class:`Bandwidths`, so a copy
    is loaded beside a busy holder only when that is faster than waiting for it, and a peer's RAM
    cache over the network (12.5 GB/s) beats a local disk (2 GB/s). Among a tier's idle devices:
    the most free budget where the model fits as is; else the device with the cheapest eviction.

    Least valuable, for eviction, means the smallest ``last_used + reload_weight x seconds to bring
    it back`` (from the node's RAM cache if it is there, else its disk, else a peer): a model that
    stays in the RAM cache costs little to evict, one that would come back from disk is kept as if
    used ``reload_weight`` times its disk time later. Leased and kept-loaded models stay unless
    ``force``.

    Cost per decision: the holders of the model, plus at most ``scan_nodes`` nodes per tier; only
    when no device is idle does it scan all devices (the one with the earliest end of work).
    """
    if not len(cluster):
        raise NotPlaceable("no worker is running", required_bytes=need)
    if need > cluster.max_budget():
        raise NotPlaceable(
            f"model {model_id} needs {need} bytes, more than the budget of any device "
            f"(the largest is {cluster.max_budget()} bytes)",
            required_bytes=need,
        )
    bw = cluster.bandwidths
    idle = cluster.idle_holder(model_id)
    if idle is not None:
        return Placement(idle.id, idle.node, Tier.VRAM, "", 0.0)
    best: Placement | None = None
    soonest = cluster.soonest_holder(model_id)
    if soonest is not None:
        best = Placement(soonest.id, soonest.node, Tier.VRAM, "", max(0.0, soonest.busy_until - now))
    ram, disk = cluster.ram_nodes(model_id), cluster.disk_nodes(model_id)
    if not (ram or disk or best):
        raise NotPlaceable(f"model {model_id}: no node has its file or caches it", required_bytes=need)
    peer = Tier.PEER_RAM if ram else Tier.PEER_DISK
    tiers: list[tuple[Tier, Collection[str] | None]] = [(Tier.RAM, ram), (Tier.DISK, disk), (peer, None)]
    tiers.sort(key=lambda t: bw.seconds(t[0], need))
    for tier, among in tiers if ram or disk else []:
        if (among is not None and not among) or (best is not None and best.ready_s <= bw.seconds(tier, need)):
            continue
        found = cluster.best_device(among, model_id, need, force)
        if found is None:
            continue
        d, victims = found
        actual = cluster.tier_at(d.node, model_id)
        ready = bw.seconds(actual, need)
        if best is None or ready < best.ready_s:
            best = Placement(d.id, d.node, actual, _source(d.node, actual, ram, disk), ready, victims)
    if best is not None:
        return best
    return _soonest_device(cluster, model_id, need, now, force)


def _source(node: str, tier: Tier, ram: Collection[str], disk: Collection[str]) -> str:
    if tier in (Tier.RAM, Tier.DISK):
        return node
    return next(iter(ram if tier is Tier.PEER_RAM else disk))


def _soonest_device(cluster: ClusterView, model_id: str, need: int, now: float, force: bool) -> Placement:
    """No idle device takes the model: the busy one where it is ready first, among the
    ``8 x scan_nodes`` whose work ends first; only if none of those has room, every device."""
    for devices in (cluster.soonest_busy(8 * cluster.scan_nodes), cluster.devices()):
        best = _readiest(cluster, devices, model_id, need, now, force)
        if best is not None:
            return best
    raise NotPlaceable(
        f"model {model_id} needs {need} bytes; no device has room even after evicting the models "
        "that are not leased or kept loaded; unload a model, release its lease, or pass force",
        required_bytes=need,
    )


def _readiest(
    cluster: ClusterView, devices: Iterable[DeviceView], model_id: str, need: int, now: float, force: bool
) -> Placement | None:
    ram, disk = cluster.ram_nodes(model_id), cluster.disk_nodes(model_id)
    best: Placement | None = None
    for d in devices:
        if d.budget < need:
            continue
        tier = cluster.tier_at(d.node, model_id)
        ready = max(0.0, d.busy_until - now) + cluster.bandwidths.seconds(tier, need)
        if best is not None and (ready, d.id) >= (best.ready_s, best.device):
            continue
        try:
            victims = plan_eviction(d, model_id, need, force=force, value=cluster.eviction_value(d.node))
        except NotPlaceable:
            continue
        best = Placement(d.id, d.node, tier, _source(d.node, tier, ram, disk), ready, tuple(victims))
    return best
