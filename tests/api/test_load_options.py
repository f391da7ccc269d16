"""Through REST and the client, against a real service (one CPU worker subprocess): a load of a
model loaded in another form is 409 ALREADY_LOADED, or reloaded with ``reload``; a placement says its
dtype, storage dtype and offload; what the caller must fix is 422 before any job (a LoRA loaded or
cached, an optimize with nothing or something unknown to apply); every answer matches the OpenAPI
spec."""

from __future__ import annotations

from collections.abc import Iterator

import pytest

from modelkeeper.client import ApiError, Client
from modelkeeper.testing.service import RunningService
from tests.api.conftest import CLIP_L, LORA, ServiceFactory, checked_client


@pytest.fixture(scope="module")
def svc(make_service: ServiceFactory) -> Iterator[RunningService]:
    with make_service(devices=["cpu"], cache_loads=False) as running:
        yield running


@pytest.fixture
def client(svc: RunningService) -> Iterator[Client]:
    with checked_client(svc) as c:
        yield c
        c.unload_all(force=True)


def test_a_load_in_another_form_is_409_or_reloaded(client: Client) -> None:
    first = client.load(CLIP_L)["result"]
    assert first["storage_dtype"] is None and first["offload"] == "none" and first["dtype"]
    with pytest.raises(ApiError) as refused:
        client.load(CLIP_L, storage_dtype="float8_e4m3fn", keep_alive=30)
    assert (refused.value.status_code, refused.value.error_code) == (409, "ALREADY_LOADED")
    assert f"tiny-clip-l is loaded on cpu as {first['dtype']}" in refused.value.message
    assert refused.value.details["differences"] == {
        "storage_dtype": {"loaded": "the compute dtype", "asked": "float8_e4m3fn"}
    }
    reloaded = client.load(CLIP_L, storage_dtype="float8_e4m3fn", reload=True)["result"]
    assert reloaded["storage_dtype"] == "float8_e4m3fn" and reloaded["reloaded"]["storage_dtype"] is None
    [listed] = client.status("cpu")["models"]
    assert (listed["storage_dtype"], listed["bytes"]) == ("float8_e4m3fn", reloaded["bytes"])
    assert client.load(CLIP_L, keep_alive=30)["result"]["already_loaded"]  # asks for no other form
    assert not [j for j in client.jobs() if j["state"] == "failed"]


def test_what_the_caller_must_fix_is_422_before_any_job(client: Client) -> None:
    before = len(client.jobs())
    for call, words in (
        (lambda: client.load(LORA), "is a LoRA: apply it to a loaded model with `lora apply`"),
        (lambda: client.cache_model(LORA), "is a LoRA"),
    ):
        with pytest.raises(ApiError) as refused:
            call()
        assert (refused.value.status_code, refused.value.error_code) == (422, "INVALID_REQUEST")
        assert words in refused.value.message
    client.load(CLIP_L)
    for options, words in (({}, "nothing to apply"), ({"bogus": 1}, "unknown optimisation 'bogus'")):
        with pytest.raises(ApiError) as refused:
            client.optimize(CLIP_L, options=options)
        assert refused.value.status_code == 422 and words in refused.value.message
    assert len(client.jobs()) == before + 1  # the one load
