"""The cluster state: per node and device what the agents last reported, and what placement sees.

Each node's entry is its agent's ``state()`` (devices with budget, used bytes and placements, each
with the parts it shares on its device; the models on its disk with their cluster keys and the
bytes of them in its RAM cache), replaced on every refresh. Devices are named ``node/device``
(``node-a/cuda:0``). ``device_views`` gives the placement policy one :class:`DeviceView` per ready
device (its node set), models named by their cluster keys, leases and loads in flight taken from
the driver; :meth:`NodeState.ram_keys` and :meth:`NodeState.disk_keys` give the node's tiers.
(Named ``*State`` so as not to be taken for the tiered policy's own index,
:class:`modelkeeper.orchestrator.tiers.ClusterView`, which ``placing.py`` builds from this.)
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from typing import Any

from modelkeeper.orchestrator.forms import LoadForm
from modelkeeper.orchestrator.placement import DeviceView, Resident

SEP = "/"
#: What a node reports of a placement for the driver alone, not shown in the cluster's answers.
INTERNAL = ("shares", "form")


def device_id(node: str, device: str) -> str:
    return f"{node}{SEP}{device}"


def split_device(cluster_device: str) -> tuple[str, str]:
    node, sep, device = cluster_device.partition(SEP)
    return (node, device) if sep else ("", cluster_device)


def form_of(p: dict[str, Any]) -> LoadForm:
    """The form a node's placement is loaded in, from its ``form`` (``NodeAgent.state``; ``streams``
    null while it loads); from the dtypes it shows when an older agent sent none."""
    data = p.get("form")
    if data is None:
        return LoadForm(p.get("dtype"), p.get("storage_dtype"), p.get("offload") or "none")
    streams = data["streams"]
    return LoadForm(
        data["dtype"], data["storage_dtype"], data["offload"], tuple(data["dtypes"]),
        tuple(data["storages"]), None if streams is None else bool(streams), data.get("compute"),
    )  # fmt: skip


@dataclass
class NodeState:
    name: str
    node_id: str
    state: dict[str, Any]
    at: float = field(default_factory=time.time)

    def key_of(self, model_id: str) -> str:
        """The cluster key of a local model id (the id itself when the model is unknown here)."""
        for m in self.state["models"]:
            if m["model_id"] == model_id:
                return str(m["key"])
        return model_id

    def model(self, key: str) -> dict[str, Any] | None:
        return next((m for m in self.state["models"] if m["key"] == key), None)

    def loras(self, placement: dict[str, Any]) -> dict[str, Any]:
        """A placement's applied LoRAs, by their cluster keys."""
        return {self.key_of(k): v for k, v in placement.get("loras", {}).items()}

    def placement(self, p: dict[str, Any], device: str) -> dict[str, Any]:
        """A placement of this node in cluster terms: its model by cluster key (``local_id`` its
        id here), its device ``node/device``, its LoRAs, its parts and the models it shares them
        with by key; without ``shares`` and ``form``, which only the driver reads (placement,
        :meth:`ClusterState.device_views`; the form check, :meth:`ClusterState.forms`)."""
        out = {k: v for k, v in p.items() if k not in INTERNAL}
        out.update(
            model_id=self.key_of(p["model_id"]), local_id=p["model_id"], device=device_id(self.name, device),
            loras=self.loras(p),
        )  # fmt: skip
        if "parts" in p:
            out["parts"] = {role: self.key_of(m) for role, m in p["parts"].items()}
        if "shared" in p:
            out["shared"] = {c: sorted(self.key_of(m) for m in ms) for c, ms in p["shared"].items()}
        return out

    def segments(self) -> list[dict[str, Any]]:
        """The node's RAM-cache segments in cluster terms: ``node/component`` ids, models by key."""
        return [
            {**seg, "component_id": f"{self.name}{SEP}{seg['component_id']}", "node": self.name,
             "models": sorted(self.key_of(m) for m in seg["models"])}
            for seg in self.state.get("segments", [])
        ]  # fmt: skip

    def disk_keys(self) -> frozenset[str]:
        """The cluster keys of the models whose files are on this node's disk."""
        return frozenset(str(m["key"]) for m in self.state["models"])

    def ram_keys(self) -> frozenset[str]:
        """The cluster keys of the models with bytes in this node's RAM cache."""
        return frozenset(str(m["key"]) for m in self.state["models"] if m["ram_bytes"] > 0)


