"""modelkeeper: the model domain of a diffusion inference backend.

The orchestrator finds, identifies, caches and places models; one worker process per device
owns that device's memory and the live ``torch.nn.Module`` objects. They speak the JSON-lines
protocol of :mod:`modelkeeper.protocol`.
"""

from modelkeeper.protocol import (
    PROTOCOL_VERSION,
    CommandType,
    ErrorCode,
    ProtocolError,
    WorkerConnection,
)

__version__ = "0.1.0"

__all__ = [
    "PROTOCOL_VERSION",
    "CommandType",
    "ErrorCode",
    "ProtocolError",
    "WorkerConnection",
    "__version__",
]
