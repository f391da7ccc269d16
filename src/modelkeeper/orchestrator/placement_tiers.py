"""Tiered placement across a cluster: where a model should be served from now. A pure policy.

:func:`choose_placement` answers from a :class:`~modelkeeper.orchestrator.tiers.ClusterView` with
a :class:`Placement`: the device, the tier its bytes come from (VRAM, the node's RAM cache, its
disk, a peer's RAM cache or disk), and what to evict there. The cluster driver
(``cluster/placing.py``) and ``benchmarks/cluster_sim.py`` both place with it; within a device it
evicts through the single-host :func:`~modelkeeper.orchestrator.placement.plan_eviction`.
"""

from __future__ import annotations

from collections.abc import Collection, Iterable, Mapping
from dataclasses import dataclass

from modelkeeper.orchestrator.errors import NotPlaceable
from modelkeeper.orchestrator.placement import STREAM_IT, DeviceView, plan_eviction
from modelkeeper.orchestrator.tiers import ClusterView, Tier
from modelkeeper.sizes import format_size


@dataclass(frozen=True)
class Placement:
    """The answer of :func:`choose_placement`."""

    device: str
    node: str
    tier: Tier
    source: str  # the node the bytes come from ("" when already on the device)
    ready_s: float  # estimated seconds until the model is ready there: work queued ahead, then the load
    evict: tuple[str, ...] = ()  # models to unload from the device first


def choose_placement(
    cluster: ClusterView,
    model_id: str,
    need: int,
    *,
    now: float = 0.0,
    force: bool = False,
    wants: Mapping[str, int] | None = None,
) -> Placement:
    """Where ``model_id`` (``need`` bytes, of which ``wants``: its shareable parts by share key)
    should be served from now: the candidate with the least estimated time to ready.

    Candidates, in the order of the tiers: the devices already holding it (ready when their queued
    work ends); an idle device of a node caching it in RAM; one of a node with its file; then an
    idle device of any node, fed by a peer (from a peer's RAM cache if one has it, else its disk).
    A candidate is priced by ``busy_until - now`` plus the load at :class:`Bandwidths`, so a copy
    is loaded beside a busy holder only when that is faster than waiting for it, and a peer's RAM
    cache over the network (12.5 GB/s) beats a local disk (2 GB/s). Among a tier's idle devices:
    the most free budget where the model fits as is; else the device with the cheapest eviction.

    Room is counted as on one host (:mod:`.placement`): a part of ``wants`` that a resident of a
    device holds takes no room there, and a shared part is freed only with its last holder.

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
            f"model {model_id} needs {format_size(need)}, more than the budget of any device "
            f"(the largest is {format_size(cluster.max_budget())}); {STREAM_IT}",
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
        found = cluster.best_device(among, model_id, need, force, wants)
        if found is None:
            continue
        d, victims = found
        actual = cluster.tier_at(d.node, model_id)
        ready = bw.seconds(actual, need)
        if best is None or ready < best.ready_s:
            best = Placement(d.id, d.node, actual, _source(d.node, actual, ram, disk), ready, victims)
    if best is not None:
        return best
    return _soonest_device(cluster, model_id, need, now, force, wants)


def _source(node: str, tier: Tier, ram: Collection[str], disk: Collection[str]) -> str:
    if tier in (Tier.RAM, Tier.DISK):
        return node
    return next(iter(ram if tier is Tier.PEER_RAM else disk))


def _soonest_device(
    cluster: ClusterView, model_id: str, need: int, now: float, force: bool, wants: Mapping[str, int] | None
) -> Placement:
    """No idle device takes the model: the busy one where it is ready first, among the
    ``8 x scan_nodes`` whose work ends first; only if none of those has room, every device."""
    for devices in (cluster.soonest_busy(8 * cluster.scan_nodes), cluster.devices()):
        best = _readiest(cluster, devices, model_id, need, now, force, wants)
        if best is not None:
            return best
    raise NotPlaceable(
        f"model {model_id} needs {format_size(need)}; no device has room even after evicting the models "
        "that are not leased or kept loaded; unload a model, release its lease, or pass force",
        required_bytes=need,
    )


def _readiest(
    cluster: ClusterView,
    devices: Iterable[DeviceView],
    model_id: str,
    need: int,
    now: float,
    force: bool,
    wants: Mapping[str, int] | None,
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
            victims = plan_eviction(
                d, model_id, need, force=force, value=cluster.eviction_value(d.node), wants=wants
            )
        except NotPlaceable:
            continue
        best = Placement(d.id, d.node, tier, _source(d.node, tier, ram, disk), ready, tuple(victims))
    return best
