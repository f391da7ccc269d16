"""A model's id and user metadata stay with a live file: copies made and removed, files rewritten
with the same bytes or with other bytes, always through the scanner, on real files and a real
registry file. (The new-user trial found the id of a live file moved onto a deleted copy.)"""

from __future__ import annotations

import os
import random
import shutil
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

from modelkeeper.discovery.hasher import Hasher
from modelkeeper.discovery.scanner import Scanner
from modelkeeper.registry.records import ModelRecord
from modelkeeper.registry.store import Registry

sys.path.insert(0, str(Path(__file__).parents[1] / "discovery"))
from stripped import write_stripped

EMBEDDING = {"emb_params": ("F32", (200, 768))}  # 600 KiB: room between the content key's samples
_MTIME = 1_700_000_000_000_000_000  # a fixed clock: each write gets its own, later, mtime


def _write(path: Path, seed: int) -> Path:
    """An embedding whose weights are bytes drawn from ``seed`` (another seed, another content)."""
    write_stripped(path, EMBEDDING)
    header = 8 + int.from_bytes(path.read_bytes()[:8], "little")
    with open(path, "r+b") as f:
        f.seek(header)
        f.write(random.Random(seed).randbytes(os.path.getsize(path) - header))
    return _stamp(path)


def _stamp(path: Path) -> Path:
    global _MTIME
    _MTIME += 1_000_000_000
    os.utime(path, ns=(_MTIME, _MTIME))
    return path


def _rewrite(path: Path, content: bytes) -> None:
    """Write ``content`` over ``path`` as editors and downloaders do: a new file (a new inode, the
    old one still held while it is written, so never reused) renamed over the old one."""
    tmp = path.with_name(path.name + ".part")
    tmp.write_bytes(content)
    os.replace(tmp, path)
    _stamp(path)


def _copy(src: Path, dst: Path) -> None:
    shutil.copyfile(src, dst)  # like `cp`: a new inode and mtime
    _stamp(dst)


@pytest.fixture(params=[False, True], ids=["unhashed", "hashed"])
def hashing(request: pytest.FixtureRequest) -> bool:
    """Whether the hasher runs after every scan (the service's background hashing does)."""
    return bool(request.param)


@pytest.fixture
def registry(tmp_path: Path) -> Iterator[Registry]:
    """An empty registry file (not the library of this folder's conftest)."""
    reg = Registry.open(tmp_path / "registry.sqlite3")
    yield reg
    reg.close()


def _scan(registry: Registry, root: Path, hashing: bool) -> None:
    Scanner(registry, [str(root)]).scan()
    if hashing:
        Hasher(registry).run()


def _models(registry: Registry) -> list[tuple[str, str, str]]:
    """(id, path, status) of every model, present or not."""
    page = registry.search(status=None, limit=100)
    return sorted((m.id, m.path or "", m.status) for m in page.items)


def _locations(record: ModelRecord) -> list[tuple[str, str]]:
    return [(os.path.basename(f.path), f.status) for f in record.locations]


def test_the_trial_sequence_keeps_the_id_on_the_live_file(
    tmp_path: Path, registry: Registry, hashing: bool
) -> None:
    root = tmp_path / "models"
    a, b = root / "unet" / "a.safetensors", root / "unet" / "b.safetensors"
    _write(a, seed=1)
    _scan(registry, root, hashing)
    model = registry.resolve("a")
    registry.set_meta(model.id, {"tags": "keep", "description": "mine"})

    _copy(a, b)
    _scan(registry, root, hashing)
    assert _locations(registry.get(model.id)) == [("a.safetensors", "ok"), ("b.safetensors", "ok")]

    b.unlink()
    _scan(registry, root, hashing)
    record = registry.get(model.id)
    assert record.status == "ok" and _locations(record) == [("a.safetensors", "ok")]  # b dropped

    _rewrite(a, a.read_bytes())  # the same bytes: a new inode and mtime
    _scan(registry, root, hashing)
    assert _models(registry) == [(model.id, str(a), "ok")]
    kept = registry.resolve("a")
    assert kept.id == model.id and kept.meta.tags == ["keep"] and kept.meta.description == "mine"
    assert "meta.set" in [h.op for h in registry.history(model.id)]


def test_same_bytes_at_two_paths_then_the_first_removed(
    tmp_path: Path, registry: Registry, hashing: bool
) -> None:
    root = tmp_path / "models"
    a, b = root / "a" / "x.safetensors", root / "b" / "x.safetensors"
    _write(a, seed=1)
    b.parent.mkdir()
    _copy(a, b)
    _scan(registry, root, hashing)
    (only,) = registry.search().items
    registry.set_meta(only.id, {"tags": "keep"})

    a.unlink()
    _scan(registry, root, hashing)
    assert _models(registry) == [(only.id, str(b), "ok")]
    assert _locations(registry.get(only.id)) == [("x.safetensors", "ok")]

    _rewrite(b, b.read_bytes())
    _scan(registry, root, hashing)
    assert _models(registry) == [(only.id, str(b), "ok")]
    assert registry.get(only.id).meta.tags == ["keep"]


