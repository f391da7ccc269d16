"""Errors of cluster mode.

Hierarchy::

    ProtocolError (modelkeeper.protocol)
    └── OrchestratorError (modelkeeper.orchestrator)
        └── ClusterError             INTERNAL: the cluster cannot do what was asked
            ├── NodeLost             WORKER_DIED: the node died or left while the call was in flight; retry
            └── TransferFailed       INVALID_MODEL_FILE: a file sent between nodes did not match its hash

Errors raised on a node (a model not found, no room...) come back as the ``ProtocolError`` they
were there, with their code; the API maps them as on one host.
"""

from __future__ import annotations

from modelkeeper.orchestrator.errors import OrchestratorError
from modelkeeper.protocol.errors import ErrorCode

__all__ = ["ClusterError", "NodeLost", "TransferFailed"]


class ClusterError(OrchestratorError):
    code = ErrorCode.INTERNAL


class NodeLost(ClusterError):
    code = ErrorCode.WORKER_DIED


class TransferFailed(ClusterError):
    code = ErrorCode.INVALID_MODEL_FILE
