"""Bad input: every broken thing becomes a rejected entry with a reason, and the scan completes."""

from __future__ import annotations

import builtins
import json
import os
import pickle
import struct
from pathlib import Path
from typing import Any

import pytest
from stripped import write_stripped

import modelkeeper.discovery.scanner as scanner_module
from conftest import scan
from modelkeeper.discovery.examine import examine
from modelkeeper.registry.store import Registry

EMBEDDING = {"emb_params": ("F32", (2, 768))}


class _Evil:
    def __reduce__(self) -> tuple[Any, ...]:
        return (os.system, ("echo pwned",))


def _bad_files(root: Path) -> dict[str, str]:
    """Write one of each kind of bad input; returns relative path -> expected error code."""
    write_stripped(root / "good.safetensors", EMBEDDING)
    (root / "empty.safetensors").write_bytes(b"")
    (root / "garbage.safetensors").write_bytes(os.urandom(4096))
    (root / "huge_length.safetensors").write_bytes(struct.pack("<Q", 1 << 40) + b"{}")
    raw = b'{"x": {"dtype": "F32", "shape": [2'
    (root / "bad_json.safetensors").write_bytes(struct.pack("<Q", len(raw)) + raw)
    raw = json.dumps({"x": {"dtype": "F32", "shape": [1024], "data_offsets": [0, 4096]}}).encode()
    (root / "truncated.safetensors").write_bytes(struct.pack("<Q", len(raw)) + raw + b"\0" * 100)
    (root / "garbage.ckpt").write_bytes(b"PK\x03\x04" + os.urandom(200))
    (root / "evil.ckpt").write_bytes(pickle.dumps({"state_dict": _Evil()}, protocol=2))
    (root / "broken.gguf").write_bytes(b"GGUF" + struct.pack("<I", 3) + b"\x01")
    pipe = root / "pipe"
    (pipe / "unet").mkdir(parents=True)
    (pipe / "model_index.json").write_text('{"_class_name": "StableDiffusionPipeline",')
    comp = root / "vae_folder"
    comp.mkdir()
    (comp / "config.json").write_text("[1, 2")
    write_stripped(comp / "diffusion_pytorch_model.safetensors", EMBEDDING)
    os.symlink("loop_b.safetensors", root / "loop_a.safetensors")
    os.symlink("loop_a.safetensors", root / "loop_b.safetensors")
    return {
        "empty.safetensors": "INVALID_MODEL_FILE",
        "garbage.safetensors": "INVALID_MODEL_FILE",
        "huge_length.safetensors": "INVALID_MODEL_FILE",
        "bad_json.safetensors": "INVALID_MODEL_FILE",
        "truncated.safetensors": "INVALID_MODEL_FILE",
        "garbage.ckpt": "INVALID_MODEL_FILE",
        "evil.ckpt": "UNSAFE_PICKLE",
        "broken.gguf": "INVALID_MODEL_FILE",
        "pipe": "INVALID_MODEL_FILE",
        "vae_folder": "INVALID_MODEL_FILE",
        "loop_a.safetensors": "FILE_NOT_FOUND",
        "loop_b.safetensors": "FILE_NOT_FOUND",
    }


def test_each_bad_input_is_rejected_with_a_reason(tmp_path: Path, registry: Registry) -> None:
    expected = _bad_files(tmp_path)
    report = scan(registry, tmp_path)
    by_path = {e.path: e for e in report.entries}
    assert by_path["good.safetensors"].status == "ok"
    for rel, code in expected.items():
        entry = by_path[rel]
        assert entry.status == "rejected", rel
        assert entry.error_code == code, (rel, entry.error)
        assert entry.error, rel
        out = entry.to_json()
        assert out["error_code"] == code and out["error"]
    assert len(registry.rejected([str(tmp_path)])) == len(expected)
    # A rescan does not reopen unchanged rejected files and reports the same.
    again = scan(registry, tmp_path)
    assert {e.path: (e.status, e.error_code) for e in again.entries} == {
        e.path: (e.status, e.error_code) for e in report.entries
    }
    assert again.count("unchanged") == len(report.entries)


def test_empty_file_message(tmp_path: Path, registry: Registry) -> None:
    (tmp_path / "zero.ckpt").write_bytes(b"")
    (entry,) = scan(registry, tmp_path).entries
    assert entry.error_code == "INVALID_MODEL_FILE"
    assert "empty" in (entry.error or "")


def test_unreadable_file(tmp_path: Path, registry: Registry, monkeypatch: pytest.MonkeyPatch) -> None:
    target = write_stripped(tmp_path / "locked.safetensors", EMBEDDING)
    write_stripped(tmp_path / "fine.safetensors", EMBEDDING)
    real_open, real_os_open = builtins.open, os.open

    def deny(path: Any, *args: Any, **kwargs: Any) -> Any:
        if os.fspath(path) == str(target):
            raise PermissionError(13, "Permission denied", str(path))
        return real_open(path, *args, **kwargs)

    def deny_os(path: Any, *args: Any, **kwargs: Any) -> Any:
        if os.fspath(path) == str(target):
            raise PermissionError(13, "Permission denied", str(path))
        return real_os_open(path, *args, **kwargs)

    monkeypatch.setattr(builtins, "open", deny)
    monkeypatch.setattr(os, "open", deny_os)
    by_path = {e.path: e for e in scan(registry, tmp_path).entries}
    assert by_path["fine.safetensors"].status == "ok"
    assert by_path["locked.safetensors"].status == "rejected"
    assert by_path["locked.safetensors"].error_code == "INVALID_MODEL_FILE"
    assert "Permission denied" in (by_path["locked.safetensors"].error or "")


def test_file_deleted_during_the_scan(
    tmp_path: Path, registry: Registry, monkeypatch: pytest.MonkeyPatch
) -> None:
    write_stripped(tmp_path / "stays.safetensors", EMBEDDING)
    write_stripped(tmp_path / "goes.safetensors", EMBEDDING)

    def delete_then_examine(candidate: Any, **kwargs: Any) -> Any:
        if candidate.rel == "goes.safetensors":
            os.unlink(candidate.path)
        return examine(candidate, **kwargs)

    monkeypatch.setattr(scanner_module, "examine", delete_then_examine)
    by_path = {e.path: e for e in scan(registry, tmp_path).entries}
    assert by_path["stays.safetensors"].status == "ok"
    assert by_path["goes.safetensors"].status == "rejected"
    assert by_path["goes.safetensors"].error_code == "FILE_NOT_FOUND"
    assert "deleted" in (by_path["goes.safetensors"].error or "")


def test_a_bug_in_one_file_does_not_stop_the_scan(
    tmp_path: Path, registry: Registry, monkeypatch: pytest.MonkeyPatch
) -> None:
    write_stripped(tmp_path / "a.safetensors", EMBEDDING)
    write_stripped(tmp_path / "b.safetensors", EMBEDDING)

    def boom(candidate: Any, **kwargs: Any) -> Any:
        if candidate.rel == "a.safetensors":
            raise RuntimeError("unexpected")
        return examine(candidate, **kwargs)

    monkeypatch.setattr(scanner_module, "examine", boom)
    by_path = {e.path: e for e in scan(registry, tmp_path).entries}
    assert by_path["a.safetensors"].error_code == "INTERNAL"
    assert by_path["b.safetensors"].status == "ok"
