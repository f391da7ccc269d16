"""Known public files by hash settle what shapes cannot: once hashed, a file of the table takes
its base from the table (an SDXL VAE is filed sdxl, not sd1), and keeps it through rescans."""

from __future__ import annotations

import hashlib
import re
import shutil
from pathlib import Path

import pytest

import modelkeeper.discovery.scanner as scanner_module
from conftest import scan
from modelkeeper.discovery.hasher import Hasher
from modelkeeper.discovery.records import Base, ModelType
from modelkeeper.discovery.rules import known_files
from modelkeeper.discovery.rules.known_files import KNOWN_FILES, KnownFile
from modelkeeper.registry.store import Registry
from modelkeeper.testing import DemoManifest

VAE = "vae/tiny-sd15-vae.safetensors"


def test_the_table_is_well_formed() -> None:
    for sha256, known in KNOWN_FILES.items():
        assert re.fullmatch(r"[0-9a-f]{64}", sha256), known.name
        assert known.source.startswith("https://huggingface.co/"), known.name
        assert (known.base is Base.ANY) == bool(known.compatible), known.name
    names = {k.name for k in KNOWN_FILES.values()}
    assert {"sdxl_vae.safetensors", "vae-ft-mse-840000-ema-pruned.safetensors", "ae.safetensors"} <= names


def test_a_known_hash_settles_the_base(
    demo: DemoManifest, tmp_path: Path, registry: Registry, monkeypatch: pytest.MonkeyPatch
) -> None:
    root = tmp_path / "models"
    (root / "vae").mkdir(parents=True)
    shutil.copyfile(demo.root / VAE, root / VAE)
    sha256 = hashlib.sha256((root / VAE).read_bytes()).hexdigest()
    # A synthetic entry: the demo SD1 VAE's own hash, published (in this test) as an SDXL VAE.
    entry = KnownFile("sdxl_vae.safetensors", ModelType.VAE, Base.SDXL, (root / VAE).stat().st_size, "test")
    monkeypatch.setitem(known_files.KNOWN_FILES, sha256, entry)

    (first,) = scan(registry, root).entries
    assert (first.type, first.base) == ("vae", "sd1")  # the shapes alone
    Hasher(registry).run()
    record = registry.get(first.model_id or "")
    assert (record.type, record.base) == ("vae", "sdxl")
    assert record.rule == "known_file:sdxl_vae.safetensors" and record.confidence == 1.0
    assert [c.base for c in record.components] == [Base.SDXL]
    assert registry.search(base="sdxl").total == 1
    assert registry.history(record.id)[0].op == "identify.known_file"

    monkeypatch.setattr(scanner_module, "RULES_VERSION", scanner_module.RULES_VERSION + 1)
    (again,) = scan(registry, root).entries  # identified again from its shapes...
    assert again.change == "updated"
    assert registry.get(record.id).base == "sdxl"  # ...and the table still applies
