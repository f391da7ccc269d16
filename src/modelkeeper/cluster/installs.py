"""Installs in cluster mode (``POST /api/model/install``): a download onto one node.

The node with the most free bytes under its first model root (each agent's state reports them)
runs the single-host install (``installs.install``: fetch, verify, scan and hash, the same code,
streamed through ``NodeAgent.PARTS``); the driver's job shows its progress. The answer is the
node's, its ``model_id`` the cluster key and ``node`` the node. Other nodes get the file from that
node when they need it (``receive.py``), as for any model on one node's disk.
"""

from __future__ import annotations

from typing import Any

from modelkeeper.cluster.remote import Remote
from modelkeeper.orchestrator.jobs import Job
from modelkeeper.protocol.errors import ErrorCode, ProtocolError


class ClusterInstalls:
    def __init__(self, remote: Remote) -> None:
        self.remote = remote

    def target(self) -> str:
        """The node with the most free disk under its first model root (by name on a tie)."""
        nodes = [n for n in self.remote.view.nodes.values() if n.name in self.remote.members.links]
        if not nodes:
            raise ProtocolError("no node to install onto", ErrorCode.BUSY)
        return min(nodes, key=lambda n: (-int(n.state.get("disk_free") or 0), n.name)).name

    async def install(
        self,
        source: str,
        *,
        model_type: str | None = None,
        name: str | None = None,
        sha256: str | None = None,
        wait: bool = True,
    ) -> dict[str, Any]:
        """Fetch ``source`` into a node's first model root and register it there: a job."""
        node = self.target()

        async def body(job: Job) -> Any:
            out: dict[str, Any] = await self.remote.stream(
                node, job, "installs", "install", source, model_type=model_type, name=name,
                sha256=sha256, what=f"the install of {source} on {node}",
            )  # fmt: skip
            return {**out, "model_id": self.remote.key_of(node)(out["model_id"]), "node": node}

        return await self.remote.jobs.run("install", {"source": source, "node": node}, body, wait=wait)
