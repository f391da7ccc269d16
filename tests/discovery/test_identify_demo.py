"""Identification of the tiny demo models against their manifest: single files in the original and
the diffusers layout, diffusers folders, LoRAs and embeddings (real files, real loaders' layouts)."""

from __future__ import annotations

from pathlib import Path

import pytest

from conftest import scan
from modelkeeper.discovery.records import Identification
from modelkeeper.registry.store import Registry
from modelkeeper.testing.manifest import DemoEntry, DemoManifest

#: The manifest's names for what identification calls otherwise.
ENCODER_NAMES = {"t5": "t5_xxl"}
EMBEDDING_RULES = {
    "a1111": ("embedding.emb_params", "embedding.a1111"),
    "diffusers": ("embedding.diffusers",),
    "sdxl": ("embedding.sdxl",),
}


@pytest.fixture(scope="module")
def identified(demo: DemoManifest, tmp_path_factory: pytest.TempPathFactory) -> dict[str, Identification]:
    registry = Registry.open(tmp_path_factory.mktemp("reg") / "r.sqlite3")
    report = scan(registry, demo.root)
    assert all(e.status == "ok" for e in report.entries), [
        e.to_json() for e in report.entries if e.status != "ok"
    ]
    out = {e.path: registry.get(e.model_id).identification for e in report.entries if e.model_id}
    registry.close()
    return out


def _models(demo: DemoManifest) -> list[DemoEntry]:
    return [e for e in demo if e.type != "tokenizer"]


def test_every_model_of_the_manifest_is_found(
    demo: DemoManifest, identified: dict[str, Identification]
) -> None:
    assert {e.path for e in _models(demo)} == set(identified)


def test_identification_matches_the_manifest(
    demo: DemoManifest, identified: dict[str, Identification]
) -> None:
    for entry in _models(demo):
        ident = identified[entry.path]
        what = f"{entry.name}: {ident.type}/{ident.base}/{ident.variant} by {ident.rules}"
        assert ident.type.value == entry.type, what
        if ident.base.value == "any" or entry.also_bases:
            assert entry.base in ident.compatible_bases, what
            assert ident.base.value in ("any", entry.base, *entry.also_bases), what
        else:
            assert ident.base.value == entry.base, what
        variant = entry.variant
        sd2_denoiser = (
            entry.base == "sd2" and entry.type in ("main", "unet") and entry.prediction_type is None
        )
        if entry.prediction_type == "v_prediction" or sd2_denoiser:
            variant = "v_prediction"  # SD2 is taken as v-prediction unless something says otherwise
        assert ident.variant == variant, what
        if entry.encoder:
            assert ident.encoder is not None
            assert ident.encoder.value == ENCODER_NAMES.get(entry.encoder, entry.encoder), what


def test_layouts_match_the_manifest(demo: DemoManifest, identified: dict[str, Identification]) -> None:
    for entry in _models(demo):
        ident = identified[entry.path]
        if entry.type == "lora":
            assert ident.lora is not None
            assert ident.lora.format.value == entry.layout, entry.name
            assert set(ident.lora.targets) == set(entry.components), entry.name
            if entry.layout != "lokr":  # an unfactorised LoKr has no rank
                assert ident.lora.rank == entry.dims["rank"], entry.name
        elif entry.type == "textual_inversion":
            assert ident.rule in EMBEDDING_RULES[entry.layout], entry.name
        else:
            assert ident.layout.value == entry.layout, entry.name


def test_checkpoint_components(demo: DemoManifest, identified: dict[str, Identification]) -> None:
    for entry in demo.select(type="main"):
        ident = identified[entry.path]
        kinds = sorted(
            "text_encoder" if c in ("clip_l", "clip_g", "clip_h", "t5") else c for c in entry.components
        )
        assert sorted(c.kind.value for c in ident.components) == kinds, entry.name
        encoders = {c.encoder.value for c in ident.components if c.encoder}
        assert encoders == {ENCODER_NAMES.get(c, c) for c in entry.components if c.startswith(("clip", "t5"))}
        for c in ident.components:
            assert c.tensor_count > 0 and c.parameters > 0 and c.bytes > 0 and c.dtypes, (entry.name, c.name)
        assert sum(c.tensor_count for c in ident.components) == ident.tensor_count
        if entry.format == "safetensors":
            assert entry.tensor_count == ident.tensor_count


def test_folders_report_subfolders_and_configs(
    demo: DemoManifest, identified: dict[str, Identification]
) -> None:
    for entry in demo.select(format="diffusers"):
        if entry.type == "tokenizer":
            continue
        ident = identified[entry.path]
        assert ident.format.value == "diffusers"
        for c in ident.components:
            assert c.config is not None
            if entry.type == "main":
                assert c.subfolder == c.name and (Path(demo.root) / entry.path / c.name).is_dir()


def test_pipeline_prediction_type_decides_v_prediction(
    demo: DemoManifest, identified: dict[str, Identification]
) -> None:
    for entry in demo.select(type="main", format="diffusers"):
        ident = identified[entry.path]
        if entry.prediction_type == "epsilon":
            assert ident.variant == "normal"
            assert ident.rules["variant"] in ("meta.prediction_epsilon", "default.normal")


def test_a_vae_file_that_carries_its_config_is_filed_by_its_scaling_factor(
    identified: dict[str, Identification],
) -> None:
    """The SD-family VAEs share their shapes; the demo SDXL VAE's ``modelkeeper.config`` states
    SDXL's scaling factor, which files it sdxl (the bases its shapes fit stay listed). The demo
    SD1.5 VAE carries no config: it is filed sd1, the first base its shapes fit."""
    family = ["sd1", "sd2", "sdxl", "sdxl_refiner"]
    sdxl = identified["vae/tiny-sdxl-vae.safetensors"]
    assert sdxl.base.value == "sdxl" and sdxl.rules["base"] == "vae.latent_4+config.scaling_factor"
    assert [b.value for b in sdxl.compatible_bases] == family and sdxl.confidence == 0.9
    assert sdxl.evidence["scaling_factor"] == 0.13025
    sd15 = identified["vae/tiny-sd15-vae.safetensors"]
    assert sd15.base.value == "sd1" and sd15.confidence == 0.5 and "scaling_factor" not in sd15.evidence
    assert [b.value for b in sd15.compatible_bases] == family
    flux = identified["vae/tiny-flux-vae.safetensors"]  # 0.3611: Flux's; SD3's VAE has its shapes
    assert flux.base.value == "flux" and [b.value for b in flux.compatible_bases] == ["flux", "sd3"]
