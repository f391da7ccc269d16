"""The knobs of cluster mode, apart from the single-host :class:`~modelkeeper.orchestrator.Settings`.

Environment variables carry the prefix ``MODELKEEPER_CLUSTER_`` (``MODELKEEPER_CLUSTER_ADDRESS=auto``).
What each node's agent runs with (its model roots, devices, registry file, RAM cache) is that
node's own ``Settings``: read from the node's environment and ``MODELKEEPER_CONFIG`` when the agent
starts there, with the per-node overrides the driver passes (``node_overrides``) on top.
"""

from __future__ import annotations

from typing import Any, Literal

from pydantic import Field
from pydantic_settings import BaseSettings, SettingsConfigDict

#: A node's name comes from a custom resource ``modelkeeper-node:<name>`` (``ray start
#: --resources '{"modelkeeper-node:node-a": 1}'``); a node without one is ``node-<id prefix>``.
NODE_RESOURCE = "modelkeeper-node:"
AGENT_PREFIX = "modelkeeper-agent-"


class ClusterSettings(BaseSettings):
    """See the module docstring."""

    model_config = SettingsConfigDict(env_prefix="MODELKEEPER_CLUSTER_", extra="forbid")

    address: str = Field("auto", description="Ray address: 'auto' (the running local cluster) or host:port.")
    namespace: str = Field("modelkeeper", description="Ray namespace of the named agents.")
    named_nodes_only: bool = Field(
        False,
        description="Run agents only on nodes with a modelkeeper-node:<name> resource (not every node).",
    )
    node_poll_s: float = Field(0.25, gt=0, description="How often the driver reads Ray's node table.")
    refresh_s: float = Field(
        1.0, gt=0, description="How often the cluster view is refreshed without an operation."
    )
    agent_start_timeout: float = Field(
        300.0, gt=0, description="Time an agent has to start its node's workers and scan."
    )
    workers: Literal["process", "inprocess"] = Field(
        "process", description="Worker kind on the nodes: subprocesses, or in the agent's process (tests)."
    )
    chunk_bytes: int = Field(
        64 << 20, ge=1 << 16, description="Size of one chunk of a file sent between nodes."
    )
    chunks_in_flight: int = Field(4, ge=1, le=64, description="Chunks requested ahead during a transfer.")
    receive_to_disk: bool = Field(
        True,
        description="A file sent to a node lands in its RAM cache and also on its disk (receive_dir); "
        "false: in RAM only (gone from that node once its RAM cache evicts it).",
    )
    receive_dir: str = Field(
        "received",
        description="Folder inside a node's first model root where files sent from other nodes land.",
    )
    node_overrides: dict[str, dict[str, Any]] = Field(
        default_factory=dict,
        description="Settings per node name, over that node's own environment ('*' applies to every node).",
    )

    def overrides_for(self, node: str) -> dict[str, Any]:
        return {**self.node_overrides.get("*", {}), **self.node_overrides.get(node, {})}
