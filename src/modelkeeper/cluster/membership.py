"""Membership: which nodes take part, their agents, and the cluster view kept fresh.

``sync`` reads Ray's node table: a node that joined gets its agent (found by name after a driver
restart, else started) and is used as soon as it answers; a node that is no longer alive is lost
at once: its link fails every call in flight (:class:`NodeLost`), its devices leave the view, and
``on_lost`` is told what was placed there. ``monitor`` runs ``sync`` every ``node_poll_s`` and
refreshes every node's state every ``refresh_s``; operations refresh the nodes they touch.
"""

from __future__ import annotations

import asyncio
import itertools
import logging
import time
from collections.abc import Awaitable, Callable
from typing import Any

from modelkeeper.cluster.agent import NodeAgent
from modelkeeper.cluster.errors import NodeLost
from modelkeeper.cluster.nodes import NodeLink, RayNode, agent_for, read_nodes
from modelkeeper.cluster.settings import ClusterSettings
from modelkeeper.cluster.view import ClusterState
from modelkeeper.orchestrator.errors import DeviceNotFound
from modelkeeper.orchestrator.events import EventBus
from modelkeeper.protocol.errors import ProtocolError

log = logging.getLogger(__name__)
LostHandler = Callable[[str, list[dict[str, Any]]], Awaitable[None]]


class Membership:
    def __init__(
        self,
        settings: ClusterSettings,
        view: ClusterState,
        bus: EventBus,
        *,
        agent_class: type[NodeAgent] = NodeAgent,
    ) -> None:
        self.settings = settings
        self.view = view
        self.bus = bus
        self.agent_class = agent_class
        self.links: dict[str, NodeLink] = {}
        self.lost: dict[str, float] = {}  # node name -> when it was lost
        self.on_lost: LostHandler | None = None
        self._attaching: dict[str, asyncio.Task[None]] = {}
        self._asked = itertools.count()  # the order state reads are sent in
        self._applied: dict[str, int] = {}  # node name -> the last state read applied

    def link(self, node: str) -> NodeLink:
        link = self.links.get(node)
        if link is None:
            raise DeviceNotFound(
                f"no node {node!r} in the cluster (nodes: {', '.join(self.links) or 'none'})", node=node
            )
        return link

    # ------------------------------------------------------------------ joining and leaving

    async def sync(self) -> None:
        """Attach the nodes that joined, lose the ones that died (see the module docstring)."""
        nodes = await asyncio.to_thread(read_nodes)
        alive = {n.name: n for n in nodes if n.alive and (n.named or not self.settings.named_nodes_only)}
        for name in [n for n in self.links if n not in alive]:
            await self.lose(name, "Ray reports the node dead")
        for name, node in alive.items():
            if name not in self.links and name not in self._attaching:
                self._attaching[name] = asyncio.ensure_future(self._attach_logged(node))

    async def wait_attached(self) -> None:
        while self._attaching:
            await asyncio.gather(*list(self._attaching.values()), return_exceptions=True)

    async def _attach_logged(self, node: RayNode) -> None:
        try:
            await self.attach(node)
        except Exception as exc:
            log.error("the agent of node %s did not start: %s", node.name, exc)
            self.bus.publish("node.failed", node=node.name, error=str(exc))
        finally:
            self._attaching.pop(node.name, None)

    async def attach(self, node: RayNode) -> None:
        actor = await asyncio.to_thread(agent_for, node, self.settings, self.agent_class)
        link = NodeLink(node, actor)
        state = await asyncio.wait_for(
            link.call("start", what=f"the start of the agent of {node.name}"),
            self.settings.agent_start_timeout,
        )
        self.links[node.name] = link
        self.lost.pop(node.name, None)
        self.view.update(node.name, node.id, state)
        self.bus.publish(
            "node.joined", node=node.name, node_id=node.id, devices=[d["id"] for d in state["devices"]]
        )

    async def lose(self, name: str, reason: str) -> None:
        link = self.links.pop(name, None)
        if link is None:
            return
        link.mark_lost()
        placements = self.view.placements()
        gone = [p for p in placements if p["node"] == name]
        self.view.drop(name)
        self.lost[name] = time.time()
        log.warning("node %s lost: %s", name, reason)
        self.bus.publish("node.lost", node=name, reason=reason, placements=[p["device"] for p in gone])
        for p in gone:
            self.bus.publish("model.lost", model_id=p["model_id"], device=p["device"], node=name)
        if self.on_lost is not None:
            await self.on_lost(name, gone)

    # ------------------------------------------------------------------ freshness

    async def refresh(self, node: str | None = None) -> None:
        """The state of ``node`` (every node when None) read again; a node that does not answer is lost."""
        names = [node] if node is not None else list(self.links)
        await asyncio.gather(*(self._refresh_one(n) for n in names))

    async def _refresh_one(self, name: str) -> None:
        link = self.links.get(name)
        if link is None:
            return
        asked = next(self._asked)
        try:
            state = await link.call("state", what=f"the state of {name}")
        except NodeLost as exc:
            await self.lose(name, exc.message)
            return
        except ProtocolError as exc:
            log.warning("state of %s not refreshed: %s", name, exc.message)
            return
        if name in self.links and asked > self._applied.get(name, -1):  # never an older read over a newer
            self._applied[name] = asked
            self.view.update(name, link.node.id, state)

    async def monitor(self) -> None:
        """``sync`` every ``node_poll_s``, every node refreshed every ``refresh_s`` (a background task)."""
        last = time.monotonic()
        while True:
            await asyncio.sleep(self.settings.node_poll_s)
            try:
                await self.sync()
                if time.monotonic() - last >= self.settings.refresh_s:
                    last = time.monotonic()
                    await self.refresh()
            except Exception:  # the next round tries again; the loop never dies
                log.exception("cluster membership round failed")
