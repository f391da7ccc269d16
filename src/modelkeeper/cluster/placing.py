"""Cluster placement: the tiered policy of ``orchestrator/placement_tiers.py``, fed the cluster state.

The driver keeps no policy of its own. For each decision :func:`tiered_view` rebuilds a tiered
:class:`~modelkeeper.orchestrator.tiers.ClusterView` from the driver's :class:`ClusterState` (what
the agents last reported: ready devices as ``node/device`` with their residents, leases and loads
in flight; each node's RAM cache and files by cluster key), and
:func:`~modelkeeper.orchestrator.placement_tiers.choose_placement` answers. Rebuilt, not kept
incrementally: the state itself is replaced wholesale on every agent refresh (which precedes each
decision), and at a driver's sizes (tens of devices) the rebuild costs far less than that refresh;
the index's incremental upkeep pays off in ``benchmarks/cluster_sim.py`` at 1,000 nodes.

So the order is the policy's: a device already holding or loading the model; else a device of a
node caching it in RAM; else of a node with its file; else any device, fed by a peer; within a
tier the most free budget where it fits, else the cheapest eviction (leased and kept-loaded models
stay unless ``force``). The driver's agents report no queued work, so every device counts as idle
(``busy_until`` 0) and the answer is the fastest tier with room.

Parts shared on a device (docs/PARTS.md) count once, as on one host: each resident carries the
parts it shares (its node's share keys, in cluster terms: ``keys.cluster_share``), and a load
passes the parts it would share (``wants``, from ``ClusterLoads.demand``), so a device whose
residents hold them needs room only for the rest, and evicting a resident frees a shared part
only with its last holder.

Specific to the cluster here: :data:`SENT_FILES`, the bandwidths of what the driver can do, and
naming every device and what holds it when nothing fits. The policy's ``evict`` plan is not
forwarded: the chosen node's own ``plan_eviction`` picks what to evict there.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping

from modelkeeper.cluster.view import ClusterState
from modelkeeper.orchestrator.errors import NotPlaceable
from modelkeeper.orchestrator.placement import DeviceView
from modelkeeper.orchestrator.placement_tiers import Placement, choose_placement
from modelkeeper.orchestrator.tiers import Bandwidths, ClusterView, NodeView

#: A node lacking a model's file gets it sent from a peer (``ClusterLoads.bring``: read from the
#: peer's file, written to this node's disk, then loaded from there), not streamed from the peer's
#: RAM cache; so a peer is priced no faster than the node's own disk, and a local file wins over a
#: peer's RAM cache (which the measured defaults, 12.5 GB/s network over a 2 GB/s disk, would prefer).
SENT_FILES = Bandwidths(network=Bandwidths().disk)


def tiered_view(
    state: ClusterState,
    leased: Callable[[str, str], bool],
    loading: Iterable[tuple[str, str]] = (),
) -> ClusterView:
    """The tiered policy's view of the cluster now, rebuilt from ``state``; ``leased`` and
    ``loading`` as for :meth:`ClusterState.device_views`."""
    devices = state.device_views(leased, loading)
    nodes = [NodeView(n.name, n.ram_keys(), n.disk_keys()) for n in state.nodes.values()]
    return ClusterView.of(devices, nodes, bandwidths=SENT_FILES)


def choose_cluster_placement(
    view: ClusterView, key: str, need: int, *, force: bool = False, wants: Mapping[str, int] | None = None
) -> Placement:
    """Where ``key`` (``need`` bytes, of which ``wants``: its shareable parts by share key) goes:
    the policy's answer, its device named ``node/device``. When nothing fits, the error names every
    device, its free bytes and what holds it."""
    if not len(view):
        raise NotPlaceable("no node of the cluster has a ready device", required_bytes=need)
    try:
        return choose_placement(view, key, need, force=force, wants=wants)
    except NotPlaceable as exc:
        devices = view.devices()
        raise NotPlaceable(
            f"{exc.message} (devices: " + "; ".join(_holding(d, key, force) for d in devices) + ")",
            **{**exc.details, "devices": {d.id: d.free for d in devices}},
        ) from exc


def _holding(device: DeviceView, key: str, force: bool) -> str:
    held = [r.model_id for r in device.residents if r.model_id != key and not r.evictable(force)]
    return f"{device.id}: {device.free} of {device.budget} bytes free, held by {', '.join(held) or 'nothing'}"