def test_a_copy_rewritten_with_the_same_bytes_stays_a_location(
    tmp_path: Path, registry: Registry, hashing: bool
) -> None:
    root = tmp_path / "models"
    a, b = root / "a.safetensors", root / "b.safetensors"
    _write(a, seed=1)
    _copy(a, b)
    _scan(registry, root, hashing)
    model = registry.resolve("a")

    _rewrite(a, a.read_bytes())
    _scan(registry, root, hashing)
    assert registry.search(status=None).total == 1
    assert _locations(registry.get(model.id)) == [("a.safetensors", "ok"), ("b.safetensors", "ok")]


def test_a_lone_file_rewritten_with_other_bytes_keeps_its_id(
    tmp_path: Path, registry: Registry, hashing: bool
) -> None:
    """One location: the path is the model (DISCOVERY.md: a rescan updates it, metadata kept)."""
    root = tmp_path / "models"
    a = _write(root / "a.safetensors", seed=1)
    _scan(registry, root, hashing)
    model = registry.resolve("a")
    registry.set_meta(model.id, {"tags": "keep"})

    _rewrite(a, _write(tmp_path / "other.safetensors", seed=2).read_bytes())
    _scan(registry, root, hashing)
    assert _models(registry) == [(model.id, str(a), "ok")]
    assert registry.get(model.id).meta.tags == ["keep"]


def test_a_copy_rewritten_with_other_bytes_leaves_the_model(
    tmp_path: Path, registry: Registry, hashing: bool
) -> None:
    """Two present locations, one changes: it is another model now; the id stays with the content."""
    root = tmp_path / "models"
    a, b = root / "a.safetensors", root / "b.safetensors"
    _write(a, seed=1)
    _copy(a, b)
    _scan(registry, root, hashing)
    model = registry.resolve("a")
    registry.set_meta(model.id, {"tags": "keep"})

    _rewrite(a, _write(tmp_path / "other.safetensors", seed=2).read_bytes())
    _scan(registry, root, hashing)
    changed = registry.resolve(str(a))
    assert changed.id != model.id and changed.meta.tags == []
    kept = registry.get(model.id)
    assert kept.status == "ok" and kept.meta.tags == ["keep"]
    assert _locations(kept) == [("b.safetensors", "ok")]


@pytest.mark.parametrize("same_scan", [True, False], ids=["one-scan", "two-scans"])
def test_the_copy_removed_and_the_file_rewritten_with_other_bytes(
    tmp_path: Path, registry: Registry, hashing: bool, same_scan: bool
) -> None:
    """The copy goes (in the same scan or before it) and the live file changes: it keeps the id."""
    root = tmp_path / "models"
    a, b = root / "a.safetensors", root / "b.safetensors"
    _write(a, seed=1)
    _copy(a, b)
    _scan(registry, root, hashing)
    model = registry.resolve("a")
    registry.set_meta(model.id, {"tags": "keep"})

    b.unlink()
    if not same_scan:
        _scan(registry, root, hashing)
    _rewrite(a, _write(tmp_path / "other.safetensors", seed=2).read_bytes())
    _scan(registry, root, hashing)
    assert _models(registry) == [(model.id, str(a), "ok")]
    record = registry.get(model.id)
    assert record.meta.tags == ["keep"] and _locations(record) == [("a.safetensors", "ok")]


def test_a_deleted_model_comes_back_with_a_copy_of_its_file(
    tmp_path: Path, registry: Registry, hashing: bool
) -> None:
    """All locations gone: the model is missing, its location kept to be found again; a file with
    its content (restored from a backup, under another name) takes it back before any hashing."""
    root = tmp_path / "models"
    a = _write(root / "a.safetensors", seed=1)
    content = a.read_bytes()
    _scan(registry, root, hashing)
    model = registry.resolve("a")
    registry.set_meta(model.id, {"tags": "keep"})

    a.unlink()
    _scan(registry, root, hashing)
    assert _models(registry) == [(model.id, str(a), "missing")]
    assert _locations(registry.get(model.id)) == [("a.safetensors", "missing")]

    restored = root / "restored.safetensors"
    restored.write_bytes(content)
    _stamp(restored)
    Scanner(registry, [str(root)]).scan()
    assert _models(registry) == [(model.id, str(restored), "ok")]
    record = registry.get(model.id)
    assert record.meta.tags == ["keep"] and _locations(record) == [("restored.safetensors", "ok")]
