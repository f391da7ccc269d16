"""The cluster catalog: every model any node has, by cluster key, with where it lies.

Each node's registry keeps its own ids; the cluster key is the file's content hash (BLAKE3) or
``name:<name>`` until hashed (see ``agent.cluster_key``). The catalog is rebuilt from the cluster
view; a reference resolves by key, by a node's own id, by name (case-insensitive) or by a hash
prefix (BLAKE3 or SHA-256, six hex digits or more), as on one host, or by a path relative to a
model root (``checkpoints/x.safetensors``) on any node.
"""

from __future__ import annotations

import string
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any, Protocol

from modelkeeper.cluster.view import ClusterState
from modelkeeper.protocol.errors import ErrorCode, ProtocolError
from modelkeeper.registry.errors import AmbiguousReference, ModelNotFound

HEX = set(string.hexdigits.lower())


@dataclass
class ClusterModel:
    """One model of the cluster: what its first node says of it, and its copy on each node."""

    key: str
    name: str
    type: str
    need: int  # bytes its loadable components take on a device
    size: int
    info: dict[str, Any]
    locations: dict[str, dict[str, Any]] = field(default_factory=dict)  # node -> model_id, path, ram_bytes

    @property
    def id(self) -> str:
        """Its cluster key: what the cluster's answers name it by (as a record's id on one host)."""
        return self.key

    @property
    def handle(self) -> str:
        return self.name

    def local_id(self, node: str) -> str:
        return str(self.locations[node]["model_id"])

    def summary(self) -> dict[str, Any]:
        return {
            **{k: self.info.get(k) for k in ("type", "base", "variant", "format", "size", "path", "tags")},
            "id": self.key,
            "handle": self.name,
            "name": self.name,
            "status": "ok",
            "nodes": {
                n: {"model_id": loc["model_id"], "path": loc["path"], "ram_bytes": loc["ram_bytes"]}
                for n, loc in self.locations.items()
            },
        }


class Records(Protocol):
    """User metadata kept in the nodes' registries (``records.ClusterRecords``)."""

    async def metadata(self, model: ClusterModel) -> dict[str, Any]: ...

    async def set_metadata(self, model: ClusterModel, values: dict[str, Any]) -> dict[str, Any]: ...


class ClusterCatalog:
    def __init__(self, view: ClusterState) -> None:
        self.view = view
        #: A rescan of every node (set by the service: ``remote.scan_nodes``).
        self.scanner: Callable[..., Awaitable[dict[str, Any]]] | None = None
        #: User metadata on the nodes' registries (set by the service: ``records.ClusterRecords``).
        self.records: Records | None = None

    async def scan(self, *, wait: bool = True, hash: bool = True) -> dict[str, Any]:
        """Rescan every node's model roots (``POST /api/model/cache/refresh``): a job."""
        if self.scanner is None:
            raise ProtocolError("no node to scan", ErrorCode.INVALID_REQUEST)
        return await self.scanner(wait=wait, hash=hash)

    async def metadata(self, ref: str) -> dict[str, Any]:
        """A model's user metadata, as its nodes' registries keep it (``records.py``)."""
        return await self._records().metadata(self.find(ref))

    async def set_metadata(self, ref: str, values: dict[str, Any]) -> dict[str, Any]:
        """Set user metadata on every node with the model, or on none (``records.py``)."""
        return await self._records().set_metadata(self.find(ref), values)

    def _records(self) -> Records:
        if self.records is None:
            raise ProtocolError("no node registry to read", ErrorCode.INVALID_REQUEST)
        return self.records

    async def resolve(self, ref: str) -> ClusterModel:
        """``find``, awaitable as the single-host catalog's ``resolve`` is."""
        return self.find(ref)

    def models(self) -> dict[str, ClusterModel]:
        out: dict[str, ClusterModel] = {}
        for node in self.view.nodes.values():
            for m in node.state["models"]:
                entry = out.get(m["key"])
                if entry is None:
                    entry = out[m["key"]] = ClusterModel(
                        m["key"], m["name"], m["type"], int(m["need"]), int(m["size"]), m
                    )
                entry.locations[node.name] = {k: m[k] for k in ("model_id", "path", "ram_bytes")}
        return out

    def find(self, ref: str) -> ClusterModel:
        """A model by key, a node's id, name or hash prefix (see the module docstring)."""
        ref = ref.strip()
        models = self.models()
        if ref in models:
            return models[ref]
        lower = ref.lower()
        finders: tuple[Callable[[ClusterModel], bool], ...] = (
            lambda m: any(loc["model_id"] == ref for loc in m.locations.values()),
            lambda m: m.name.lower() == lower,
            lambda m: "/" in ref and any(str(loc["path"]).endswith("/" + ref.strip("/")) for loc in m.locations.values()),
            lambda m: len(lower) >= 6 and set(lower) <= HEX and (
                m.key.startswith(lower) or str(m.info.get("sha256") or "").startswith(lower)
            ),
        )  # fmt: skip
        for match in finders:
            found = [m for m in models.values() if match(m)]
            if len(found) == 1:
                return found[0]
            if len(found) > 1:
                raise AmbiguousReference(
                    f"{ref!r} matches {len(found)} models of the cluster", matches=[m.key for m in found][:20]
                )
        raise ModelNotFound(
            f"no model of the cluster matches {ref!r} (by key, id, name or hash prefix)", ref=ref
        )
