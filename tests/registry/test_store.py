"""The registry: resolving references, user metadata, history, search, thread safety."""

from __future__ import annotations

import threading
from pathlib import Path

import pytest

from modelkeeper.discovery.hasher import Hasher
from modelkeeper.registry.errors import InvalidMetadata, ModelNotFound
from modelkeeper.registry.store import Registry


def test_resolve_by_id_path_name_and_hash(registry: Registry, models_root: Path) -> None:
    path = models_root / "loras" / "style.safetensors"
    record = registry.resolve(str(path))
    assert record.type == "lora" and record.name == "style"
    assert registry.resolve(record.id).id == record.id
    assert registry.resolve("STYLE").id == record.id  # names are case-insensitive
    assert registry.resolve("loras/style.safetensors").id == record.id  # path relative to its root
    Hasher(registry, max_bytes=100 << 20).run()
    hashed = registry.get(record.id)
    assert hashed.file is not None and hashed.file.hashes.autov2
    assert registry.resolve(hashed.file.hashes.autov2).id == record.id
    assert registry.resolve(hashed.file.hashes.blake3[:10]).id == record.id  # type: ignore[index]
    with pytest.raises(ModelNotFound):
        registry.resolve("no-such-model")
    with pytest.raises(ModelNotFound):
        registry.resolve("abc")  # too short to be a hash prefix


def test_set_meta_and_history(registry: Registry) -> None:
    record = registry.resolve("style")
    updated = registry.set_meta(
        record.id,
        {
            "name": "  Watercolor  ",
            "description": "soft watercolor look",
            "tags": "style, watercolor,style",
            "trigger_words": ["wtrcolor", " paint "],
            "source_url": "https://example.org/lora",
            "license": "CreativeML Open RAIL-M",
            "default_settings": '{"lora_weight": 0.7}',
        },
    )
    assert updated.name == "Watercolor" and updated.name_source == "user"
    assert updated.meta.tags == ["style", "watercolor"]
    assert updated.meta.trigger_words == ["wtrcolor", "paint"]
    assert updated.meta.default_settings == {"lora_weight": 0.7}
    assert updated.meta.license == "CreativeML Open RAIL-M"
    ops = [h.op for h in registry.history(record.id)]
    assert ops[0] == "meta.set" and "scan.added" in ops
    for bad in (
        {"colour": "red"},
        {"default_settings": "[1, 2]"},
        {"default_settings": "{nope"},
        {"name": " "},
        {"tags": 3},
    ):
        with pytest.raises(InvalidMetadata):
            registry.set_meta(record.id, bad)
    with pytest.raises(ModelNotFound):
        registry.set_meta("m-000000000000", {"name": "x"})


def test_user_metadata_survives_a_rescan(registry: Registry, models_root: Path) -> None:
    from modelkeeper.discovery.scanner import Scanner

    record = registry.resolve("style")
    registry.set_meta(record.id, {"name": "Mine", "tags": "keep"})
    path = models_root / "loras" / "style.safetensors"
    path.touch()  # a new mtime: re-identified
    (entry,) = [
        e for e in Scanner(registry, [models_root]).scan().entries if e.path == "loras/style.safetensors"
    ]
    assert entry.change == "updated"
    again = registry.get(record.id)
    assert again.name == "Mine" and again.meta.tags == ["keep"]


def test_search_filters_sort_and_pages(registry: Registry) -> None:
    everything = registry.search(limit=100)
    assert everything.total == 7
    assert {m.type for m in registry.search(type="main").items} == {"main"}
    assert registry.search(type="main").total == 2
    assert {m.name: m.variant for m in registry.search(base="flux").items} == {
        "flux1-dev": "dev",
        "clip_l": "normal",
    }
    assert registry.search(format="diffusers").total == 1
    lora = registry.resolve("style")
    registry.set_meta(lora.id, {"tags": "anime, Style", "description": "an illustration look"})
    assert [m.id for m in registry.search(tag="anime").items] == [lora.id]
    assert [m.id for m in registry.search(query="illustration").items] == [lora.id]  # description
    assert [m.id for m in registry.search(query="anim").items] == [lora.id]  # tags
    assert [m.id for m in registry.search(query="STY").items] == [lora.id]  # name
    by_size = registry.search(sort="size", descending=True).items
    assert [m.size for m in by_size] == sorted((m.size for m in by_size), reverse=True)
    names = [m.name.lower() for m in registry.search(sort="name").items]
    assert names == sorted(names)
    pages = [registry.search(limit=3, offset=o) for o in (0, 3, 6)]
    assert [len(p.items) for p in pages] == [3, 3, 1]
    assert len({m.id for p in pages for m in p.items}) == 7
    with pytest.raises(InvalidMetadata):
        registry.search(sort="colour")


def test_missing_models_leave_the_default_listing(registry: Registry, models_root: Path) -> None:
    from modelkeeper.discovery.scanner import Scanner

    (models_root / "clip" / "clip_l.safetensors").unlink()
    Scanner(registry, [models_root]).scan()
    assert registry.search().total == 6
    missing = registry.search(status="missing")
    assert [m.name for m in missing.items] == ["clip_l"]
    assert registry.search(status=None).total == 7


def test_concurrent_writers(registry: Registry) -> None:
    record = registry.resolve("style")

    def work(i: int) -> None:
        for j in range(20):
            registry.add_history(record.id, "load", {"worker": i, "n": j})

    threads = [threading.Thread(target=work, args=(i,)) for i in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert len([h for h in registry.history(record.id, limit=500) if h.op == "load"]) == 80
