"""A model's identity across nodes (each node's registry keeps ids of its own)."""

from __future__ import annotations

from modelkeeper.registry import ModelRecord


def cluster_key(record: ModelRecord) -> str:
    """A model's identity across nodes: its content hash (BLAKE3), or ``name:<name>`` until hashed."""
    hashes = record.file.hashes if record.file is not None else None
    if hashes is not None and hashes.blake3:
        return hashes.blake3
    return f"name:{record.name}"
