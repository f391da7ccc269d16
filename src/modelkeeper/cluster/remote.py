"""The RAM cache, validate / benchmark / optimize and LoRAs in cluster mode, routed to the nodes.

Each part offers the methods the API routes call on one host (``service.feed``,
``service.operations``, ``service.loras``) and runs them on the node agents holding the model,
through the same orchestrator parts there (``NodeAgent.call`` / ``stream``: no fork). The driver
turns names both ways: a model's cluster key to each node's own id, ``node/device`` to the node's
device, and back in the answers. A job runs on the driver; the node's own job is streamed into it
(its progress, stage and bytes, as on one host).

- :class:`ClusterFeed`: the cache listing is per node (``nodes``) and in sum; a segment is named
  ``node/component``; ``cache_model`` caches on the nodes with the model's file, or on the node
  named (the file sent there first when it lacks it); drop and clear go to the node named (every
  node for a clear without one).
- :class:`ClusterOperations`: validate, benchmark, optimize on every node holding a placement.
- :class:`ClusterLoras`: a LoRA applied where the model is loaded, its file sent to those nodes
  first when they lack it; strength and removal where it is applied.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from typing import Any

from modelkeeper.cluster.catalog import ClusterCatalog, ClusterModel
from modelkeeper.cluster.loads import ClusterLoads, naming_the_users_file, progress
from modelkeeper.cluster.membership import Membership
from modelkeeper.cluster.view import ClusterState, device_id, split_device, total_cache
from modelkeeper.orchestrator.errors import NotLoaded
from modelkeeper.orchestrator.jobs import Job, JobManager
from modelkeeper.orchestrator.workers import Priority
from modelkeeper.protocol.errors import ErrorCode, ProtocolError


class Remote:
    """What the three parts share: the cluster's state and a way to run a part's method on a node."""

    def __init__(
        self,
        catalog: ClusterCatalog,
        view: ClusterState,
        members: Membership,
        loads: ClusterLoads,
        jobs: JobManager,
    ) -> None:
        self.catalog = catalog
        self.view = view
        self.members = members
        self.loads = loads
        self.jobs = jobs

    async def call(
        self,
        node: str,
        part: str,
        method: str,
        *args: Any,
        what: str,
        held: tuple[str, list[str]] | None = None,
        refresh: bool = True,
        **kwargs: Any,
    ) -> Any:
        """``part.method`` on ``node``'s orchestrator, the node's state refreshed after it (unless
        ``refresh`` is false: a read). ``held``: (local device, local ids) of driver leases, held
        on the node for the call."""
        try:
            link = self.members.link(node)
            return await link.call("call", part, method, list(args), kwargs, held, what=what)
        finally:
            if refresh:
                await self.members.refresh(node)

    async def stream(
        self, node: str, job: Job, part: str, method: str, *args: Any, what: str, **kwargs: Any
    ) -> Any:
        """Like ``call`` for a method that runs a job on the node: its progress goes to ``job``."""

        def forward(p: dict[str, Any]) -> None:
            progress(job, {**p, "node": node})

        try:
            link = self.members.link(node)
            return await link.stream(
                "stream", part, method, list(args), kwargs, what=what, on_progress=forward
            )
        finally:
            await self.members.refresh(node)

    def key_of(self, node: str) -> Callable[[str], str]:
        state = self.view.nodes.get(node)
        return state.key_of if state is not None else (lambda m: m)

    def loaded(self, model: ClusterModel | None, device: str | None) -> list[dict[str, Any]]:
        """Loaded placements (of ``model``, on ``device``), in cluster terms; NotLoaded for a model
        loaded nowhere there."""
        if device is not None:
            self.loads.check_device(device)
        found = [
            p
            for p in self.view.placements(None if model is None else model.key)
            if p["state"] == "loaded" and device in (None, p["device"])
        ]
        if model is not None and not found:
            where = f"on {device}" if device else "on any device"
            raise NotLoaded(f"model {model.key} ({model.name}) is not loaded {where}", model_id=model.key)
        return found

    def worker_name(self, node: str, name: str) -> str:
        """A worker's name for a loaded component (``<local id>/<component>``) with the model's
        cluster key instead of the node's id."""
        model_id, sep, component = name.partition("/")
        return self.key_of(node)(model_id) + sep + component

    def named(self, node: str, entry: dict[str, Any]) -> dict[str, Any]:
        """A node's per-device answer with cluster names (``model_id`` key, ``node/device``)."""
        out = {**entry, "device": device_id(node, entry["device"]), "node": node}
        if "model_id" in out:
            out["model_id"] = self.key_of(node)(out["model_id"])
        return out


