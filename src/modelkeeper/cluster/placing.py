"""Cluster placement: which device takes a model, the tiers first. Pure, fed the cluster view.

The order: a device already holding (or loading) the model; else a device of a node that holds it
in its RAM cache; else one of a node with its file; else, anywhere, the device the single-host
policy picks (most free room, then most room after evicting unleased, not-kept models). Within a
tier the single-host :func:`choose_device` decides; a tier where nothing fits is passed over.

This is the one function to swap for the tiered policy of ``orchestrator/placement.py`` once it
lands there.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

from modelkeeper.orchestrator.errors import NotPlaceable
from modelkeeper.orchestrator.placement import DeviceView, choose_device


def choose_cluster_device(
    devices: Sequence[DeviceView],
    node_of: Callable[[str], str],
    key: str,
    need: int,
    *,
    ram_nodes: Sequence[str],
    disk_nodes: Sequence[str],
    force: bool = False,
) -> str:
    """The ``node/device`` id that should load ``key`` (``need`` bytes); see the module docstring."""
    for d in devices:
        if d.holds(key):
            return d.id
    for tier in (ram_nodes, disk_nodes):
        subset = [d for d in devices if node_of(d.id) in tier]
        if subset:
            try:
                return choose_device(subset, key, need, force=force)
            except NotPlaceable:
                continue
    return choose_device(devices, key, need, force=force)
