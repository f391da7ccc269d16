"""Cluster mode: one fleet of nodes on Ray, models placed by bytes, work routed to the weights.

A layer above the orchestrator: a :class:`NodeAgent` per Ray node (a named actor pinned there)
owns that node's single-host orchestrator; the :class:`ClusterOrchestrator`, the Ray driver in the
API process, keeps the cluster view, places, forwards, routes and notices lost nodes. Ray is an
optional dependency (``modelkeeper[cluster]``): importing this package imports it.
"""

from modelkeeper.cluster.agent import NodeAgent
from modelkeeper.cluster.errors import ClusterError, NodeLost, TransferFailed
from modelkeeper.cluster.service import ClusterOrchestrator
from modelkeeper.cluster.settings import ClusterSettings

__all__ = [
    "ClusterError",
    "ClusterOrchestrator",
    "ClusterSettings",
    "NodeAgent",
    "NodeLost",
    "TransferFailed",
]
