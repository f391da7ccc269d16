"""Hashing: BLAKE3 and SHA-256 in one read, AutoV2, component content ids, the background hasher,
and files changed (truncated, rewritten, replaced) while they are hashed."""

from __future__ import annotations

import hashlib
import logging
import os
import signal
import subprocess
import sys
import threading
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import torch
from blake3 import blake3
from safetensors.torch import save_file

from conftest import scan
from modelkeeper.discovery import hasher as hasher_module
from modelkeeper.discovery.errors import FileChanged
from modelkeeper.discovery.hasher import Hasher, HashProgress
from modelkeeper.discovery.hashing import FileHashes, HashingCancelled, TensorSpan, content_id, hash_file
from modelkeeper.discovery.ports import HashTask
from modelkeeper.registry.store import Registry
from modelkeeper.testing.manifest import DemoManifest


def test_hash_file_matches_reference_hashes(tmp_path: Path) -> None:
    path = tmp_path / "blob.bin"
    data = bytes(range(256)) * 40_000 + b"tail"
    path.write_bytes(data)
    seen: list[int] = []
    h = hash_file(path, chunk_size=1 << 20, progress=seen.append)
    assert h.blake3 == blake3(data).hexdigest()
    assert h.sha256 == hashlib.sha256(data).hexdigest()
    assert h.autov2 == h.sha256[:10]  # type: ignore[index]
    assert sum(seen) == len(data) == h.size
    assert hash_file(path, sha256=False).sha256 is None


def test_tensor_spans_across_chunks(tmp_path: Path) -> None:
    path = tmp_path / "blob.bin"
    data = bytes(range(256)) * 100
    path.write_bytes(data)
    spans = {
        "a": [TensorSpan(0, 1000, "U8"), TensorSpan(1000, 1000, "U8")],
        "b": [TensorSpan(1000, 25600, "F16")],
    }
    h = hash_file(path, spans=spans, chunk_size=333)
    assert h.digests["a"] == [("U8", blake3(data[:1000]).hexdigest()), ("U8", blake3(b"").hexdigest())]
    assert h.digests["b"] == [("F16", blake3(data[1000:]).hexdigest())]
    assert h.component_ids["b"] == content_id([("F16", blake3(data[1000:]).hexdigest())])


def test_content_id_ignores_names_and_order() -> None:
    assert content_id([("F16", "aa"), ("F32", "bb")]) == content_id([("F32", "bb"), ("F16", "aa")])
    assert content_id([("F16", "aa")]) != content_id([("F32", "aa")])


def test_cancel(tmp_path: Path) -> None:
    path = tmp_path / "blob.bin"
    path.write_bytes(b"x" * 10_000)
    stop = threading.Event()
    stop.set()
    with pytest.raises(HashingCancelled):
        hash_file(path, chunk_size=1000, cancel=stop)


def test_same_vae_in_several_files_has_one_content_id(
    demo: DemoManifest, tmp_path: Path, registry: Registry
) -> None:
    """The SD1 VAE inside the checkpoint (original layout), in the pipeline folder (diffusers layout)
    and alone: three files, one component content id."""
    root = demo.root
    scan(registry, root)
    report = Hasher(registry).run()
    assert report.hashed > 20 and not report.errors
    checkpoint = registry.resolve(str(root / demo["sd15-checkpoint"].path))
    pipeline = registry.resolve(str(root / demo["sd15-pipeline"].path))
    vae_id = next(c.content_id for c in checkpoint.components if c.kind.value == "vae")
    assert vae_id is not None
    assert next(c.content_id for c in pipeline.components if c.kind.value == "vae") == vae_id
    holders = {model for model, _ in registry.models_with_component(vae_id)}
    assert {checkpoint.id, pipeline.id} <= holders
    unet_ids = {c.content_id for c in checkpoint.components if c.kind.value == "unet"}
    assert unet_ids.isdisjoint({vae_id})
    # File hashes are those of the bytes on disk (AutoV2 = first 10 hex of SHA-256, as A1111 shows).
    assert checkpoint.file is not None
    data = Path(checkpoint.file.path).read_bytes()
    assert checkpoint.file.hashes.sha256 == hashlib.sha256(data).hexdigest() == demo["sd15-checkpoint"].sha256
    assert checkpoint.file.hashes.autov2 == hashlib.sha256(data).hexdigest()[:10]
    assert checkpoint.file.hashes.blake3 == blake3(data).hexdigest()
    assert pipeline.file is not None and pipeline.file.hashes.blake3 and pipeline.file.hashes.sha256 is None


