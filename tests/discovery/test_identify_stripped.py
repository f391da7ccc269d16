"""Identification on the real headers of public models (stripped: sparse, zero-filled data)."""

from __future__ import annotations

import os

import pytest
from stripped import MODELS, StrippedSet

from conftest import scan
from modelkeeper.discovery.examine import read_table
from modelkeeper.discovery.identify import identify_table
from modelkeeper.discovery.records import ModelFormat
from modelkeeper.registry.store import Registry

PATHS = [m.rel for m in MODELS]


@pytest.fixture(scope="module")
def scanned(
    stripped_set: StrippedSet, tmp_path_factory: pytest.TempPathFactory
) -> dict[str, dict[str, object]]:
    registry = Registry.open(tmp_path_factory.mktemp("reg") / "r.sqlite3")
    report = scan(registry, stripped_set.root)
    registry.close()
    return {e.path: e.to_json() for e in report.entries}


def test_every_stripped_file_is_sparse(stripped_set: StrippedSet) -> None:
    for rel in stripped_set.expected:
        st = os.stat(stripped_set.root / rel)
        assert st.st_blocks * 512 < 4 * 1024 * 1024, rel  # header only on disk
    big = stripped_set.root / "checkpoints/sd_xl_base_1.0.safetensors"
    assert big.stat().st_size > 6 * 10**9


@pytest.mark.parametrize("rel", PATHS)
def test_stripped_identification(
    rel: str, stripped_set: StrippedSet, scanned: dict[str, dict[str, object]]
) -> None:
    want = stripped_set.expected[rel]
    got = scanned[rel]
    assert got["status"] == "ok", got
    assert got["type"] == want.type, got
    assert got["variant"] == want.variant, got
    assert got["encoder"] == want.encoder, got
    if want.compatible:
        table, fmt = read_table(str(stripped_set.root / rel), ModelFormat.SAFETENSORS)
        ident = identify_table(table, fmt)
        if want.base == "any":  # a text encoder several bases use
            assert got["base"] == "any"
            assert set(ident.compatible_bases) == set(want.compatible)
        else:  # the header cannot decide: the true base is among the compatible ones
            assert want.base in ident.compatible_bases, ident.compatible_bases
            assert str(got["base"]) in want.compatible
            assert ident.confidence < 1
    else:
        assert got["base"] == want.base, got
    if want.components:
        assert sorted(got["components"]) == sorted(want.components)  # type: ignore[arg-type]


@pytest.mark.parametrize("rel", [p for p in PATHS if p.startswith("loras/")])
def test_stripped_lora_format_and_rank(rel: str, stripped_set: StrippedSet) -> None:
    want = stripped_set.expected[rel]
    table, fmt = read_table(str(stripped_set.root / rel), ModelFormat.SAFETENSORS)
    ident = identify_table(table, fmt)
    assert ident.lora is not None
    assert ident.lora.format.value == want.lora_format
    assert ident.lora.rank == want.rank
    assert ident.lora.modules > 10


def test_real_tensor_counts(stripped_set: StrippedSet) -> None:
    """The stripped files have the real architectures' tensor counts (SDXL UNet 1,680; SD1.5 686)."""
    counted = 0
    for rel, want in stripped_set.expected.items():
        if want.tensor_count is not None:
            table, fmt = read_table(str(stripped_set.root / rel), ModelFormat.SAFETENSORS)
            assert identify_table(table, fmt).components[0].tensor_count == want.tensor_count, rel
            counted += 1
    assert counted >= 3
    table, fmt = read_table(
        str(stripped_set.root / "checkpoints/sd_xl_base_1.0.safetensors"), ModelFormat.SAFETENSORS
    )
    unet = next(c for c in identify_table(table, fmt).components if c.kind.value == "unet")
    assert (unet.tensor_count, unet.prefix) == (1680, "model.diffusion_model.")
    assert unet.parameters == 2_567_463_684  # SDXL base UNet, as published
