"""User metadata and the components listing in cluster mode: registry operations on the nodes.

There is no registry on the driver: each node's registry holds its models, their user metadata
and their components, and the driver's catalog is built from the nodes' states (``catalog.py``).
So these run on the node registries through the single-host parts (``NodeAgent.PARTS``:
``catalog.metadata``, ``catalog.set_metadata``, ``views.components``), and answer in cluster names.

- **Reading** metadata asks the first node (by name) with the model.
- **Writing** sets the values on every node with the model, through the node catalog's own
  ``set_metadata``: its checks hold as on one host (the parts pinned in
  ``default_settings.parts`` must resolve and fit in that node's registry, ``IncompatiblePart``
  otherwise). A node that refuses undoes the write on the nodes already written (their earlier
  values set again) and the error names it: the cluster keeps one set of metadata per model. A
  node that receives a model's file from another (``receive.py``) gets its metadata along
  (``copy``; parts pinned that it cannot resolve are left out there).
- **Components**: every node's listing merged, one entry per content id (per model and component
  while unhashed), models by cluster key, ``nodes`` the nodes holding it, ``cached`` true when any
  node's RAM cache holds it.
"""

from __future__ import annotations

import asyncio
import contextlib
from typing import Any

from modelkeeper.cluster.catalog import ClusterModel
from modelkeeper.cluster.remote import Remote
from modelkeeper.protocol.errors import ProtocolError
from modelkeeper.registry.records import META_KEYS


class ClusterRecords:
    def __init__(self, remote: Remote) -> None:
        self.remote = remote

    async def _read(self, model: ClusterModel, node: str) -> dict[str, Any]:
        out: dict[str, Any] = await self.remote.call(
            node, "catalog", "metadata", model.local_id(node), refresh=False,
            what=f"the metadata of {model.name} on {node}",
        )  # fmt: skip
        return out

    async def metadata(self, model: ClusterModel) -> dict[str, Any]:
        out = await self._read(model, min(model.locations))
        return {**out, "model_id": model.key}

    async def set_metadata(self, model: ClusterModel, values: dict[str, Any]) -> dict[str, Any]:
        """``values`` set on every node with the model, or on none (see the module docstring)."""
        written: dict[str, dict[str, Any]] = {}  # node -> its values before
        out: dict[str, Any] = {}
        for node in sorted(model.locations):
            before = await self._read(model, node)
            try:
                out = await self._write(model, node, values)
            except ProtocolError as exc:
                await self._undo(model, written)
                exc.details.setdefault("node", node)
                exc.message = f"on {node}: {exc.message}"
                exc.args = (exc.message,)
                raise
            written[node] = {k: before[k] for k in values if k in before}
        self.remote.loads.bus.publish("model.metadata", model_id=model.key, keys=sorted(values))
        return {**out, "model_id": model.key}

    async def _write(
        self, model: ClusterModel, node: str, values: dict[str, Any], local_id: str | None = None
    ) -> dict[str, Any]:
        out: dict[str, Any] = await self.remote.call(
            node, "catalog", "set_metadata", local_id or model.local_id(node), values,
            what=f"the metadata of {model.name} written on {node}",
        )  # fmt: skip
        return out

    async def copy(self, model: ClusterModel, source: str, target: str, local_id: str) -> None:
        """``model``'s user metadata on ``source`` set on ``target``, which has just received its
        file (as ``local_id``): parts pinned that ``target`` cannot resolve are left out there."""
        before = await self._read(model, source)
        values = {k: before[k] for k in META_KEYS if k in before}
        try:
            await self._write(model, target, values, local_id)
        except ProtocolError:
            values.pop("default_settings", None)
            with contextlib.suppress(ProtocolError):
                await self._write(model, target, values, local_id)

    async def _undo(self, model: ClusterModel, written: dict[str, dict[str, Any]]) -> None:
        for node, before in written.items():
            with contextlib.suppress(ProtocolError):  # a node lost meanwhile keeps the new values
                await self._write(model, node, before)

    async def components(self, type: str | None = None) -> list[dict[str, Any]]:
        """Every node's components listing merged (see the module docstring)."""
        nodes = sorted(self.remote.members.links)

        async def one(node: str) -> list[dict[str, Any]]:
            out: list[dict[str, Any]] = await self.remote.call(
                node, "views", "components", type, refresh=False, what=f"the components of {node}"
            )
            return out

        merged: dict[str, dict[str, Any]] = {}
        for node, entries in zip(nodes, await asyncio.gather(*(one(n) for n in nodes)), strict=True):
            key_of = self.remote.key_of(node)
            for e in entries:
                uses = [{**u, "model_id": key_of(u["model_id"])} for u in e["models"]]
                ident = e["component_id"] or f"{uses[0]['model_id']}/{uses[0]['component']}"
                entry = merged.setdefault(ident, {**e, "models": [], "nodes": [], "cached": False})
                entry["nodes"].append(node)
                entry["cached"] = entry["cached"] or bool(e["cached"])
                entry["models"].extend(u for u in uses if u not in entry["models"])
        return list(merged.values())
