"""Incremental scans: unchanged files are not reopened, deleted ones go missing, moved ones keep
their id and metadata, new ones are added; hashing recognises moves across file systems."""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path
from typing import Any

import pytest
from stripped import write_stripped

import modelkeeper.discovery.scanner as scanner_module
from conftest import scan
from modelkeeper.discovery.examine import examine
from modelkeeper.discovery.hasher import Hasher
from modelkeeper.discovery.scanner import Scanner, ScanProgress
from modelkeeper.registry.store import Registry

EMBEDDING = {"emb_params": ("F32", (2, 768))}
LORA = {
    "lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn2_to_k.lora_down.weight": (
        "F16",
        (4, 768),
    ),
    "lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn2_to_k.lora_up.weight": ("F16", (320, 4)),
    "lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn2_to_k.alpha": ("F16", ()),
}


@pytest.fixture
def opened(monkeypatch: pytest.MonkeyPatch) -> list[str]:
    """Paths the scanner examines (opens)."""
    seen: list[str] = []

    def counting(candidate: Any, **kwargs: Any) -> Any:
        seen.append(candidate.rel)
        return examine(candidate, **kwargs)

    monkeypatch.setattr(scanner_module, "examine", counting)
    return seen


def _write_lora(path: Path, fill: bytes = b"", tensors: dict[str, Any] = LORA) -> Path:
    write_stripped(path, tensors)
    if fill:
        with open(path, "r+b") as f:
            f.seek(-len(fill), os.SEEK_END)
            f.write(fill)
    return path


def test_first_scan_then_unchanged_rescan(tmp_path: Path, registry: Registry, opened: list[str]) -> None:
    for i in range(5):
        write_stripped(tmp_path / f"e{i}.safetensors", EMBEDDING)
    first = scan(registry, tmp_path)
    assert first.count("added") == 5 and len(opened) == 5
    opened.clear()
    second = scan(registry, tmp_path)
    assert opened == []  # nothing reopened
    assert second.count("unchanged") == 5
    assert [e.to_json() for e in second.entries] == [
        {**e.to_json(), "change": "unchanged"} for e in first.entries
    ]


def test_changed_new_and_deleted(tmp_path: Path, registry: Registry, opened: list[str]) -> None:
    write_stripped(tmp_path / "a.safetensors", EMBEDDING)
    _write_lora(tmp_path / "b.safetensors", b"b", EMBEDDING)  # another content (a copy would be a location)
    first = {e.path: e for e in scan(registry, tmp_path).entries}
    opened.clear()
    _write_lora(tmp_path / "a.safetensors")  # same path, now a LoRA
    os.unlink(tmp_path / "b.safetensors")
    _write_lora(tmp_path / "c.safetensors", b"c", EMBEDDING)
    report = scan(registry, tmp_path)
    by_path = {e.path: e for e in report.entries}
    assert sorted(opened) == ["a.safetensors", "c.safetensors"]
    assert by_path["a.safetensors"].change == "updated"
    assert by_path["a.safetensors"].type == "lora"
    assert by_path["a.safetensors"].model_id == first["a.safetensors"].model_id  # same file, same id
    assert by_path["c.safetensors"].change == "added"
    assert report.missing == [str(tmp_path / "b.safetensors")]
    gone = registry.get(first["b.safetensors"].model_id or "")
    assert gone.status == "missing"
    assert [h.op for h in registry.history(gone.id)][:1] == ["scan.missing"]
    assert registry.search(status="ok").total == 2


def test_rename_keeps_id_and_metadata(tmp_path: Path, registry: Registry, opened: list[str]) -> None:
    (tmp_path / "sub").mkdir()
    write_stripped(tmp_path / "old.safetensors", EMBEDDING)
    (entry,) = scan(registry, tmp_path).entries
    registry.set_meta(entry.model_id or "", {"tags": "neg, style", "description": "my embedding"})
    os.rename(tmp_path / "old.safetensors", tmp_path / "sub" / "new-name.safetensors")
    opened.clear()
    report = scan(registry, tmp_path)
    (moved,) = report.entries
    assert (moved.path, moved.change, moved.model_id) == ("sub/new-name.safetensors", "moved", entry.model_id)
    assert opened == []  # recognised by device and inode, not reopened
    assert report.missing == []
    record = registry.get(entry.model_id or "")
    assert record.meta.tags == ["neg", "style"] and record.meta.description == "my embedding"
    assert record.path == str(tmp_path / "sub" / "new-name.safetensors")
    assert record.status == "ok"


