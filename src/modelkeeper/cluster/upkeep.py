"""Reconcile and the memory route in cluster mode, run on the nodes (``service.recovery``).

The single-host ``Recovery`` of each node does the work (``NodeAgent.PARTS``: ``reconcile`` and
``optimize_memory``, the same code as on one host); the driver picks the devices, passes the
leases it holds on them, and answers in cluster names: ``node/device``, models by cluster key,
a worker's component names as ``<cluster key>/<component>``.

- ``reconcile(device)``: ``node/device`` reconciles one device, a node's name every device of that
  node, ``*`` every device of the cluster; the lists are merged, each device's own under ``devices``.
- ``optimize_memory(device, ...)``: on one ``node/device``; models leased on the driver are kept
  as those leased on one host are.
"""

from __future__ import annotations

import asyncio
from typing import Any

from modelkeeper.cluster.remote import Remote
from modelkeeper.cluster.view import device_id, split_device

#: The ``device`` of ``reconcile`` that names every device of the cluster.
EVERY = "*"


class ClusterRecovery:
    def __init__(self, remote: Remote) -> None:
        self.remote = remote

    def targets(self, device: str) -> list[tuple[str, str]]:
        """(node, local device) pairs named by ``device``: ``node/device``, a node, or ``*``."""
        if device == EVERY:
            return [(n.name, d["id"]) for n, d in self.remote.view.devices()]
        node, local = split_device(device)
        if node:
            self.remote.loads.check_device(device)
            return [(node, local)]
        self.remote.members.link(device)  # DeviceNotFound naming the nodes when there is none
        return [(n.name, d["id"]) for n, d in self.remote.view.devices() if n.name == device]

    async def reconcile(self, device: str) -> dict[str, Any]:
        """Each device's view made to match its worker (see the module docstring)."""

        async def one(node: str, local: str) -> tuple[str, dict[str, Any]]:
            out = await self.remote.call(node, "recovery", "reconcile", local, what=f"a reconcile on {node}")
            key_of = self.remote.key_of(node)
            named = {
                "lost": [key_of(m) for m in out["lost"]],
                "adopted": [self.remote.worker_name(node, n) for n in out["adopted"]],
                "unmanaged": [self.remote.worker_name(node, n) for n in out["unmanaged"]],
            }
            return device_id(node, local), named

        done = dict(await asyncio.gather(*(one(n, d) for n, d in self.targets(device))))
        merged = {k: [x for r in done.values() for x in r[k]] for k in ("lost", "adopted", "unmanaged")}
        return {**merged, "devices": done}

    async def optimize_memory(
        self, device: str, target_free_mb: float | None = None, *, timeout: float | None = None
    ) -> dict[str, Any]:
        """The memory route on the node of ``device`` (``node/device``), in cluster names."""
        self.remote.loads.check_device(device)
        node, local = split_device(device)
        out = await self.remote.call(
            node, "recovery", "optimize_memory", local, target_free_mb, timeout=timeout,
            held=(local, self.remote.loads.held_on(node, device)), what=f"freeing memory on {device}",
        )  # fmt: skip
        key_of = self.remote.key_of(node)
        return {
            **out,
            "device": device,
            "unloaded": [self.remote.worker_name(node, n) for n in out["unloaded"]],
            "lost": [key_of(m) for m in out["lost"]],
            "kept": [self.remote.worker_name(node, n) for n in out["kept"]],
        }
