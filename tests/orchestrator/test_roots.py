"""The service serves its model roots: it lists, resolves and hashes only what lies under them
(the registry's entries of other folders kept, not served), marks missing the entries of folders
that are gone, and watches its roots for added, moved and removed files."""

from __future__ import annotations

import asyncio
import os
import shutil
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from modelkeeper.discovery.scanner import Scanner
from modelkeeper.orchestrator import Orchestrator
from modelkeeper.orchestrator.errors import PathOutsideRoots
from modelkeeper.registry.store import Registry
from modelkeeper.testing import DemoManifest
from tests.orchestrator.conftest import run, serving

pytestmark = pytest.mark.xdist_group("orchestrator-inprocess")

CLIP_L = "clip/tiny-clip-l.safetensors"
LORA = "loras/tiny-sd15-kohya.safetensors"
EMBEDDING = "embeddings/tiny-sd15-a1111.safetensors"


def _copy(demo: DemoManifest, rel: str, root: Path) -> Path:
    dest = root / rel
    dest.parent.mkdir(parents=True, exist_ok=True)
    shutil.copyfile(demo.root / rel, dest)
    return dest


async def _until(check: Callable[[], Any], timeout: float = 30.0) -> Any:
    """Poll ``check`` until it returns something true (the watcher's rescan has landed)."""
    deadline = asyncio.get_running_loop().time() + timeout
    while not (result := await check()):
        assert asyncio.get_running_loop().time() < deadline, "the watcher did not register the change"
        await asyncio.sleep(0.1)
    return result


def test_the_service_serves_its_roots_only(demo: DemoManifest, tmp_path: Path) -> None:
    served, other, gone = tmp_path / "served", tmp_path / "other", tmp_path / "gone"
    _copy(demo, CLIP_L, served)
    _copy(demo, LORA, other)
    _copy(demo, EMBEDDING, gone)
    db = tmp_path / "registry.sqlite3"
    with Registry.open(db) as registry:  # a registry that knows other folders (modelkeeper scan)
        Scanner(registry, [other, gone]).scan()
    shutil.rmtree(gone)

    async def body() -> None:
        async with serving(demo, tmp_path, model_roots=[served], hash_on_start=True, watch=False) as orch:
            listed = await orch.views.list_models(limit=100)
            assert [m["handle"] for m in listed["items"]] == ["tiny-clip-l"]
            assert [m["name"] for m in await orch.views.available()] == ["tiny-clip-l"]
            with pytest.raises(PathOutsideRoots) as info:
                await orch.catalog.resolve("tiny-sd15-kohya")
            assert "allow_outside_roots" in info.value.message
            assert info.value.details["setting"] == "allow_outside_roots"
            registry = orch.catalog.registry
            lora = registry.resolve("tiny-sd15-kohya")
            assert lora.status == "ok" and lora.file is not None
            assert lora.file.hashes.blake3 is None  # another folder's entry: kept, not hashed
            clip = await orch.catalog.resolve("tiny-clip-l")
            assert clip.file is not None and clip.file.hashes.blake3  # the served one is hashed
            embedding = registry.resolve("tiny-sd15-a1111")
            assert embedding.status == "missing"  # its folder is gone

    run(body)


def test_serving_outside_the_roots_is_a_setting(demo: DemoManifest, tmp_path: Path) -> None:
    served, other = tmp_path / "served", tmp_path / "other"
    _copy(demo, CLIP_L, served)
    _copy(demo, LORA, other)
    with Registry.open(tmp_path / "registry.sqlite3") as registry:
        Scanner(registry, [other]).scan()

    async def body() -> None:
        async with serving(
            demo, tmp_path, model_roots=[served], allow_outside_roots=True, watch=False
        ) as orch:
            assert (await orch.catalog.resolve("tiny-sd15-kohya")).type == "lora"
            assert (await orch.views.list_models(limit=100))["total"] == 2

    run(body)


def test_the_watcher_registers_added_moved_and_removed_files(demo: DemoManifest, tmp_path: Path) -> None:
    served = tmp_path / "served"
    _copy(demo, CLIP_L, served)

    async def body() -> None:
        async with serving(demo, tmp_path, model_roots=[served], watch_debounce_ms=100) as orch:

            async def listed(name: str, status: str = "ok") -> list[dict[str, Any]]:
                page = await orch.views.list_models(query=name, status=status, limit=10)
                return list(page["items"])

            added = _copy(demo, LORA, served)
            (item,) = await _until(lambda: listed("tiny-sd15-kohya"))
            moved = served / "loras" / "renamed.safetensors"
            os.rename(added, moved)
            await _until(lambda: _path_is(orch, item["id"], moved))
            os.unlink(moved)
            await _until(lambda: listed("tiny-sd15-kohya", "missing"))
            assert orch.watcher.scans >= 3

    run(body)


async def _path_is(orch: Orchestrator, model_id: str, path: Path) -> bool:
    record = await orch.catalog.get(model_id)
    return record.path == str(path) and record.status == "ok"


def test_a_model_loads_by_handle_and_status_shows_it(demo: DemoManifest, tmp_path: Path) -> None:
    served = tmp_path / "served"
    _copy(demo, CLIP_L, served)
    shutil.copyfile(served / CLIP_L, served / "clip" / "zz-copy.safetensors")  # a second location
    (served / "text_encoders").mkdir()
    shutil.copyfile(
        demo.root / "clip/tiny-t5.safetensors", served / "text_encoders" / "tiny-clip-l.safetensors"
    )

    async def body() -> None:
        async with serving(demo, tmp_path, model_roots=[served], watch=False) as orch:
            handles = sorted(m["handle"] for m in (await orch.views.list_models(limit=10))["items"])
            assert handles == ["tiny-clip-l@clip", "tiny-clip-l@text_encoders"]  # the first location names it
            assert len((await orch.catalog.resolve("tiny-clip-l@clip")).locations) == 2
            loaded = (await orch.loads.load("tiny-clip-l@clip"))["result"]
            (placement,) = orch.views.status()["devices"][0]["models"]
            assert placement["handle"] == "tiny-clip-l@clip" and placement["model_id"] == loaded["model_id"]

    run(body)
