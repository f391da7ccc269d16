"""The node agent as a plain object (no Ray): its state, its files, the bounds of ``read``, and the
models it receives into RAM only, kept apart from another agent's of the same node name."""

from __future__ import annotations

import asyncio
import shutil
import subprocess
import sys
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest

from modelkeeper.cache.segment import SHM_DIR
from modelkeeper.cluster.agent import NodeAgent
from modelkeeper.cluster.receive import ram_root
from modelkeeper.orchestrator import LoadOptions
from modelkeeper.testing import DemoManifest

CLIP_L = "clip/tiny-clip-l.safetensors"
SD15 = "diffusers/tiny-sd15"


async def last(answers: AsyncIterator[dict[str, Any]]) -> dict[str, Any]:
    answers_seen = [a async for a in answers]
    return answers_seen[-1]


def node_settings(demo: DemoManifest, folder: Path, models: tuple[str, ...]) -> dict[str, Any]:
    """A node's settings: ``models`` of the demo set copied under ``folder/models``, its own registry."""
    root = folder / "models"
    root.mkdir(parents=True)
    for rel in models:
        (root / rel).parent.mkdir(parents=True, exist_ok=True)
        src = demo.root / rel
        (shutil.copytree if src.is_dir() else shutil.copy2)(src, root / rel)
    return {
        "model_roots": [str(root)], "db": str(folder / "registry.sqlite3"), "devices": ["cpu"],
        "ram_cache_bytes": 32 << 20, "worker_warm": False, "status_poll_s": 60,
    }  # fmt: skip


class Peer:
    """Another node's agent as a receiver reaches it through Ray: ``read.remote(...)`` answers an
    awaitable (an ``ObjectRef`` there, a task here) of the same bytes."""

    def __init__(self, agent: NodeAgent) -> None:
        self.read = self
        self.agent = agent

    def remote(self, *args: Any) -> asyncio.Future[Any]:
        return asyncio.ensure_future(self.agent.read(*args))


def test_state_files_and_read(demo: DemoManifest, tmp_path: Path) -> None:
    root = tmp_path / "models"
    overrides = node_settings(demo, tmp_path, (CLIP_L, SD15))

    async def body() -> None:
        agent = NodeAgent("node-x", overrides, workers="inprocess")
        state = (await agent.start())["ok"]
        try:
            assert state["node"] == "node-x" and [d["id"] for d in state["devices"]] == ["cpu"]
            models = {m["name"]: m for m in state["models"]}
            clip = models["tiny-clip-l"]
            assert len(clip["key"]) == 64 and clip["need"] > 0  # hashed on start: the key is BLAKE3
            # a folder model lists every file, relative to the folder's parent
            files = (await agent.files(models["tiny-sd15"]["model_id"]))["ok"]
            assert all(f["rel"].startswith("tiny-sd15/") for f in files)
            data = await agent.read(clip["model_id"], "tiny-clip-l.safetensors", 8, 16)
            assert data.tobytes() == (root / CLIP_L).read_bytes()[8:24]
            with pytest.raises(Exception, match="not a file of model"):
                await agent.read(clip["model_id"], "../../registry.sqlite3", 0, 16)
            with pytest.raises(Exception, match="not a file of model"):
                await agent.read(models["tiny-sd15"]["model_id"], "tiny-sd15/../../registry.sqlite3", 0, 16)
            # errors come back as data, their class and code kept
            missing = await last(agent.stream("loads", "load", ["no-such-model", "cpu"], {}))
            assert (
                missing["error"]["class"] == "ModelNotFound" and missing["error"]["code"] == "MODEL_NOT_FOUND"
            )
            options = {"options": LoadOptions(keep_loaded=True)}
            streamed = [a async for a in agent.stream("loads", "load", [clip["model_id"], "cpu"], options)]
            assert all("progress" in a for a in streamed[:-1]) and len(streamed) >= 2
            loaded = streamed[-1]["ok"]
            assert loaded["device"] == "cpu" and loaded["keep_loaded"]
            placed = (await agent.state())["ok"]["devices"][0]["placements"]
            assert [p["model_id"] for p in placed] == [clip["model_id"]]
            # only the parts' methods the driver uses are offered
            refused = await agent.call("catalog", "close", [], {})
            assert refused["error"]["code"] == "INVALID_REQUEST"
        finally:
            await agent.stop()

    asyncio.run(asyncio.wait_for(body(), 120))


