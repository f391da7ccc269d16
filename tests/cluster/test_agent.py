"""The node agent as a plain object (no Ray): its state, its files, and the bounds of ``read``."""

from __future__ import annotations

import asyncio
import shutil
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest

from modelkeeper.cluster.agent import NodeAgent
from modelkeeper.orchestrator import LoadOptions
from modelkeeper.testing import DemoManifest

CLIP_L = "clip/tiny-clip-l.safetensors"
SD15 = "diffusers/tiny-sd15"


async def last(answers: AsyncIterator[dict[str, Any]]) -> dict[str, Any]:
    answers_seen = [a async for a in answers]
    return answers_seen[-1]


def test_state_files_and_read(demo: DemoManifest, tmp_path: Path) -> None:
    root = tmp_path / "models"
    for rel in (CLIP_L, SD15):
        (root / rel).parent.mkdir(parents=True, exist_ok=True)
        src = demo.root / rel
        (shutil.copytree if src.is_dir() else shutil.copy2)(src, root / rel)
    overrides: dict[str, Any] = {
        "model_roots": [str(root)], "db": str(tmp_path / "registry.sqlite3"), "devices": ["cpu"],
        "ram_cache_bytes": 32 << 20, "worker_warm": False, "status_poll_s": 60,
    }  # fmt: skip

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
