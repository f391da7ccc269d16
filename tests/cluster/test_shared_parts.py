"""Parts shared on a node's device, as the cluster driver places them: two plain node agents (no
Ray: each behind :class:`LocalActor`, the contract of a Ray actor handle that ``NodeLink`` uses)
and the driver's own parts (membership links, cluster state, catalog, ``ClusterLoads``).

Node a holds two tiny Flux transformers and their parts under a budget that takes the parts only
once; node b holds no model and has room for anything. With the first transformer kept loaded on
node a, the second goes there too, next to it (its parts are already on that device: it needs
room only for its transformer), not to node b; nothing is evicted, and status counts the parts
once."""

from __future__ import annotations

import asyncio
import inspect
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Any

import pytest

from modelkeeper.cluster.agent import NodeAgent
from modelkeeper.cluster.nodes import NodeLink, RayNode
from modelkeeper.cluster.service import ClusterOrchestrator
from modelkeeper.cluster.settings import ClusterSettings
from modelkeeper.orchestrator import LoadOptions, Settings
from modelkeeper.testing import DemoManifest
from modelkeeper.testing.demo import write_demo_models
from tests.cluster.test_agent import node_settings

Q8 = "transformer/tiny-flux-Q8_0.gguf"
FP8 = "transformer/tiny-flux-fp8-e4m3fn.safetensors"
PARTS = ("clip/tiny-clip-l.safetensors", "clip/tiny-t5.safetensors", "vae/tiny-flux-vae.safetensors")
ROLES = ("text_encoder", "text_encoder_2", "vae")


@pytest.fixture(scope="module")
def flux_demo(tmp_path_factory: pytest.TempPathFactory) -> DemoManifest:
    return write_demo_models(
        tmp_path_factory.mktemp("cluster-shared-parts"),
        only=["flux-transformer-q8_0", "flux-transformer-fp8-e4m3fn", "t5", "clip-l", "flux-vae"],
    )


class LocalActor:
    """A :class:`NodeAgent` in this process behind a Ray actor handle's contract:
    ``handle.method.remote(*args)`` answers an awaitable, and for a streaming method (an async
    generator) an async iterator of awaitables, one per item."""

    def __init__(self, agent: NodeAgent) -> None:
        self.agent = agent

    def __getattr__(self, name: str) -> _Method:
        return _Method(getattr(self.agent, name))


class _Method:
    def __init__(self, fn: Callable[..., Any]) -> None:
        self.fn = fn

    def remote(self, *args: Any) -> Any:
        if inspect.isasyncgenfunction(self.fn):
            return _refs(self.fn(*args))
        out = self.fn(*args)
        if inspect.isawaitable(out):
            return asyncio.ensure_future(out)
        done: asyncio.Future[Any] = asyncio.get_running_loop().create_future()
        done.set_result(out)
        return done


async def _refs(items: AsyncIterator[Any]) -> AsyncIterator[asyncio.Future[Any]]:
    async for item in items:
        ref: asyncio.Future[Any] = asyncio.get_running_loop().create_future()
        ref.set_result(item)
        yield ref


async def attach(driver: ClusterOrchestrator, name: str, agent: NodeAgent) -> None:
    """``agent`` started and linked to ``driver`` as ``Membership.attach`` links a Ray node's."""
    link = NodeLink(RayNode(f"id-{name}", name, True, "", named=True), LocalActor(agent))
    state = await link.call("start", what=f"the start of {name}")
    driver.members.links[name] = link
    driver.view.update(name, link.node.id, state)


def test_a_transformer_sharing_the_parts_on_a_node_device_goes_there_without_eviction(
    flux_demo: DemoManifest, tmp_path: Path
) -> None:
    a = node_settings(flux_demo, tmp_path / "a", (Q8, FP8, *PARTS))
    agents = {
        # both transformers with their parts once (about 15.1 MB), not with them twice (about 21.8 MB)
        "node-a": NodeAgent("node-a", {**a, "worker_budget_mb": 17}, workers="inprocess"),
        "node-b": NodeAgent(
            "node-b",
            {**node_settings(flux_demo, tmp_path / "b", ()), "worker_budget_mb": 64},
            workers="inprocess",
        ),
    }

    async def body() -> None:
        driver = ClusterOrchestrator(Settings(), ClusterSettings(workers="inprocess"))
        driver.bus.bind(asyncio.get_running_loop())
        driver.ready = True
        try:
            for name, agent in agents.items():
                await attach(driver, name, agent)
            q8 = (await driver.loads.load(Q8, options=LoadOptions(keep_loaded=True)))["result"]
            assert q8["device"] == "node-a/cpu" and sorted(q8["parts"]) == list(ROLES)
            # what the driver places the second by: its bytes with its parts', the parts shareable
            fp8_model = await driver.catalog.resolve(FP8)
            need, wants = await driver.loads.demand(fp8_model, LoadOptions())
            assert need > fp8_model.need and len(wants) == len(ROLES)
            (view,) = driver.view.device_views(driver.loads.leased)[:1]
            assert view.free < need <= view.free + sum(wants.values())  # it fits only by sharing

            fp8 = (await driver.loads.load(FP8))["result"]
            assert fp8["device"] == "node-a/cpu" and fp8["evicted"] == []
            assert fp8["shared"] == {role: [q8["model_id"]] for role in ROLES}  # by cluster key

            device = driver.views.device("node-a/cpu")
            models = {p["model_id"]: p for p in device["models"]}
            shared = models[fp8["model_id"]]["shared_bytes"]
            assert shared == models[q8["model_id"]]["shared_bytes"] > 0
            assert models[q8["model_id"]]["shared"] == {role: [fp8["model_id"]] for role in ROLES}
            assert all("shares" not in p for p in device["models"])  # the driver's own, not shown
            total = sum(p["bytes"] for p in models.values())
            assert device["memory"]["models_bytes"] == total - shared  # the parts once
            (view,) = driver.view.device_views(driver.loads.leased)[:1]
            assert view.used == total - shared
            # the share keys the node reports for its residents are those of the load's parts
            assert all(dict(r.shares).keys() == wants.keys() for r in view.residents)
            assert driver.view.status()["devices"][1]["models"] == []  # node b: nothing
        finally:
            for agent in agents.values():
                await agent.stop()

    asyncio.run(asyncio.wait_for(body(), 120))
