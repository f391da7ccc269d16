"""The worker: one process per device, owning its memory and live modules.

Run it as ``python -m modelkeeper.worker --device cuda:0``, or in-process with
:class:`InProcessWorker`. Importing this package imports torch.
"""

from modelkeeper.worker.device import DeviceMemory, parse_device
from modelkeeper.worker.errors import WorkerError
from modelkeeper.worker.inprocess import InProcessWorker, build_server
from modelkeeper.worker.server import WorkerServer
from modelkeeper.worker.service import ModelService

__all__ = [
    "DeviceMemory",
    "InProcessWorker",
    "ModelService",
    "WorkerError",
    "WorkerServer",
    "build_server",
    "parse_device",
]
