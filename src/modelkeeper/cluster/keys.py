"""A model's identity across nodes (each node's registry keeps ids of its own)."""

from __future__ import annotations

from collections.abc import Mapping

from modelkeeper.registry import ModelRecord


def cluster_key(record: ModelRecord) -> str:
    """A model's identity across nodes: its content hash (BLAKE3), or ``name:<name>`` until hashed."""
    hashes = record.file.hashes if record.file is not None else None
    if hashes is not None and hashes.blake3:
        return hashes.blake3
    return f"name:{record.name}"


def cluster_share(share: str, keys: Mapping[str, str], node: str) -> str:
    """A worker's share key (``LoadRequest.share_key``: ``<part's model id>:<content id>|type|dtype|
    storage dtype``) in cluster terms: the part's id on this node replaced by its cluster key
    (``keys``: local id -> cluster key), so that the driver matches a load's parts, computed on one
    node, with the parts held on the devices of any node. A key whose part this node does not list
    stays its own, prefixed with ``node/``: it matches only there."""
    local, sep, rest = share.partition(":")
    key = keys.get(local) if sep else None
    return f"{key}:{rest}" if key is not None else f"{node}/{share}"