async def scan_nodes(remote: Remote, *, wait: bool = True, hash: bool = True) -> dict[str, Any]:
    """Every node rescans (and hashes) its roots: one job, its result the sum of the nodes' as one
    host answers it, each node's own under ``nodes``."""
    nodes = list(remote.members.links)

    async def one(node: str) -> dict[str, Any]:
        try:
            out: dict[str, Any] = await remote.members.link(node).call(
                "scan", hash, what=f"the scan of {node}"
            )
            return out
        finally:
            await remote.members.refresh(node)

    async def body(job: Job) -> Any:
        results = await asyncio.gather(*(one(n) for n in nodes))
        total: dict[str, Any] = {
            "summary": {
                k: sum(int(r["summary"].get(k, 0)) for r in results)
                for k in ("added", "updated", "unchanged", "moved", "rejected", "missing", "total")
            },
            "seconds": max((float(r["seconds"]) for r in results), default=0.0),
            "rejected": [e for r in results for e in r["rejected"]][:200],
            "missing": [p for r in results for p in r["missing"]][:200],
        }
        if hash:
            total["hashed"] = {
                k: sum(int(r.get("hashed", {}).get(k, 0)) for r in results)
                for k in ("files", "bytes", "errors")
            }
        return total

    return await remote.jobs.run("scan", {"nodes": nodes, "hash": hash}, body, wait=wait)


def by_node(placements: list[dict[str, Any]]) -> dict[str, list[dict[str, Any]]]:
    out: dict[str, list[dict[str, Any]]] = {}
    for p in placements:
        out.setdefault(p["node"], []).append(p)
    return out


def local_device(device: str | None) -> str | None:
    return None if device is None else split_device(device)[1]


class ClusterOperations:
    def __init__(self, remote: Remote) -> None:
        self.remote = remote

    async def run(
        self,
        op: str,
        ref: str | None,
        device: str | None,
        data: dict[str, Any],
        *,
        component: str | None = None,
        wait: bool = True,
        timeout: float | None = None,
        priority: int = Priority.NORMAL,
    ) -> dict[str, Any]:
        """``op`` on every loaded placement of a model (``ref``) or of every model, on the nodes
        holding them: one job, one entry per placement as on one host."""
        model = None if ref is None else await self.remote.catalog.resolve(ref)
        nodes = by_node(self.remote.loaded(model, device))
        params = {"model_id": None if model is None else model.key, "device": device, **data}

        async def on(node: str, placements: list[dict[str, Any]], job: Job) -> list[dict[str, Any]]:
            local_ref = None if model is None else placements[0]["local_id"]
            result = await self.remote.stream(
                node, job, "operations", "run", op, local_ref, local_device(device), data,
                component=component, timeout=timeout, priority=priority, what=f"{op} on {node}",
            )  # fmt: skip
            return [{**self.remote.named(node, r), "node": node} for r in result]

        async def body(job: Job) -> Any:
            parts = await asyncio.gather(*(on(n, ps, job) for n, ps in nodes.items()))
            return [{k: v for k, v in r.items() if k != "node"} for part in parts for r in part]

        return await self.remote.jobs.run(op, params, body, wait=wait, timeout=timeout)


class ClusterLoras:
    def __init__(self, remote: Remote) -> None:
        self.remote = remote

    async def _lora(self, ref: str) -> ClusterModel:
        lora = await self.remote.catalog.resolve(ref)
        if lora.type != "lora":
            raise ProtocolError(
                f"{ref!r} is a {lora.type}, not a LoRA", ErrorCode.INVALID_REQUEST, field="lora_id"
            )
        return lora

    async def apply(
        self,
        ref: str,
        lora_ref: str,
        *,
        device: str | None = None,
        strength: float = 1.0,
        timeout: float | None = None,
        priority: int = Priority.NORMAL,
    ) -> dict[str, Any]:
        """Patch every placement of a loaded model (or the one on ``device``) with a LoRA; a node
        without the LoRA's file gets it from one that has it first."""
        model = await self.remote.catalog.resolve(ref)
        lora = await self._lora(lora_ref)
        applied: list[dict[str, Any]] = []
        for node, placements in by_node(self.remote.loaded(model, device)).items():
            local_lora = await self.remote.loads.bring(lora, node, None)
            try:
                result = await self.remote.call(
                    node, "loras", "apply", placements[0]["local_id"], local_lora, device=local_device(device),
                    strength=strength, timeout=timeout, priority=priority, what=f"a LoRA applied on {node}",
                )  # fmt: skip
            except ProtocolError as exc:
                raise naming_the_users_file(exc, self.remote.catalog, node, lora, model) from None
            applied.extend(self.remote.named(node, r) for r in result["applied"])
        return {"model_id": model.key, "lora_id": lora.key, "applied": applied}

    async def strength(
        self, ref: str, lora_ref: str, strength: float, device: str | None = None
    ) -> dict[str, Any]:
        return await self._each(ref, lora_ref, device, "strength", strength)

    async def remove(self, ref: str, lora_ref: str, device: str | None = None) -> dict[str, Any]:
        return await self._each(ref, lora_ref, device, "remove")

    async def _each(
        self, ref: str, lora_ref: str, device: str | None, method: str, *args: Any
    ) -> dict[str, Any]:
        model = await self.remote.catalog.resolve(ref)
        lora = await self._lora(lora_ref)
        held = [p for p in self.remote.loaded(model, device) if lora.key in p["loras"]]
        if not held:
            raise NotLoaded(
                f"LoRA {lora.key} ({lora.name}) is not applied to model {model.key}", lora_id=lora.key
            )
        out: list[dict[str, Any]] = []
        for node, placements in by_node(held).items():
            result = await self.remote.call(
                node, "loras", method, placements[0]["local_id"], lora.local_id(node), *args,
                local_device(device), what=f"a LoRA's {method} on {node}",
            )  # fmt: skip
            out.extend(self.remote.named(node, r) for r in result["devices"])
        return {"model_id": model.key, "lora_id": lora.key, "devices": out}