def test_hasher_caches_and_reports_progress(tmp_path: Path, registry: Registry) -> None:
    save_file({"emb_params": torch.ones(4, 768)}, str(tmp_path / "a.safetensors"))
    save_file({"emb_params": torch.zeros(4, 1024)}, str(tmp_path / "b.safetensors"))
    scan(registry, tmp_path)
    events: list[HashProgress] = []
    job = Hasher(registry).start(progress=events.append)
    report = job.wait(timeout=30)
    assert report is not None and report.hashed == 2 and job.done
    assert events[-1].files_done == 2 and events[-1].bytes_done == events[-1].bytes_total > 0
    assert Hasher(registry).run().hashed == 0  # cached by (path, size, mtime)
    # A changed file is hashed again after the next scan.
    save_file({"emb_params": torch.full((4, 768), 2.0)}, str(tmp_path / "a.safetensors"))
    scan(registry, tmp_path)
    assert Hasher(registry).run().hashed == 1


def test_resolve_by_hash_prefixes(tmp_path: Path, registry: Registry) -> None:
    save_file({"emb_params": torch.ones(4, 768)}, str(tmp_path / "a.safetensors"))
    (entry,) = scan(registry, tmp_path).entries
    Hasher(registry).run()
    record = registry.get(entry.model_id or "")
    assert record.file is not None
    hashes = record.file.hashes
    assert hashes.autov2 and hashes.blake3 and hashes.sha256
    for ref in (hashes.autov2, hashes.autov2.upper(), hashes.blake3[:8], hashes.sha256[:12], hashes.blake3):
        assert registry.resolve(ref).id == record.id


# A file changed under the hasher: ``cp`` over a served file truncates it, then writes it again.
# Each fault is injected from the progress callback, after the first chunk is hashed: the reader is
# at most one chunk ahead, so the reads after it see the change.

CHUNK = 64 * 1024


