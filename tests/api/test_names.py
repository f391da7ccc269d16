"""Names users type, through the API: handles in listings and details, an ambiguous name answered
with each candidate's handle, type, format and path, filters in users' words, unknown filter
values refused with the valid ones."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest

from modelkeeper.client import ApiError, Client
from modelkeeper.testing import DemoManifest
from tests.api.conftest import ServiceFactory


def test_handles_filters_and_ambiguity(
    make_service: ServiceFactory, demo: DemoManifest, tmp_path: Path
) -> None:
    root = tmp_path / "models"
    (root / "embeddings").mkdir(parents=True)
    (root / "loras").mkdir()
    shutil.copyfile(demo.root / "embeddings/tiny-sdxl.safetensors", root / "embeddings/tiny-sdxl.safetensors")
    shutil.copyfile(demo.root / "loras/tiny-sdxl-kohya.safetensors", root / "loras/tiny-sdxl.safetensors")
    with make_service(root=root, watch=False) as svc, Client(svc.url) as c:
        listed = c.list_models()
        assert sorted(m["handle"] for m in listed["items"]) == [
            "tiny-sdxl.lora",
            "tiny-sdxl.textual_inversion",
        ]
        (lora,) = c.list_models(type="loras")["items"]
        assert lora["handle"] == "tiny-sdxl.lora" and lora["path"] == str(
            root / "loras/tiny-sdxl.safetensors"
        )
        assert c.list_models(base="SDXL")["total"] == 2
        assert c.search(query="tiny_sdxl", type="Embeddings")["total"] == 1
        assert c.model("tiny-sdxl.lora")["id"] == lora["id"]

        with pytest.raises(ApiError) as ambiguous:
            c.model("tiny-sdxl")
        assert ambiguous.value.status_code == 422 and ambiguous.value.error_code == "INVALID_REQUEST"
        candidates = {x["handle"]: x for x in ambiguous.value.details["candidates"]}
        assert set(candidates) == {"tiny-sdxl.lora", "tiny-sdxl.textual_inversion"}
        assert candidates["tiny-sdxl.lora"]["path"] == lora["path"]
        assert candidates["tiny-sdxl.lora"]["format"] == "safetensors"
        assert "tiny-sdxl.lora (lora, safetensors" in ambiguous.value.message

        with pytest.raises(ApiError) as unknown:
            c.list_models(type="checkpointz")
        assert unknown.value.status_code == 422 and unknown.value.error_code == "INVALID_REQUEST"
        assert unknown.value.details["field"] == "type" and "main" in unknown.value.details["valid"]