class ClusterFeed:
    """The RAM caches of every node (see the module docstring)."""

    def __init__(self, remote: Remote) -> None:
        self.remote = remote

    @property
    def is_open(self) -> bool:
        return True

    def view(self) -> dict[str, Any]:
        nodes = {}
        for name, node in self.remote.view.nodes.items():
            stats = node.state.get("cache")
            if stats is not None:
                nodes[name] = {"stats": stats, "segments": node.segments()}
        stats = [n["stats"] for n in nodes.values()]
        total = {
            **total_cache(stats),
            "evicted_bytes": sum(int(s.get("evicted_bytes") or 0) for s in stats),
            "shm_dir": ", ".join(sorted({str(s.get("shm_dir")) for s in stats})),
        }
        return {
            "stats": total,
            "segments": [seg for n in nodes.values() for seg in n["segments"]],
            "nodes": nodes,
        }

    def _split(self, component_id: str) -> tuple[str, str]:
        node, local = split_device(component_id)
        if not node:
            raise ProtocolError(
                f"component {component_id!r}: in cluster mode a segment is named node/component "
                f"(nodes: {', '.join(self.remote.members.links) or 'none'})",
                ErrorCode.INVALID_REQUEST,
                field="component_id",
            )
        self.remote.members.link(node)
        return node, local

    def get(self, component_id: str) -> dict[str, Any]:
        node, _ = self._split(component_id)
        state = self.remote.view.nodes[node]
        for seg in state.segments():
            if seg["component_id"] == component_id:
                return seg
        raise ProtocolError(
            f"no cached component {component_id!r}", ErrorCode.MODEL_NOT_FOUND, component_id=component_id
        )

    async def cache_model(self, ref: str, *, wait: bool = True, node: str | None = None) -> dict[str, Any]:
        """Every component of a model into the RAM cache of ``node`` (its file sent there first
        when it lacks it), or of every node with its file: a job."""
        model = await self.remote.catalog.resolve(ref)
        nodes = [node] if node is not None else list(model.locations)
        for n in nodes:
            self.remote.members.link(n)

        async def body(job: Job) -> Any:
            segments: list[dict[str, Any]] = []
            for n in nodes:
                local_id = await self.remote.loads.bring(model, n, job)
                result = await self.remote.stream(
                    n, job, "feed", "cache_model", local_id, what=f"caching {model.name} on {n}"
                )
                segments.extend(self._named_segment(n, s) for s in result["segments"])
            return {"model_id": model.key, "segments": segments}

        return await self.remote.jobs.run("cache", {"model_id": model.key, "nodes": nodes}, body, wait=wait)

    async def cache_component(self, component_id: str, *, wait: bool = True) -> dict[str, Any]:
        node, local = self._split(component_id)

        async def body(job: Job) -> Any:
            result = await self.remote.stream(
                node, job, "feed", "cache_component", local, what=f"caching {local} on {node}"
            )
            return {"segments": [self._named_segment(node, s) for s in result["segments"]]}

        return await self.remote.jobs.run("cache", {"component_id": component_id}, body, wait=wait)

    def _named_segment(self, node: str, seg: dict[str, Any]) -> dict[str, Any]:
        key_of = self.remote.key_of(node)
        return {
            **seg,
            "component_id": f"{node}/{seg['component_id']}",
            "node": node,
            "models": sorted(key_of(m) for m in seg["models"]),
        }

    async def drop(self, component_id: str, *, force: bool = False) -> dict[str, Any]:
        node, local = self._split(component_id)
        result = await self.remote.call(node, "feed", "drop", local, force=force, what=f"a drop on {node}")
        return {**result, "component_id": f"{node}/{result['component_id']}"}  # a prefix: the node's full id

    async def clear(self, *, force: bool = False, node: str | None = None) -> dict[str, Any]:
        """Drop every segment of ``node``'s cache, or of every node's."""
        nodes = [node] if node is not None else list(self.remote.members.links)
        dropped = freed = 0
        for n in nodes:
            result = await self.remote.call(n, "feed", "clear", force=force, what=f"a clear on {n}")
            dropped += result["dropped"]
            freed += result["freed_bytes"]
        return {"dropped": dropped, "freed_bytes": freed}
