"""A cluster as the tiered placement sees it: devices grouped by node, each node's RAM cache and disk.

:class:`ClusterView` is the index :func:`~modelkeeper.orchestrator.placement_tiers.choose_placement`
answers from: :class:`~modelkeeper.orchestrator.placement.DeviceView`s with their node set, which
nodes cache each model in RAM (:class:`NodeView`) and which have its file, kept indexed as the view
changes so that a decision never scans every device. :class:`Tier` names where a placement's bytes
come from and :class:`Bandwidths` prices each tier. Pure: no I/O, no clock.
"""

from __future__ import annotations

import heapq
from collections.abc import Callable, Collection, Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from enum import StrEnum
from functools import partial
from typing import Any

from modelkeeper.orchestrator.errors import NotPlaceable
from modelkeeper.orchestrator.placement import DeviceView, Resident, held_already, plan_eviction


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
        self,
        among: Collection[str] | None,
        model_id: str,
        need: int,
        force: bool,
        wants: Mapping[str, int] | None = None,
    ) -> tuple[DeviceView, tuple[str, ...]] | None:
        """The idle device of the nodes ``among`` (all nodes: None) that takes ``model_id`` at the
        least cost: the most free budget where it fits as is; else the device whose most valuable
        victim is least valuable. Looks at ``scan_nodes`` nodes at most, those with the most idle
        devices first. ``wants``: the model's shareable parts (share key -> bytes, of ``need``),
        which take no room on a device whose residents hold them already (as on one host)."""
        wanted = wants or {}
        best: tuple[tuple[int, float], DeviceView, tuple[str, ...]] | None = None
        for scanned, node in enumerate(self.idle_nodes(among)):
            if scanned >= self.scan_nodes:
                break
            value = self.eviction_value(node)
            for device_id in self._idle[node]:
                d = self._devices[device_id]
                if d.budget < need:
                    continue
                if d.free + held_already(d.residents, (), wanted) >= need:
                    key: tuple[int, float] = (0, -d.free)
                    victims: tuple[str, ...] = ()
                else:
                    try:
                        victims = tuple(
                            plan_eviction(d, model_id, need, force=force, value=value, wants=wanted)
                        )
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
