"""The cluster orchestrator: the Ray driver inside the API process.

It joins the Ray cluster, keeps one agent per alive node (:mod:`.membership`), the cluster view and
catalog built from their states, and offers the parts the API routes call, with cluster
implementations: ``loads`` (placement by bytes across nodes, loads forwarded to the chosen node,
leases, routing), ``feed``, ``operations`` and ``loras`` (run on the nodes holding the model,
:mod:`.remote`), ``recovery`` (reconcile and the memory route on the nodes, :mod:`.upkeep`),
``views``, ``catalog`` (user metadata and components on the nodes' registries, :mod:`.records`),
``installs`` (onto the node with the most free disk, :mod:`.installs`); and the shared ones of one host: ``jobs``, ``leases``,
``bus``. Nodes lost are noticed by polling Ray's node table and by failed calls; kept-loaded models
are loaded again elsewhere. ``await start()``, use it, ``await stop()`` (the agents keep running:
a restarted driver attaches to them by name; ``stop(agents=True)`` stops them too).
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import signal
from typing import Any

from modelkeeper.cluster.agent import NodeAgent
from modelkeeper.cluster.catalog import ClusterCatalog
from modelkeeper.cluster.installs import ClusterInstalls
from modelkeeper.cluster.loads import ClusterLoads
from modelkeeper.cluster.membership import Membership
from modelkeeper.cluster.records import ClusterRecords
from modelkeeper.cluster.remote import ClusterFeed, ClusterLoras, ClusterOperations, Remote, scan_nodes
from modelkeeper.cluster.settings import ClusterSettings
from modelkeeper.cluster.upkeep import ClusterRecovery
from modelkeeper.cluster.view import ClusterState
from modelkeeper.cluster.views import ClusterMetrics, ClusterPool, ClusterViews
from modelkeeper.orchestrator.background import Background
from modelkeeper.orchestrator.events import EventBus
from modelkeeper.orchestrator.firstscan import FirstScan
from modelkeeper.orchestrator.jobs import JobManager
from modelkeeper.orchestrator.leases import LeaseTable
from modelkeeper.orchestrator.settings import Settings


def connect(address: str, namespace: str) -> bool:
    """Join the Ray cluster at ``address`` (unless this process already has); True when it joined.
    ``ray.init`` replaces the SIGTERM handler with ``sys.exit``: the handler is restored."""
    import ray

    if ray.is_initialized():
        return False
    handler = signal.getsignal(signal.SIGTERM)
    try:
        ray.init(address=address, namespace=namespace, include_dashboard=False, log_to_driver=False)
    finally:
        with contextlib.suppress(ValueError):  # not the main thread: nothing was replaced
            signal.signal(signal.SIGTERM, handler)
    return True


class ClusterOrchestrator:
    """See the module docstring."""

    def __init__(
        self,
        settings: Settings | None = None,
        cluster: ClusterSettings | None = None,
        *,
        agent_class: type[NodeAgent] = NodeAgent,
    ) -> None:
        self.settings = s = settings or Settings()
        self.cluster = c = cluster or ClusterSettings()
        self.ready = False
        self.preloaded = True  # preloads are a node's setting in cluster mode (each agent's own)
        self.preload: dict[str, Any] = {"pending": 0, "loaded": [], "failed": []}
        self.bus = EventBus()
        self.first_scan = FirstScan(self.bus, enabled=False)  # the nodes scan their own roots
        self.jobs = JobManager(self.bus, keep=s.jobs_kept, accepting=lambda: self.ready)
        self.leases = LeaseTable()
        self.view = ClusterState()
        self.background = Background()
        self.members = Membership(c, self.view, self.bus, agent_class=agent_class)
        self.catalog = ClusterCatalog(self.view)
        self.loads = ClusterLoads(
            s, c, self.catalog, self.members, self.view, self.leases, self.jobs, self.bus
        )
        self.members.on_lost = self.loads.replace_kept
        remote = Remote(self.catalog, self.view, self.members, self.loads, self.jobs)
        records = ClusterRecords(remote)
        self.views = ClusterViews(
            self.catalog, self.view, self.members, self.leases, self.jobs,
            records=records, ready=lambda: self.ready, address=lambda: c.address,
        )  # fmt: skip
        self.pool = ClusterPool(self.view)
        self.metrics = ClusterMetrics(self.view, self.members)
        self.feed = ClusterFeed(remote)
        self.operations = ClusterOperations(remote)
        self.loras = ClusterLoras(remote)
        self.recovery = ClusterRecovery(remote)
        self.installs = ClusterInstalls(remote)
        self.catalog.scanner = functools.partial(scan_nodes, remote)
        self.catalog.records = records
        self.loads.on_received = records.copy
        self._joined = False

    async def route(self, ref: str, *, load: bool = False) -> dict[str, Any]:
        return await self.loads.route(ref, load=load)

    async def start(self) -> None:
        self.bus.bind(asyncio.get_running_loop())
        self._joined = await asyncio.to_thread(connect, self.cluster.address, self.cluster.namespace)
        await self.members.sync()
        await self.members.wait_attached()
        self.background.spawn(self.members.monitor())
        self.ready = True
        self.bus.publish("service.ready", nodes=list(self.members.links))

    async def stop(self, *, agents: bool = False) -> None:
        self.ready = False
        await self.jobs.close()
        await self.background.cancel_all()
        if agents:
            await self.stop_agents()
        if self._joined:
            import ray

            await asyncio.to_thread(ray.shutdown)

    async def stop_agents(self) -> None:
        """Stop every agent's orchestrator and end the agents (they are detached: nothing else does)."""
        import ray

        for link in list(self.members.links.values()):
            with contextlib.suppress(Exception):
                await link.call("stop", what="stop")
            with contextlib.suppress(Exception):
                ray.kill(link.actor)
        self.members.links.clear()
