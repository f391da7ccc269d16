"""One model, several locations: copies, links and several roots hold one model; hashing confirms
or undoes what the content key suggested; a location that goes leaves the model."""

from __future__ import annotations

import os
import shutil
import sys
from pathlib import Path

from modelkeeper.discovery.hasher import Hasher
from modelkeeper.discovery.scanner import Scanner
from modelkeeper.registry.store import Registry

sys.path.insert(0, str(Path(__file__).parents[1] / "discovery"))
from stripped import write_stripped

BIG_EMBEDDING = {"emb_params": ("F32", (200, 768))}  # 600 KiB: room between the sampled spans


def _scan(registry: Registry, *roots: Path) -> None:
    Scanner(registry, list(roots)).scan()


def _flip(path: Path, offset: int) -> None:
    with open(path, "r+b") as f:
        f.seek(offset)
        byte = f.read(1)
        f.seek(offset)
        f.write(bytes([byte[0] ^ 0xFF]))


def test_comfyui_and_a1111_side_by_side_hold_one_model(tmp_path: Path) -> None:
    comfy, a1111 = tmp_path / "ComfyUI" / "models", tmp_path / "webui" / "models"
    write_stripped(comfy / "embeddings" / "neg.safetensors", BIG_EMBEDDING)
    (a1111 / "embeddings").mkdir(parents=True)
    shutil.copy2(comfy / "embeddings" / "neg.safetensors", a1111 / "embeddings" / "neg.safetensors")
    os.symlink(comfy / "embeddings" / "neg.safetensors", a1111 / "embeddings" / "neg-link.safetensors")
    with Registry.open(tmp_path / "r.sqlite3") as registry:
        _scan(registry, comfy, a1111)
        (only,) = registry.search().items
        assert only.locations == 3 and only.handle == "neg"
        record = registry.resolve("neg")
        assert record.path == str(comfy / "embeddings" / "neg.safetensors")  # the first found
        assert {f.path for f in record.locations} == {
            str(comfy / "embeddings" / "neg.safetensors"),
            str(a1111 / "embeddings" / "neg.safetensors"),
            str(a1111 / "embeddings" / "neg-link.safetensors"),
        }
        for f in record.locations:  # every path resolves to it
            assert registry.resolve(f.path).id == record.id
        report = Hasher(registry).run()
        assert report.hashed == 2  # the link shares the hashes of its target, read once
        hashed = registry.get(record.id)
        assert len({f.hashes.blake3 for f in hashed.locations}) == 1
        assert registry.search().total == 1  # hashing confirmed the copy
        # One root alone: the model is there, by the path under it.
        in_a1111 = registry.resolve("neg", roots=[str(a1111)])
        assert in_a1111.id == record.id and (in_a1111.path or "").startswith(str(a1111) + "/")


def test_a_copy_that_hashing_shows_different_gets_its_own_model(tmp_path: Path) -> None:
    root = tmp_path / "models"
    write_stripped(root / "a" / "emb.safetensors", BIG_EMBEDDING)
    (root / "b").mkdir()
    shutil.copy2(root / "a" / "emb.safetensors", root / "b" / "emb.safetensors")
    _flip(root / "b" / "emb.safetensors", 100_000)  # outside the content key's samples
    with Registry.open(tmp_path / "r.sqlite3") as registry:
        _scan(registry, root)
        assert registry.search().total == 1  # provisionally one model
        original = registry.resolve(str(root / "a" / "emb.safetensors"))
        registry.set_meta(original.id, {"description": "mine"})
        Hasher(registry).run()
        assert registry.search().total == 2
        first = registry.resolve(str(root / "a" / "emb.safetensors"))
        other = registry.resolve(str(root / "b" / "emb.safetensors"))
        assert first.id == original.id and first.meta.description == "mine"
        assert other.id != first.id and other.meta.description is None
        assert [f.path for f in first.locations] == [str(root / "a" / "emb.safetensors")]
        assert (first.handle, other.handle) == ("emb@a", "emb@b")


def test_a_location_that_goes_leaves_the_model_and_the_last_one_keeps_it(tmp_path: Path) -> None:
    root = tmp_path / "models"
    write_stripped(root / "a" / "emb.safetensors", BIG_EMBEDDING)
    (root / "b").mkdir()
    shutil.copy2(root / "a" / "emb.safetensors", root / "b" / "emb.safetensors")
    with Registry.open(tmp_path / "r.sqlite3") as registry:
        _scan(registry, root)
        model = registry.resolve("emb")
        os.unlink(root / "a" / "emb.safetensors")
        _scan(registry, root)
        left = registry.get(model.id)
        assert left.status == "ok"  # one location is left; the gone one is dropped
        assert [f.path for f in left.locations] == [str(root / "b" / "emb.safetensors")]
        assert "scan.location_removed" in [h.op for h in registry.history(model.id)]
        # The last location changes: it is still the model (the id never goes to a dead path).
        _flip(root / "b" / "emb.safetensors", os.path.getsize(root / "b" / "emb.safetensors") - 8)
        os.utime(root / "b" / "emb.safetensors", ns=(1, 1))
        _scan(registry, root)
        changed = registry.resolve(str(root / "b" / "emb.safetensors"))
        assert changed.id == model.id and changed.status == "ok"
        assert registry.search(status=None).total == 1
