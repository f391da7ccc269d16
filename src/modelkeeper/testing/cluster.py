"""Cluster mode on one machine, for tests and benchmarks: a local multi-node Ray cluster and an
agent whose device queue a test can hold.

``with local_ray_cluster(["node-a", "node-b"]) as lc:`` starts a head (no resources of its own
for agents) and one Ray node per name, each with its ``modelkeeper-node:<name>`` resource and one
CPU, with the environment and health checks of ``shared/notes/ray.md`` (a lost node is declared
dead in about 1.2 s), and connects this process as the driver. ``lc.kill(name)`` emulates a crash.
"""

from __future__ import annotations

import asyncio
import os
import shutil
import signal
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any

from modelkeeper.cluster.agent import NodeAgent
from modelkeeper.cluster.settings import NODE_RESOURCE
from modelkeeper.orchestrator import Priority

HEALTH_CHECKS = {
    "health_check_initial_delay_ms": 0,
    "health_check_period_ms": 500,
    "health_check_timeout_ms": 500,
    "health_check_failure_threshold": 3,
}
RAY_ENV = {
    "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER": "0",
    "RAY_AUTH_MODE": "disabled",
    "RAY_DISABLE_USAGE_STATS": "1",
}


class GatedAgent(NodeAgent):
    """A node agent whose device queue a test can hold (``gate``) and let go (``let_go``): a load
    sent there stays in flight until then, so a fault can be made at a chosen moment."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._gates: dict[str, asyncio.Event] = {}
        self._held: dict[str, asyncio.Future[Any]] = {}

    async def gate(self, device: str) -> bool:
        slot = self.service.pool.slot(device)
        gate = self._gates[device] = asyncio.Event()
        loop = asyncio.get_running_loop()
        self._held[device] = asyncio.ensure_future(
            slot.run(gate.wait, priority=Priority.CRITICAL, deadline=loop.time() + 3600, label="gate")
        )
        while slot.running is None:
            await asyncio.sleep(0)
        return True

    async def queued(self, device: str) -> int:
        return self.service.pool.slot(device).queue_depth

    async def job_states(self, kind: str) -> list[str]:
        """The states of the node's own jobs of ``kind``, newest first."""
        return [j.state.value for j in self.service.jobs.list(kind=kind)]

    async def let_go(self, device: str) -> bool:
        self._gates.pop(device).set()
        await self._held.pop(device)
        return True


@dataclass
class LocalCluster:
    cluster: Any
    nodes: dict[str, Any] = field(default_factory=dict)
    tmpdir: str = ""
    object_store_bytes: int = 100 << 20

    @property
    def address(self) -> str:
        return str(self.cluster.address)

    def add(self, name: str) -> Any:
        node = self.cluster.add_node(
            num_cpus=1, resources={NODE_RESOURCE + name: 1}, object_store_memory=self.object_store_bytes
        )
        self.nodes[name] = node
        self.cluster.wait_for_nodes()
        return node

    def kill(self, name: str, pids: list[int]) -> None:
        """A crash: the node removed without grace, and the agent process (``pids``) killed."""
        node = self.nodes.pop(name)
        for pid in pids:
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        self.cluster.remove_node(node, allow_graceful=False)


@contextmanager
def local_ray_cluster(
    names: list[str], *, namespace: str = "modelkeeper", object_store_bytes: int = 100 << 20
) -> Iterator[LocalCluster]:
    """See the module docstring. Sets the Ray environment variables for this process while it runs;
    ``object_store_bytes``: each node's object store (a benchmark moving large chunks wants more)."""
    tmp = tempfile.mkdtemp(prefix="mkray", dir="/tmp")  # short: Unix socket paths stay under 107 chars
    os.makedirs(os.path.join(tmp, "ray"))
    saved = {k: os.environ.get(k) for k in (*RAY_ENV, "RAY_TMPDIR")}
    os.environ.update(RAY_ENV, RAY_TMPDIR=tmp)
    import ray
    from ray.cluster_utils import Cluster

    cluster = Cluster(
        initialize_head=True,
        head_node_args={
            "num_cpus": 1,
            "include_dashboard": False,
            "object_store_memory": 100 << 20,
            "_system_config": HEALTH_CHECKS,
        },
    )
    lc = LocalCluster(cluster, tmpdir=tmp, object_store_bytes=object_store_bytes)
    try:
        for name in names:
            lc.add(name)
        handler = signal.getsignal(signal.SIGTERM)
        ray.init(address=cluster.address, namespace=namespace, log_to_driver=False)
        signal.signal(signal.SIGTERM, handler)
        yield lc
    finally:
        ray.shutdown()
        cluster.shutdown()  # type: ignore[no-untyped-call]
        shutil.rmtree(tmp, ignore_errors=True)
        for key, value in saved.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value
