"""Receiving a model's bytes, without Ray: chunks, the staged files and their running BLAKE3, and a
received file taken into the RAM cache as a segment without a copy (``RamCache.adopt``)."""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import pytest
from blake3 import blake3

from modelkeeper.cache import CacheFull, RamCache
from modelkeeper.cluster.errors import TransferFailed
from modelkeeper.cluster.receive import Staged, chunks_of, read_chunk


def test_chunks_staged_in_order_hash_as_they_arrive(tmp_path: Path) -> None:
    data = {"a/x.bin": os.urandom(10_000), "a/empty.bin": b"", "a/y.bin": os.urandom(3_000)}
    files = [{"rel": rel, "size": len(b)} for rel, b in data.items()]
    for rel, b in data.items():
        (tmp_path / "src" / rel).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / "src" / rel).write_bytes(b)
    chunks = chunks_of(files, 4096)
    assert [(c.file, c.offset, c.size) for c in chunks if c.file == 0] == [
        (0, 0, 4096),
        (0, 4096, 4096),
        (0, 8192, 1808),
    ]
    assert not [c for c in chunks if c.file == 1]  # an empty file has no chunk, and is still made
    staged = Staged(tmp_path / "staged", files)
    staged.open()
    try:
        for c in chunks:
            staged.write(c, read_chunk(tmp_path / "src" / files[c.file]["rel"], c.offset, c.size))
        with pytest.raises(TransferFailed, match="expected 4096"):
            staged.write(chunks[0], np.zeros(10, dtype=np.uint8))  # a short chunk is refused
    finally:
        staged.close()
    for (rel, b), digest in zip(data.items(), staged.digests(), strict=True):
        assert (tmp_path / "staged" / rel).read_bytes() == b
        assert digest == blake3(b).hexdigest()
    # read past the end: what is there
    assert read_chunk(tmp_path / "src" / "a/y.bin", 2_900, 4096).tobytes() == data["a/y.bin"][2_900:]


def test_a_received_file_becomes_a_segment_without_a_copy(tmp_path: Path) -> None:
    shm = tmp_path / "shm"
    shm.mkdir()
    received = shm / "received.safetensors"
    received.write_bytes(b"x" * 1000)
    model_file = tmp_path / "models" / "m.safetensors"  # where the registry sees it
    model_file.parent.mkdir()
    model_file.write_bytes(b"x" * 1000)
    cache = RamCache(1500, shm_dir=shm)
    try:
        seg = cache.adopt(received, source=model_file, component_id="c1", model="m1")
        assert seg.size == 1000 and seg.path.stat().st_ino == received.stat().st_ino  # a hard link
        assert cache.lookup(model_file, component_id="c1", model="m1") is seg and seg.source == str(
            model_file
        )
        assert cache.adopt(received, source=model_file, component_id="c1") is seg  # cached: a hit
        # it counts in the budget like any segment: a second one evicts it, one too big is refused
        other = shm / "other.safetensors"
        other.write_bytes(b"y" * 1000)
        cache.adopt(other, source=other, component_id="c2")
        assert "c1" not in cache and "c2" in cache and received.exists()
        big = shm / "big.safetensors"
        big.write_bytes(b"z" * 2000)
        with pytest.raises(CacheFull):
            cache.adopt(big, source=big, component_id="c3")
    finally:
        cache.close()