async def received_into_ram(source: NodeAgent, target: NodeAgent) -> dict[str, Any]:
    """The first model of ``source`` sent to ``target``, into its RAM only: the receiver's answer."""
    model = (await source.state())["ok"]["models"][0]
    files = (await source.files(model["model_id"]))["ok"]
    got = await last(
        target.fetch(model["key"], Peer(source), model["model_id"], files, 1 << 20, 2, to_disk=False)
    )
    return {**got["ok"], "key": model["key"]}


def test_agents_of_one_node_name_keep_their_models_received_into_ram_apart(
    demo: DemoManifest, tmp_path: Path
) -> None:
    """Two clusters on one machine (two services, or test runs side by side) may each have a node
    named ``node-x``: the RAM root of one agent is its own, so the other's start (which sweeps the
    leftovers of agents that are gone) or stop does not delete what it received."""
    dead = subprocess.run(
        [sys.executable, "-c", "import os; print(os.getpid())"], check=True, capture_output=True
    )
    leftover = ram_root("node-x", f"{int(dead.stdout)}-0")  # an agent that died without stopping
    (leftover / "abc").mkdir(parents=True)
    source = NodeAgent("node-src", node_settings(demo, tmp_path / "src", (CLIP_L,)), workers="inprocess")
    first = NodeAgent("node-x", node_settings(demo, tmp_path / "x1", ()), workers="inprocess")
    second = NodeAgent("node-x", node_settings(demo, tmp_path / "x2", ()), workers="inprocess")

    async def body() -> None:
        await source.start()
        await first.start()
        assert not leftover.exists()  # swept: its owner is gone
        try:
            got = await received_into_ram(source, first)
            received = Path(got["path"])
            assert received.is_relative_to(SHM_DIR) and received.exists()
            await second.start()  # the other cluster's node-x: nothing of the first's is touched
            assert received.exists()
            assert [m["key"] for m in (await second.state())["ok"]["models"]] == []
            loaded = await last(first.stream("loads", "load", [got["model_id"], "cpu"], {}))
            assert set(loaded["ok"]["sources"].values()) == {"ram"}
            await second.stop()
            assert received.exists()
        finally:
            await second.stop()
            await first.stop()
            await source.stop()
        assert not received.parents[1].exists()  # its RAM root goes with the agent

    asyncio.run(asyncio.wait_for(body(), 120))


def test_a_model_received_into_ram_whose_files_were_deleted_is_forgotten(
    demo: DemoManifest, tmp_path: Path
) -> None:
    """Files of a model received into RAM only, deleted from outside the agent while its segments
    are still cached: at its next state the node no longer lists the model, so the driver does
    not place loads there (its RAM tier) that would fail on the missing file."""
    source = NodeAgent("node-src", node_settings(demo, tmp_path / "src", (CLIP_L,)), workers="inprocess")
    node = NodeAgent("node-y", node_settings(demo, tmp_path / "y", ()), workers="inprocess")

    async def listed() -> dict[str, int]:
        return {m["key"]: m["ram_bytes"] for m in (await node.state())["ok"]["models"]}

    async def body() -> None:
        await source.start()
        await node.start()
        try:
            got = await received_into_ram(source, node)
            assert (await listed())[got["key"]] > 0  # in its RAM cache: the tier placement prefers
            shutil.rmtree(Path(got["path"]).parent)
            assert got["key"] not in await listed()
            # its segments stay (hard links: their pages are whole) until the cache evicts them
            segments = (await node.state())["ok"]["segments"]
            assert got["segments"] and {s["component_id"] for s in segments} == set(got["segments"])
        finally:
            await node.stop()
            await source.stop()

    asyncio.run(asyncio.wait_for(body(), 120))