def test_move_across_file_systems_is_recognised_by_hash(tmp_path: Path, registry: Registry) -> None:
    _write_lora(tmp_path / "a.safetensors", fill=b"unique-bytes")
    _write_lora(tmp_path / "other.safetensors", fill=b"other-bytes!")
    (entry, _) = scan(registry, tmp_path).entries
    Hasher(registry).run()
    registry.set_meta(entry.model_id or "", {"name": "My LoRA", "trigger_words": "sks"})
    # A copy and a delete (a new inode): the scan sees a new file and a missing one...
    shutil.copy2(tmp_path / "a.safetensors", tmp_path / "copied.safetensors")
    os.unlink(tmp_path / "a.safetensors")
    # ...and, its content key alike, files the new one under the old model before any hashing.
    report = scan(registry, tmp_path)
    by_path = {e.path: e for e in report.entries}
    assert by_path["copied.safetensors"].change == "added"
    assert by_path["copied.safetensors"].model_id == entry.model_id
    hashed = Hasher(registry).run()
    assert hashed.moved == []  # nothing left for hashing to settle
    record = registry.resolve("My LoRA")
    assert record.id == entry.model_id and record.status == "ok"
    assert record.path == str(tmp_path / "copied.safetensors")
    assert [(f.path, f.status) for f in record.locations] == [(str(tmp_path / "copied.safetensors"), "ok")]
    assert record.meta.trigger_words == ["sks"]
    assert registry.search(status=None).total == 2
    # The next scan sees everything unchanged.
    assert scan(registry, tmp_path).count("unchanged") == 2


def test_move_recognised_by_hash_when_the_copy_differs_at_first(tmp_path: Path, registry: Registry) -> None:
    """A content key never seen (a file hashed before content keys existed): hashing settles the move."""
    _write_lora(tmp_path / "a.safetensors", fill=b"unique-bytes")
    (entry,) = scan(registry, tmp_path).entries
    Hasher(registry).run()
    registry._conn.execute("UPDATE files SET content_key = NULL")
    registry.set_meta(entry.model_id or "", {"name": "My LoRA"})
    shutil.copy2(tmp_path / "a.safetensors", tmp_path / "copied.safetensors")
    os.unlink(tmp_path / "a.safetensors")
    (new,) = scan(registry, tmp_path).entries
    assert new.model_id != entry.model_id
    hashed = Hasher(registry).run()
    assert hashed.moved == [(entry.model_id, str(tmp_path / "copied.safetensors"))]
    record = registry.resolve("My LoRA")
    assert record.id == entry.model_id and record.path == str(tmp_path / "copied.safetensors")
    assert next(h.op for h in registry.history(record.id)) == "scan.moved"
    assert registry.search(status=None).total == 1


