"""Ray, as the driver sees it: the node table, the agents (found by name or started), calls.

A node's name comes from its ``modelkeeper-node:<name>`` resource, else its id (``node-1a2b3c4d``).
Its agent is the detached actor ``modelkeeper-agent-<name>``, pinned to the node (hard node
affinity, no CPU reserved): a restarted driver finds it again by name. ``NodeLink.call`` turns an
agent's answer back into the ``ProtocolError`` raised there, and a dead node (Ray's actor errors,
or the driver marking it lost) into :class:`NodeLost` at once, for every call in flight.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Any, TypeVar

import ray
from ray.exceptions import ActorUnavailableError, RayActorError
from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

from modelkeeper import cache as cache_errors  # its __all__ names the RAM cache's errors
from modelkeeper.cluster import errors as cluster_errors
from modelkeeper.cluster.agent import NodeAgent
from modelkeeper.cluster.errors import NodeLost
from modelkeeper.cluster.settings import AGENT_PREFIX, NODE_RESOURCE, ClusterSettings
from modelkeeper.orchestrator import errors as orch_errors
from modelkeeper.protocol.errors import ErrorCode, ProtocolError
from modelkeeper.registry import errors as registry_errors

#: Error classes an agent's answer may name, raised again as themselves on the driver.
KNOWN_ERRORS: dict[str, type[ProtocolError]] = {
    name: cls
    for module in (orch_errors, cluster_errors, registry_errors, cache_errors)
    for name in getattr(module, "__all__", ())
    if isinstance(cls := getattr(module, name), type) and issubclass(cls, ProtocolError)
}
T = TypeVar("T")


@dataclass(frozen=True)
class RayNode:
    id: str
    name: str
    alive: bool
    address: str
    named: bool = False  # has a modelkeeper-node:<name> resource


def node_name(info: dict[str, Any]) -> str:
    for resource in info.get("Resources", {}):
        if str(resource).startswith(NODE_RESOURCE):
            return str(resource)[len(NODE_RESOURCE) :]
    return "node-" + str(info["NodeID"])[:8]


def read_nodes() -> list[RayNode]:
    """Ray's node table (about 0.3 ms): every node it knows, alive or not."""
    return [
        RayNode(
            str(n["NodeID"]),
            node_name(n),
            bool(n["Alive"]),
            str(n.get("NodeManagerAddress", "")),
            any(r.startswith(NODE_RESOURCE) for r in n.get("Resources", {})),
        )
        for n in ray.nodes()  # type: ignore[no-untyped-call]
    ]


def raise_error(error: dict[str, Any]) -> None:
    cls = KNOWN_ERRORS.get(str(error.get("class")), ProtocolError)
    exc = cls(str(error["message"]), ErrorCode(error["code"]), **(error.get("details") or {}))
    raise exc


class NodeLink:
    """The driver's link to one node's agent."""

    def __init__(self, node: RayNode, actor: Any) -> None:
        self.node = node
        self.actor = actor
        self.lost = asyncio.Event()

    @property
    def name(self) -> str:
        return self.node.name

    def mark_lost(self) -> None:
        self.lost.set()

    async def raw(self, method: str, *args: Any, what: str) -> Any:
        """``method(*args)`` on the agent, as Ray returns it; NodeLost when the node goes."""
        self._check(what)
        ref = getattr(self.actor, method).remote(*args)
        return await self._guard(_await(ref), what)

    async def stream(
        self, method: str, *args: Any, what: str, on_progress: Callable[[dict[str, Any]], None]
    ) -> Any:
        """A streaming method of the agent (``stream``, ``fetch``): every ``{"progress"}`` it yields
        goes to ``on_progress``, the last answer is returned as ``call`` returns it. Cancelled
        here (the driver's job cancelled), the generator is cancelled on the node too."""
        self._check(what)
        gen = getattr(self.actor, method).remote(*args)

        async def consume() -> dict[str, Any]:
            async for ref in gen:
                item: dict[str, Any] = await ref
                if "progress" in item:
                    on_progress(item["progress"])
                else:
                    return item
            raise NodeLost(f"node {self.name} ended {what} without an answer", node=self.name)

        try:
            answer = await self._guard(consume(), what)
        except asyncio.CancelledError:
            with contextlib.suppress(Exception):
                ray.cancel(gen)
            raise
        return _unwrap(answer)

    def _check(self, what: str) -> None:
        if self.lost.is_set():
            raise NodeLost(f"node {self.name} is lost: {what} not sent", node=self.name)

    async def _guard(self, work: Awaitable[T], what: str) -> T:
        """``work``, failing with NodeLost at once when the node is lost meanwhile."""
        call = asyncio.ensure_future(work)
        lost = asyncio.ensure_future(self.lost.wait())
        try:
            await asyncio.wait({call, lost}, return_when=asyncio.FIRST_COMPLETED)
        finally:
            lost.cancel()
            if not call.done():
                call.cancel()
        if not call.done() or call.cancelled():
            raise NodeLost(f"node {self.name} was lost during {what}", node=self.name)
        try:
            return call.result()
        except (RayActorError, ActorUnavailableError) as exc:
            self.lost.set()
            raise NodeLost(
                f"node {self.name} was lost during {what} ({type(exc).__name__})", node=self.name
            ) from None

    async def call(self, method: str, *args: Any, what: str) -> Any:
        """Like ``raw`` for a method that answers ``{"ok"}`` or ``{"error"}`` (see agent.py)."""
        return _unwrap(await self.raw(method, *args, what=what))


def _unwrap(answer: dict[str, Any]) -> Any:
    if "error" in answer:
        raise_error(answer["error"])
    return answer["ok"]


async def _await(ref: Any) -> Any:
    return await ref


def agent_for(node: RayNode, settings: ClusterSettings, agent_class: type[NodeAgent] = NodeAgent) -> Any:
    """The agent of ``node``: the running one found by name, else a new one pinned there (blocking)."""
    options = {
        "name": AGENT_PREFIX + node.name,
        "namespace": settings.namespace,
        "lifetime": "detached",
        "get_if_exists": True,
        "num_cpus": 0,
        "max_restarts": 0,
        "scheduling_strategy": NodeAffinitySchedulingStrategy(node.id, soft=False),
    }
    actor_class = ray.remote(agent_class)
    return actor_class.options(**options).remote(
        node.name,
        settings.overrides_for(node.name),
        workers=settings.workers,
        receive_dir=settings.receive_dir,
    )
