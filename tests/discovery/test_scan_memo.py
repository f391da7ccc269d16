"""A scan remembers validated tensor sections and identifications across files that share a
structure; the answers are the same as looking at every file afresh."""

from __future__ import annotations

import json
import struct
from pathlib import Path
from typing import Any

from conftest import scan
from modelkeeper.registry.store import Registry
from modelkeeper.testing.manifest import DemoManifest

# Metadata variations that change what the rules conclude (base, prediction, alpha) or nothing.
VARIATIONS: list[dict[str, str]] = [
    {},
    {"note": "plain"},
    {"ss_base_model_version": "sdxl_base_v1-0"},
    {"modelspec.architecture": "stable-diffusion-v2-768-v", "modelspec.prediction_type": "v"},
    {"ss_v_parameterization": "True", "ss_network_alpha": "8"},
    {"ss_tag_frequency": json.dumps({"img": {"1girl": 3, "cat": 1}}), "ss_network_alpha": "2.5"},
]
# Folder names that are hints (and can contradict the header) or not.
FOLDERS = ["loras", "checkpoints", "embeddings/sdxl", "misc"]


def _header(path: Path) -> tuple[dict[str, Any], int]:
    raw = path.read_bytes()
    (n,) = struct.unpack("<Q", raw[:8])
    return json.loads(raw[8 : 8 + n]), len(raw) - 8 - n


def _write_metadata_first(
    path: Path, header: dict[str, Any], data_size: int, metadata: dict[str, str]
) -> None:
    tensors = {k: v for k, v in header.items() if k != "__metadata__"}
    raw = json.dumps({"__metadata__": metadata, **tensors}, separators=(",", ":")).encode()
    raw += b" " * (-len(raw) % 8)
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "wb") as f:
        f.write(struct.pack("<Q", len(raw)) + raw)
        f.truncate(8 + len(raw) + data_size)


def _library(root: Path, demo: DemoManifest) -> int:
    made = 0
    for entry in demo.entries:
        if entry.format != "safetensors":
            continue
        header, data_size = _header(demo.root / entry.path)
        base_meta = header.get("__metadata__") or {}
        for i, extra in enumerate(VARIATIONS):
            folder = FOLDERS[(i + made) % len(FOLDERS)]
            _write_metadata_first(
                root / folder / f"{entry.name}-{i}.safetensors", header, data_size, {**base_meta, **extra}
            )
            made += 1
    return made


def _identifications(registry: Registry, report: Any) -> dict[str, Any]:
    out = {}
    for e in report.entries:
        record = registry.get(e.model_id) if e.model_id else None
        ident = record.identification.model_dump(mode="json") if record is not None else None
        out[e.path] = ({k: v for k, v in e.to_json().items() if k != "model_id"}, ident)
    return out


def test_memo_answers_as_a_fresh_look(tmp_path: Path, demo: DemoManifest) -> None:
    made = _library(tmp_path / "lib", demo)
    fresh_registry = Registry.open(tmp_path / "fresh.sqlite3")
    memo_registry = Registry.open(tmp_path / "memo.sqlite3")
    try:
        fresh = scan(fresh_registry, tmp_path / "lib", memo=False, workers=1)
        from modelkeeper.discovery.scanner import Scanner

        scanner = Scanner(memo_registry, [tmp_path / "lib"], workers=2)
        remembered = scanner.scan()
        assert len(remembered.entries) == made
        assert remembered.count("rejected") == 0
        memo = scanner.last_memo
        assert memo is not None
        # Each structure is parsed once; every variation of it after the first is a hit.
        assert memo.headers.hits >= made - 2 * len(memo.headers)
        assert len(memo.identifications) > len(memo.headers)  # evidence and hints are in the key
        assert _identifications(memo_registry, remembered) == _identifications(fresh_registry, fresh)
    finally:
        fresh_registry.close()
        memo_registry.close()