def test_rules_version_change_reidentifies(
    tmp_path: Path, registry: Registry, opened: list[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    write_stripped(tmp_path / "a.safetensors", EMBEDDING)
    scan(registry, tmp_path)
    opened.clear()
    monkeypatch.setattr(scanner_module, "RULES_VERSION", scanner_module.RULES_VERSION + 1)
    (entry,) = scan(registry, tmp_path).entries
    assert opened == ["a.safetensors"] and entry.change == "updated"


def test_progress_and_json_shape(tmp_path: Path, registry: Registry) -> None:
    for i in range(3):
        write_stripped(tmp_path / f"e{i}.safetensors", EMBEDDING)
    (tmp_path / "z.safetensors").write_bytes(b"")
    events: list[ScanProgress] = []
    report = Scanner(registry, [tmp_path]).scan(progress=events.append)
    assert events[-1].phase == "done"
    assert any(e.phase == "identify" for e in events)
    rows = json.loads(json.dumps([e.to_json() for e in report.entries]))
    keys = {"path", "status", "format", "type", "base", "variant", "encoder", "components", "rule"}
    for row in rows:
        assert keys <= set(row)
        assert not row["path"].startswith("/")
    assert next(r for r in rows if r["status"] == "rejected").keys() >= {"error_code", "error"}


def test_several_roots_and_missing_only_under_scanned_roots(tmp_path: Path, registry: Registry) -> None:
    a, b = tmp_path / "a", tmp_path / "b"
    write_stripped(a / "x.safetensors", EMBEDDING)
    _write_lora(b / "y.safetensors", b"y", EMBEDDING)
    assert len(scan(registry, a, b).entries) == 2
    report = scan(registry, a)  # b not scanned: its file is not missing
    assert report.missing == []
    assert registry.search().total == 2


def test_sidecars_fill_user_metadata(tmp_path: Path, registry: Registry) -> None:
    write_stripped(tmp_path / "lora.safetensors", LORA)
    (tmp_path / "lora.civitai.info").write_text(
        json.dumps(
            {
                "id": 42,
                "modelId": 7,
                "name": "v1.0",
                "baseModel": "SD 1.5",
                "trainedWords": ["sks dog", "  "],
                "description": "<p>a dog</p>",
                "model": {"name": "Dog LoRA", "type": "LORA", "tags": ["animal"]},
            }
        )
    )
    (tmp_path / "lora.json").write_text(
        json.dumps({"description": "my notes", "activation text": "sks, dog", "preferred weight": "0.8"})
    )
    (tmp_path / "lora.preview.png").write_bytes(b"\x89PNG")
    (entry,) = scan(registry, tmp_path).entries
    record = registry.get(entry.model_id or "")
    assert record.name == "Dog LoRA (v1.0)" and record.name_source == "sidecar"
    assert record.meta.source_url == "https://civitai.com/models/7?modelVersionId=42"
    assert record.meta.trigger_words == ["sks", "dog"]  # A1111's activation text first
    assert record.meta.description == "my notes"
    assert record.meta.tags == ["animal"]
    assert record.meta.default_settings == {"lora_weight": 0.8}
    sidecar = record.meta.found["sidecar"]
    assert sidecar["previews"] == [str(tmp_path / "lora.preview.png")]
    assert sidecar["civitai"]["base_model"] == "SD 1.5"


def test_nested_roots_scanned_in_turn(tmp_path: Path, registry: Registry) -> None:
    write_stripped(tmp_path / "loras" / "x.safetensors", LORA)
    (inner,) = scan(registry, tmp_path / "loras").entries
    (outer,) = scan(registry, tmp_path).entries  # the same file, now under a wider root
    assert (outer.path, outer.model_id, outer.change) == ("loras/x.safetensors", inner.model_id, "unchanged")
    (again,) = scan(registry, tmp_path / "loras").entries
    assert again.model_id == inner.model_id
    scan(registry, tmp_path)
    assert registry.resolve("loras/x.safetensors").id == inner.model_id  # relative to the wider root
    os.unlink(tmp_path / "loras" / "x.safetensors")
    assert scan(registry, tmp_path).missing == [str(tmp_path / "loras" / "x.safetensors")]


def test_process_pool_gives_the_same_answers(
    tmp_path: Path, registry: Registry, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Big scans identify in worker processes; answers and rejections are the same as in threads."""
    write_stripped(tmp_path / "a.safetensors", EMBEDDING)
    _write_lora(tmp_path / "b.safetensors")
    (tmp_path / "empty.safetensors").write_bytes(b"")
    os.symlink(tmp_path / "gone.safetensors", tmp_path / "broken.safetensors")
    threads = {e.path: e.to_json() for e in scan(registry, tmp_path, processes=1).entries}
    other = Registry.open(tmp_path / "other.sqlite3")
    monkeypatch.setattr(scanner_module, "PROCESS_THRESHOLD", 2)
    procs = {e.path: e.to_json() for e in scan(other, tmp_path, processes=2).entries}
    other.close()
    strip = ("model_id",)
    assert {p: {k: v for k, v in e.items() if k not in strip} for p, e in procs.items()} == {
        p: {k: v for k, v in e.items() if k not in strip} for p, e in threads.items()
    }
    assert procs["empty.safetensors"]["error_code"] == "INVALID_MODEL_FILE"
    assert procs["broken.safetensors"]["error_code"] == "FILE_NOT_FOUND"
