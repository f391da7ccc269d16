"""Pipelines from parts over REST: ``GET /api/model/{id}`` lists the parts of a transformer-only
Flux file and what is missing; its load answers 422 MISSING_PART naming the role and what would
fit; a pinned part that does not fit is refused (422 INCOMPATIBLE_PART) when it is set."""

from __future__ import annotations

from pathlib import Path

import pytest

from modelkeeper.client import ApiError
from modelkeeper.testing.demo import write_demo_models
from tests.api.conftest import ServiceFactory, checked_client

FLUX = "transformer/tiny-flux.safetensors"


@pytest.fixture(scope="module")
def no_t5(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A model root with a transformer-only Flux, a CLIP-L, a CLIP-G and a Flux VAE: no T5."""
    demo = write_demo_models(
        tmp_path_factory.mktemp("parts"), only=["flux-transformer", "clip-l", "clip-g", "flux-vae"]
    )
    return demo.root


def test_missing_and_refused_parts_over_rest(make_service: ServiceFactory, no_t5: Path) -> None:
    with make_service(root=no_t5) as svc, checked_client(svc) as client:
        detail = client.model(FLUX)
        parts = {p["role"]: p for p in detail["parts"]}
        assert parts["text_encoder"]["handle"] == "tiny-clip-l" and parts["vae"]["handle"] == "tiny-flux-vae"
        assert parts["text_encoder_2"] == {
            "role": "text_encoder_2", "wants": "T5-XXL, 32 wide", "status": "missing", "model_id": None,
            "handle": None, "component": None, "why": "none in the registry"}  # fmt: skip
        with pytest.raises(ApiError) as err:
            client.load(FLUX)
        assert err.value.status_code == 422 and err.value.error_code == "MISSING_PART"
        assert f"flux transformer {detail['id']} (tiny-flux) needs a text_encoder_2 (T5-XXL, 32 wide): " \
               "none in the registry" in err.value.message  # fmt: skip
        with pytest.raises(ApiError) as err:
            client.set_metadata(FLUX, default_settings={"parts": {"text_encoder_2": "tiny-clip-g"}})
        assert err.value.status_code == 422 and err.value.error_code == "INCOMPATIBLE_PART"
        assert "tiny-clip-g (CLIP-G, 1280 wide) is not a T5-XXL" in err.value.message
        assert client.metadata(FLUX)["default_settings"] == {}  # nothing written
        assert client.status()["devices"][0]["models"] == []
        write_demo_models(no_t5, only=["t5"])  # the missing part arrives
        assert client.refresh(wait=True)["result"]["summary"]["added"] == 1
        t5 = client.model("clip/tiny-t5.safetensors")["id"]
        placed = client.load(FLUX)["result"]  # a real worker subprocess: every part placed
        assert placed["parts"]["text_encoder_2"] == t5 and set(placed["parts"]) == set(parts)
        assert set(placed["components"]) == {"transformer", *parts}
        listed = client.status()["devices"][0]["models"]
        assert [m["parts"]["text_encoder_2"] for m in listed] == [t5]