def _blob(path: Path, chunks: int = 8) -> bytes:
    data = bytes(range(256)) * (CHUNK * chunks // 256)
    path.write_bytes(data)
    return data


def _once(action: Callable[[], None]) -> Callable[[int], None]:
    done: list[int] = []

    def progress(n: int) -> None:
        if not done:
            done.append(n)
            action()

    return progress


def test_file_truncated_while_hashed_raises_file_changed(tmp_path: Path) -> None:
    path = tmp_path / "big.safetensors"
    _blob(path)
    with pytest.raises(FileChanged, match=r"big\.safetensors: ended at byte .* while it was hashed") as info:
        hash_file(path, chunk_size=CHUNK, progress=_once(lambda: os.truncate(path, CHUNK)))
    assert info.value.details["path"] == str(path)
    path.write_bytes(b"again")  # the copy done: hashing it again gives its hashes
    assert hash_file(path, chunk_size=CHUNK).blake3 == blake3(b"again").hexdigest()


def test_file_rewritten_in_place_while_hashed_raises_file_changed(tmp_path: Path) -> None:
    """Same size, other bytes (``cp`` of a file of one size over another): the mtime tells."""
    path = tmp_path / "big.safetensors"
    data = _blob(path)
    st = path.stat()

    def rewrite() -> None:
        with path.open("r+b") as f:
            f.write(bytes(reversed(data)))
        os.utime(path, ns=(st.st_atime_ns, st.st_mtime_ns + 1_000_000_000))

    with pytest.raises(FileChanged, match=r"big\.safetensors: changed while it was hashed"):
        hash_file(path, chunk_size=CHUNK, progress=_once(rewrite))


def test_file_replaced_while_hashed_raises_file_changed(tmp_path: Path) -> None:
    """Another file renamed over it: the bytes read are the old file's, but not what the path holds."""
    path = tmp_path / "big.safetensors"
    _blob(path)
    other = tmp_path / "other.tmp"
    _blob(other)
    with pytest.raises(FileChanged, match=r"big\.safetensors: changed while it was hashed"):
        hash_file(path, chunk_size=CHUNK, progress=_once(lambda: os.replace(other, path)))


_CHILD = """
import os, sys
from modelkeeper.discovery.hashing import hash_file
from modelkeeper.discovery.errors import FileChanged
path = sys.argv[1]
def truncate(n):
    os.truncate(path, 0)
try:
    hash_file(path, chunk_size=1 << 20, progress=truncate)
except FileChanged as exc:
    print("FileChanged:", exc.message)
"""


def test_truncating_a_file_while_it_is_hashed_never_kills_the_process(tmp_path: Path) -> None:
    """The bug this guards: hashing through a memory map died of SIGBUS (exit 135, -7 here) when the
    file was truncated under it, a fault Python cannot catch."""
    path = tmp_path / "big.safetensors"
    path.write_bytes(os.urandom(16 << 20))
    child = subprocess.run(
        [sys.executable, "-c", _CHILD, str(path)], capture_output=True, text=True, timeout=60, check=False
    )
    assert child.returncode != -signal.SIGBUS, "the hashing process died of SIGBUS"
    assert child.returncode == 0, child.stderr
    assert child.stdout.startswith(f"FileChanged: {path}: "), child.stdout


def test_hasher_reports_a_file_rewritten_while_hashed_and_hashes_it_after_a_rescan(
    tmp_path: Path, registry: Registry, caplog: pytest.LogCaptureFixture
) -> None:
    path = tmp_path / "a.safetensors"
    save_file({"emb_params": torch.ones(4, 768)}, str(path))
    scan(registry, tmp_path)
    first = path.stat()

    def overwrite(p: HashProgress) -> None:
        if p.bytes_done and path.stat().st_mtime_ns == first.st_mtime_ns:  # the copy over it, once
            save_file({"emb_params": torch.full((4, 768), 2.0)}, str(path))
            os.utime(path, ns=(first.st_atime_ns, first.st_mtime_ns + 1_000_000_000))

    with caplog.at_level(logging.WARNING, logger="modelkeeper.discovery.hasher"):
        report = Hasher(registry).run(progress=overwrite)
    assert report.hashed == 0
    assert [p for p, _ in report.errors] == [str(path)]
    assert f"{path}: changed while it was hashed" in report.errors[0][1]
    assert "not hashed:" in caplog.text and f"{path}: changed while it was hashed" in caplog.text
    scan(registry, tmp_path)  # the service's watcher rescans the changed file
    assert Hasher(registry).run().hashed == 1
    record = registry.resolve(str(path))
    assert record.file is not None and record.file.hashes.blake3 == blake3(path.read_bytes()).hexdigest()


def test_hasher_does_not_record_a_file_changed_after_its_hash(
    tmp_path: Path, registry: Registry, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Replaced between the hasher's check and the hash's open: the hash is of another file than
    the scan recorded, so it is reported, not recorded."""
    path = tmp_path / "a.safetensors"
    save_file({"emb_params": torch.ones(4, 768)}, str(path))
    scan(registry, tmp_path)
    real = hasher_module.hash_task

    def then_replaced(task: HashTask, **kwargs: Any) -> FileHashes:
        hashes = real(task, **kwargs)
        save_file({"emb_params": torch.zeros(4, 768)}, str(tmp_path / "new.tmp"))
        os.replace(tmp_path / "new.tmp", path)
        os.utime(path, ns=(task.mtime_ns, task.mtime_ns + 1_000_000_000))
        return hashes

    monkeypatch.setattr(hasher_module, "hash_task", then_replaced)
    report = Hasher(registry).run()
    assert report.hashed == 0
    assert report.errors == [
        (
            str(path),
            f"[INVALID_MODEL_FILE] {path}: changed while it was hashed; "
            "it is hashed again after the next scan",
        )
    ]
    record = registry.resolve(str(path))
    assert record.file is not None and record.file.hashes.blake3 is None