class ClusterState:
    def __init__(self) -> None:
        self.nodes: dict[str, NodeState] = {}

    def update(self, name: str, node_id: str, state: dict[str, Any]) -> None:
        self.nodes[name] = NodeState(name, node_id, state)

    def drop(self, name: str) -> NodeState | None:
        return self.nodes.pop(name, None)

    # ------------------------------------------------------------------ devices and placements

    def devices(self) -> Iterable[tuple[NodeState, dict[str, Any]]]:
        for node in self.nodes.values():
            for d in node.state["devices"]:
                yield node, d

    def placements(self, key: str | None = None) -> list[dict[str, Any]]:
        """Every placement (of ``key`` only, when given), named in cluster terms."""
        out = []
        for node, d in self.devices():
            for p in d["placements"]:
                if key is None or node.key_of(p["model_id"]) == key:
                    out.append({**node.placement(p, d["id"]), "node": node.name})
        return out

    def forms(self, key: str) -> list[tuple[str, str, LoadForm]]:
        """(``node/device``, state, form) of each placement of ``key``: what a load in another
        form is refused or reloaded by (forms.py)."""
        return [
            (device_id(node.name, d["id"]), str(p["state"]), form_of(p))
            for node, d in self.devices()
            for p in d["placements"]
            if node.key_of(p["model_id"]) == key
        ]

    def device_views(
        self,
        leased: Callable[[str, str], bool],
        loading: Iterable[tuple[str, str]] = (),
        nodes: Iterable[str] | None = None,
    ) -> list[DeviceView]:
        """What placement sees: ready devices (of ``nodes``, when given), models by cluster key;
        ``leased(key, device)`` says whether a driver lease holds a model there; ``loading``:
        (key, device) of the loads in flight from the driver. A resident's ``shares`` are its
        parts that the device holds once for every placement loading them (the agent's share keys
        in cluster terms, with their bytes): ``used`` counts them once, and so does placement."""
        chosen = None if nodes is None else set(nodes)
        inflight = list(loading)
        out = []
        for node, d in self.devices():
            if d["state"] != "ready" or (chosen is not None and node.name not in chosen):
                continue
            dev = device_id(node.name, d["id"])
            residents = tuple(
                Resident(
                    node.key_of(p["model_id"]),
                    int(p["bytes"]),
                    float(p["last_used"]),
                    loaded=p["state"] == "loaded",
                    leased=bool(p.get("leases")) or leased(node.key_of(p["model_id"]), dev),
                    keep_loaded=bool(p["keep_loaded"]),
                    shares=tuple((str(k), int(b)) for k, b in p.get("shares", ())),
                )
                for p in d["placements"]
            )
            busy = frozenset(k for k, at in inflight if at == dev)
            out.append(DeviceView(dev, int(d["budget"]), int(d["used"]), residents, busy, node=node.name))
        return out

    # ------------------------------------------------------------------ tiers

    def nodes_with_ram(self, key: str) -> list[str]:
        return [n.name for n in self.nodes.values() if (m := n.model(key)) is not None and m["ram_bytes"] > 0]

    def nodes_with_disk(self, key: str) -> list[str]:
        return [n.name for n in self.nodes.values() if n.model(key) is not None]

    # ------------------------------------------------------------------ status

    def device_status(self, node: NodeState, d: dict[str, Any]) -> dict[str, Any]:
        models = [node.placement(p, d["id"]) for p in d["placements"]]
        info = {k: v for k, v in d.items() if k not in ("placements", "budget", "used")}
        return {
            **info,
            "id": device_id(node.name, d["id"]),
            "node": node.name,
            "local_id": d["id"],
            "models": models,
        }

    def status(self) -> dict[str, Any]:
        caches = [n.state["cache"] for n in self.nodes.values() if n.state.get("cache")]
        return {
            "nodes": [
                {
                    "name": n.name,
                    "node_id": n.node_id,
                    "pid": n.state.get("pid"),
                    "refreshed_at": n.at,
                    "devices": [device_id(n.name, d["id"]) for d in n.state["devices"]],
                    "models_on_disk": len(n.state["models"]),
                    "cache": n.state.get("cache"),
                }
                for n in self.nodes.values()
            ],
            "devices": [self.device_status(n, d) for n, d in self.devices()],
            "cache": total_cache(caches) if caches else None,
        }


def total_cache(caches: list[dict[str, Any]]) -> dict[str, Any]:
    """The RAM caches of every node as one (sums; the hit rate over every lookup)."""
    out = {
        k: sum(int(c.get(k) or 0) for c in caches)
        for k in ("segments", "bytes_used", "budget_bytes", "evictions", "hits", "misses")
    }
    lookups = out["hits"] + out["misses"]
    return {**out, "hit_rate": out["hits"] / lookups if lookups else 0.0}
