"""Metadata users already have: safetensors __metadata__ (modelspec, kohya ss_*) and sidecar files."""

from __future__ import annotations

import json
from pathlib import Path

from stripped import write_stripped

from conftest import scan
from modelkeeper.discovery.metadata import metadata_evidence, summarize_metadata
from modelkeeper.discovery.records import Base
from modelkeeper.discovery.sidecar import read_sidecars
from modelkeeper.registry.store import Registry

KOHYA = {
    "ss_network_module": "networks.lora",
    "ss_network_dim": "16",
    "ss_network_alpha": "8.0",
    "ss_base_model_version": "sdxl_base_v1-0",
    "ss_output_name": "pixel-art",
    "ss_tag_frequency": json.dumps(
        {"10_pixel": {"pixel art": 40, "1girl": 12, "sprite": 12}, "5_more": {"pixel art": 5}}
    ),
    "ss_dataset_dirs": "x" * 10_000,
    "modelspec.title": "Pixel Art XL",
    "modelspec.architecture": "stable-diffusion-xl-v1-base/lora",
    "modelspec.trigger_phrase": "pixel art",
    "modelspec.thumbnail": "data:image/png;base64," + "A" * 50_000,
    "format": "pt",
}


def test_summarize_metadata_keeps_what_is_useful() -> None:
    summary = summarize_metadata(KOHYA)
    assert summary["modelspec"] == {
        "title": "Pixel Art XL",
        "architecture": "stable-diffusion-xl-v1-base/lora",
        "trigger_phrase": "pixel art",
    }
    assert summary["kohya"]["network_dim"] == "16"
    assert summary["kohya"]["top_tags"][:3] == ["pixel art", "1girl", "sprite"]
    assert "dataset_dirs" not in summary["kohya"]
    assert summary["other"] == {"format": "pt"}


def test_metadata_evidence() -> None:
    assert metadata_evidence(KOHYA)["meta_base"] is Base.SDXL
    assert metadata_evidence({"ss_base_model_version": "sd_v1"})["meta_base"] is Base.SD1
    assert metadata_evidence({"modelspec.architecture": "flux-1-dev/lora"})["meta_base"] is Base.FLUX
    assert metadata_evidence({"ss_v_parameterization": "True"})["meta_prediction"] == "v"
    assert metadata_evidence({"modelspec.prediction_type": "epsilon"})["meta_prediction"] == "epsilon"
    assert metadata_evidence({}, {"v_pred": object()})["v_pred_marker"] is True


def test_lora_metadata_reaches_the_registry(tmp_path: Path, registry: Registry) -> None:
    # A LoRA that patches only conv layers: shapes cannot tell the base, the kohya metadata does.
    write_stripped(
        tmp_path / "pixel.safetensors",
        {
            "lora_unet_down_blocks_0_resnets_0_conv1.lora_down.weight": ("F16", (16, 320, 3, 3)),
            "lora_unet_down_blocks_0_resnets_0_conv1.lora_up.weight": ("F16", (320, 16, 1, 1)),
            "lora_unet_down_blocks_0_resnets_0_conv1.alpha": ("F16", ()),
        },
        KOHYA,
    )
    (entry,) = scan(registry, tmp_path).entries
    record = registry.get(entry.model_id or "")
    assert (record.type, record.base, record.lora_format, record.lora_rank) == ("lora", "sdxl", "kohya", 16)
    assert record.identification.lora is not None and record.identification.lora.alpha == 8.0
    assert record.identification.rules["base"] == "meta.base"
    assert record.identification.metadata["modelspec"]["title"] == "Pixel Art XL"


def test_sidecars(tmp_path: Path) -> None:
    model = tmp_path / "m.safetensors"
    model.write_bytes(b"")
    (tmp_path / "m.civitai.info").write_text(
        json.dumps({"modelId": 1, "trainedWords": ["a"], "model": {"name": "M"}})
    )
    (tmp_path / "m.json").write_text("{broken")
    (tmp_path / "m.png").write_bytes(b"")
    (tmp_path / "m.preview.webp").write_bytes(b"")
    (tmp_path / "m.yaml").write_text('model:\n  params:\n    parameterization: "v"\n')
    (tmp_path / "other.png").write_bytes(b"")
    found = read_sidecars(model)
    assert sorted(Path(p).name for p in found.previews) == ["m.png", "m.preview.webp"]
    assert found.a1111 == {}  # a broken sidecar is ignored
    assert found.prediction == "v"
    assert found.user == {"name": "M", "trigger_words": ["a"], "source_url": "https://civitai.com/models/1"}


def test_a1111_yaml_makes_an_sd2_checkpoint_epsilon_or_v(tmp_path: Path, registry: Registry) -> None:
    from stripped import shapes_of, unet_original

    unet = shapes_of(unet_original("sd2"), "F16")
    write_stripped(tmp_path / "sd2-base.safetensors", unet)
    (tmp_path / "sd2-base.yaml").write_text("model:\n  params:\n    parameterization: eps\n")
    (entry,) = scan(registry, tmp_path).entries
    assert (entry.base, entry.variant) == ("sd2", "normal")


def test_a_vae_config_in_the_metadata_is_evidence_only_when_it_states_the_scaling_factor() -> None:
    def config(**fields: object) -> dict[str, str]:
        return {
            "modelkeeper.config": json.dumps({"_class_name": "AutoencoderKL", "latent_channels": 4, **fields})
        }

    assert metadata_evidence(config(scaling_factor=0.13025))["scaling_factor"] == 0.13025
    assert "scaling_factor" not in metadata_evidence(config())  # left out: no default assumed
    assert "scaling_factor" not in metadata_evidence({"modelkeeper.config": "{not json scaling_factor"})
    unet = {"modelkeeper.config": json.dumps({"_class_name": "UNet2DConditionModel", "scaling_factor": 1.0})}
    assert "scaling_factor" not in metadata_evidence(unet)
    assert "latent_channels" not in metadata_evidence(config(scaling_factor=0.13025))  # the shapes say it
