"""Every endpoint through the Python client, against a real service with two CPU workers."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Iterator

import httpx
import pytest

from modelkeeper.api.errors import status_of
from modelkeeper.client import ApiError, AsyncClient, Client
from modelkeeper.testing.service import RunningService
from tests.api.conftest import (
    CLIP_L,
    LORA,
    SD15,
    SD15_CKPT,
    SDXL,
    ServiceFactory,
    checked_client,
    model_id,
    wait_for_segments,
)

SEED_PATHS = [
    ("get", "/api/model"), ("get", "/api/model/{model_id}"), ("get", "/api/model/status"),
    ("get", "/api/model/status/{device}"), ("post", "/api/model/{model_id}/load"), ("post", "/api/model/load"),
    ("post", "/api/model/load/{device}"), ("post", "/api/model/{model_id}/unload"), ("post", "/api/model/unload"),
    ("delete", "/api/model/unload"), ("delete", "/api/model/unload/{device}"), ("get", "/api/model/available"),
    ("get", "/api/model/available/{type}"), ("get", "/api/model/components"),
    ("get", "/api/model/components/{type}"), ("get", "/api/model/cache"), ("post", "/api/model/cache"),
    ("delete", "/api/model/cache"), ("get", "/api/model/cache/{component_id}"),
    ("delete", "/api/model/cache/{component_id}"), ("post", "/api/model/cache/refresh"),
    ("post", "/api/model/vram/load"), ("post", "/api/model/vram/load/{device}"),
    ("delete", "/api/model/vram/unload"), ("delete", "/api/model/vram/unload/{device}"),
    ("post", "/api/model/{model_id}/validate"), ("post", "/api/model/{model_id}/optimize"),
    ("post", "/api/model/{model_id}/benchmark"), ("post", "/api/model/validate"), ("post", "/api/model/optimize"),
    ("post", "/api/model/benchmark"), ("post", "/api/model/search"), ("get", "/api/model/{model_id}/metadata"),
    ("put", "/api/model/{model_id}/metadata"), ("get", "/api/jobs"), ("get", "/api/jobs/{job_id}"),
    ("delete", "/api/jobs/{job_id}"), ("get", "/api/jobs/{job_id}/events"), ("get", "/api/events"),
    ("get", "/api/leases"), ("post", "/api/leases"), ("delete", "/api/leases/{lease_id}"),
    ("get", "/health/live"), ("get", "/health/ready"), ("get", "/metrics"),
]  # fmt: skip


@pytest.fixture(scope="module")
def svc(make_service: ServiceFactory) -> Iterator[RunningService]:
    with make_service(devices=["cpu", "cpu"]) as running:
        yield running


@pytest.fixture
def client(svc: RunningService) -> Iterator[Client]:
    """A client whose every answer is checked against the OpenAPI spec."""
    with checked_client(svc) as c:
        yield c
        for lease in c.leases():
            c.release_lease(lease["id"])
        c.unload_all(force=True)


def test_health_openapi_and_seed_parity(client: Client) -> None:
    assert client.live() == {"live": True}
    scan = client.jobs(kind="scan")[-1]  # the first scan (newest first): ready waited for it
    assert client.ready() == {
        "ready": True,
        "workers": {"cpu:0": "ready", "cpu:1": "ready"},
        "preload": {"pending": 0, "loaded": [], "failed": []},
        "scan": {"state": "done", "job_id": scan["id"], "error": None},
    }
    paths = client.openapi()["paths"]
    served = {(m, p.replace(":path", "")) for p, ops in paths.items() for m in ops}
    missing = [f"{m.upper()} {p}" for m, p in SEED_PATHS if (m, p) not in served]
    assert not missing, missing


def test_listing_search_available_components(client: Client) -> None:
    page = client.list_models(type="main", limit=2)
    assert page["total"] == 4 and len(page["items"]) == 2
    assert {m["type"] for m in page["items"]} == {"main"}
    second = client.list_models(type="main", limit=2, offset=2)
    assert {m["id"] for m in second["items"]}.isdisjoint({m["id"] for m in page["items"]})
    found = client.search(type="lora", base="sdxl")
    assert found["total"] == 2 and all(m["type"] == "lora" for m in found["items"])
    # a base filter lists what fits that base: the SD-family VAEs (one set of shapes) fit SDXL
    fits_sdxl = {m["name"] for m in client.list_models(type="vae", base="sdxl", limit=100)["items"]}
    assert {"tiny-sdxl-vae", "tiny-sd15-vae"} <= fits_sdxl and "tiny-flux-vae" not in fits_sdxl
    assert {m["type"] for m in client.available("vae")} == {"vae"}
    assert len(client.available()) >= 28
    vaes = client.components("vae")
    assert vaes and all(c["kind"] == "vae" for c in vaes)
    # hashed on start: the SD1.5 VAE inside the pipeline and inside the checkpoint is one component
    shared = [c for c in vaes if len(c["models"]) > 1]
    assert shared, "the same VAE in several files should be one component"
    assert all(c["component_id"] for c in client.components())


def test_model_detail_and_metadata(client: Client) -> None:
    detail = client.model(SD15)
    assert detail["type"] == "main" and detail["base"] == "sd1"
    assert {c["name"] for c in detail["components"]} == {"unet", "vae", "text_encoder"}
    assert detail["state"]["disk"]["status"] == "ok" and detail["state"]["vram"] == []
    mid = detail["id"]
    assert client.model(mid)["id"] == mid  # by id, by relative path, by hash prefix
    assert client.model(detail["file"]["hashes"]["blake3"][:12])["id"] == mid
    meta = client.set_metadata(mid, description="tiny test pipeline", tags=["test", "sd"])
    assert meta["description"] == "tiny test pipeline" and meta["tags"] == ["sd", "test"]
    assert client.metadata(mid)["tags"] == ["sd", "test"]
    assert client.list_models(tag="test")["items"][0]["id"] == mid
    with pytest.raises(ApiError) as err:
        client.set_metadata(mid, colour="blue")
    assert err.value.status_code == 422 and "colour" in err.value.message


def test_load_placement_status_unload(client: Client) -> None:
    mid = model_id(client, SD15)
    client.cache_clear(force=True)  # tests before this one (in any order) may have cached a shared part
    out = client.load(SD15)
    result = out["result"]
    assert result["state"] == "loaded" and result["model_id"] == mid
    assert set(result["components"]) == {"unet", "vae", "text_encoder"}
    # not cached yet: read from disk while the segments fill alongside; the next loads map them
    assert set(result["sources"].values()) == {"disk"}
    assert len(wait_for_segments(client, mid, 3)) == 3
    device = result["device"]
    assert client.load(mid)["result"]["already_loaded"] is True
    status = client.status()
    on = {d["id"]: [m["model_id"] for m in d["models"]] for d in status["devices"]}
    assert on[device] == [mid]
    assert client.status(device)["memory"]["models_bytes"] == result["bytes"]
    assert client.model(mid)["state"]["vram"][0]["device"] == device
    # placement: the next model goes to the device with more free budget, the other one
    hits = client.cache()["stats"]["hits"]
    clip = client.load(CLIP_L)["result"]
    assert clip["device"] != device
    # CLIP-L holds the same tensors as the pipeline's text encoder (one content id, other key names):
    # its load hits the segment filled from the pipeline folder
    assert clip["sources"] == {"text_encoder": "ram"} and client.cache()["stats"]["hits"] == hits + 1
    answer = client.unload(mid)
    unloaded = answer["unloaded"]
    assert unloaded[0]["freed_bytes"] == result["bytes"]
    assert answer["handle"] == unloaded[0]["handle"] == result["handle"]
    assert client.status(device)["models"] == []
    perf = client.model(mid)["performance"]
    assert perf["loads"] >= 1 and perf["last_load_seconds"] > 0


def test_load_on_every_device_shares_one_segment(client: Client) -> None:
    mid = model_id(client, SD15_CKPT)
    out = client.load_everywhere(SD15_CKPT)["result"]
    assert sorted(p["device"] for p in out["placements"]) == ["cpu:0", "cpu:1"]
    status = client.status()
    assert all(mid in [m["model_id"] for m in d["models"]] for d in status["devices"])
    mine = wait_for_segments(client, mid, 3)
    assert len(mine) == 3  # one segment per component, filled once for both loads
    assert len(wait_for_segments(client, mid, 4, timeout=0.5)) == 3
    assert client.unload_all("cpu:1")["unloaded"][0]["model_id"] == mid
    assert [d["id"] for d in client.status()["devices"] if d["models"]] == ["cpu:0"]
    before = client.cache()["stats"]
    again = client.load_on("cpu:1", SD15_CKPT)["result"]
    assert set(again["sources"].values()) == {"ram"}  # both workers now map the same segments
    assert client.cache()["stats"]["hits"] - before["hits"] == 3
    assert client.unload_all("cpu:1")["unloaded"][0]["model_id"] == mid


def test_load_on_a_device_and_the_seed_forms(client: Client) -> None:
    mid = model_id(client, CLIP_L)
    assert client.load_on("cpu:1", CLIP_L)["result"]["device"] == "cpu:1"
    assert client.unload_model(mid, "cpu:1")["unloaded"][0]["device"] == "cpu:1"
    assert client.vram_load(CLIP_L, "cpu:0")["result"]["sources"] == {"text_encoder": "ram"}
    assert client.vram_unload("cpu:0", model_id=mid)["unloaded"][0]["device"] == "cpu:0"
    client.vram_load(CLIP_L)
    assert len(client.vram_unload()["unloaded"]) == 1


def test_job_without_waiting_and_its_event_stream(client: Client) -> None:
    answer = client.http.post(f"/api/model/{SDXL}/load", json={"wait_for_completion": False})
    assert answer.status_code == 202
    job = answer.json()["job"]
    assert job["kind"] == "load" and job["state"] in ("queued", "running")
    events = list(client.job_events(job["id"]))
    types = [e.get("type") for e in events]
    assert types[-1] == "job.succeeded", types
    assert any(t == "job.progress" for t in types)
    done = client.job(job["id"])
    assert done["state"] == "succeeded" and done["result"]["state"] == "loaded"
    assert done["id"] in [j["id"] for j in client.jobs(kind="load")]


def test_validate_benchmark_optimize(client: Client) -> None:
    mid = model_id(client, SD15)
    with pytest.raises(ApiError) as err:
        client.validate(mid)
    assert err.value.status_code == 409 and err.value.error_code == "NOT_LOADED"
    client.load(mid)
    # one entry per placement, for one model as for all of them
    [v] = client.validate(mid, level="weights")["result"]
    assert v["model_id"] == mid and set(v["components"]) == {"unet", "vae", "text_encoder"}
    assert v["handle"] == client.model(mid)["handle"]  # what a person types for it
    assert all(c["passed"] for c in v["components"].values())
    [b] = client.benchmark(mid, component="vae", steps=2, warmup=0)["result"]
    assert list(b["components"]) == ["vae"] and b["components"]["vae"]["figures"]
    [o] = client.optimize(mid, component="unet", options={"channels_last": True}, measure=False)["result"]
    assert o["components"]["unet"]["applied"][0]["option"] == "channels_last"
    assert b["handle"] == o["handle"] == v["handle"]
    every = client.validate(level="header")["result"]
    assert [r["model_id"] for r in every] == [mid]
    assert len(client.benchmark(steps=1, warmup=0, component="vae")["result"]) == 1
    assert len(client.optimize(revert=True, measure=False)["result"]) == 1
    perf = client.model(mid)["performance"]
    assert perf["last_validate"]["components"]["unet"]["passed"] is True
    assert perf["last_benchmark"] is not None and perf["last_optimize"] is not None


def test_cache_endpoints(client: Client) -> None:
    client.cache_clear()
    assert client.cache()["segments"] == []
    out = client.cache_model(SD15_CKPT)["result"]
    assert {s["component"] for s in out["segments"]} == {"unet", "vae", "text_encoder"}
    cid = out["segments"][0]["component_id"]
    assert client.cache_segment(cid)["component_id"] == cid
    assert client.cache_component(cid)["result"]["segments"][0]["component_id"] == cid
    stats = client.cache()["stats"]
    assert stats["segments"] == 3 and stats["bytes_used"] > 0
    prefix = cid.rpartition(":")[2][:10]  # as `modelkeeper cache drop` takes it: the service resolves it
    dropped = client.cache_drop(prefix)
    assert dropped["component_id"] == cid and dropped["freed_bytes"] > 0
    with pytest.raises(ApiError) as unknown:
        client.cache_drop(prefix)
    assert (unknown.value.status_code, unknown.value.message) == (404, f"no cached component {prefix!r}")
    for gone in (lambda: client.cache_segment(cid), lambda: client.cache_drop(cid)):
        with pytest.raises(ApiError) as err:  # an unknown segment is no unknown model
            gone()
        assert (err.value.status_code, err.value.error_code) == (404, "NOT_FOUND")
        assert err.value.message == f"no cached component {cid!r}"
    vae_id = next(c["component_id"] for c in client.components("vae") if c["models"])
    assert client.cache_component(vae_id)["result"]["segments"][0]["component_id"] == vae_id
    assert client.cache_clear()["dropped"] == 3
    refresh = client.refresh(wait=True)["result"]
    assert refresh["summary"]["unchanged"] >= 28


def test_leases_protect_models(client: Client) -> None:
    mid = model_id(client, CLIP_L)
    device = client.load(CLIP_L)["result"]["device"]
    lease = client.lease(mid, holder="pipeline-1", ttl=60)
    assert lease["model_id"] == mid and lease["holder"] == "pipeline-1"
    assert client.get_lease(lease["id"])["id"] == lease["id"]
    assert [x["id"] for x in client.leases(mid)] == [lease["id"]]
    with pytest.raises(ApiError) as err:
        client.unload(mid)
    assert err.value.status_code == 409 and err.value.error_code == "BUSY"
    assert lease["id"] in err.value.details["leases"]
    assert client.status(device)["models"][0]["leases"] == 1
    refused = client.unload_all()
    assert refused["refused"][0]["model_id"] == mid
    renewed = client.renew_lease(lease["id"], ttl=120)
    assert renewed["ttl_seconds"] == 120
    client.release_lease(lease["id"])
    client.unload(mid)
    # force overrides a lease and revokes it; an expired lease protects nothing
    client.load(CLIP_L)
    forced = client.lease(mid)
    client.unload(mid, force=True)
    with pytest.raises(ApiError):
        client.get_lease(forced["id"])
    client.load(CLIP_L)
    short = client.lease(mid, ttl=0.2)
    time.sleep(0.3)
    client.unload(mid)
    with pytest.raises(ApiError) as gone:
        client.release_lease(short["id"])
    assert gone.value.status_code == 404


def test_errors_are_json_with_codes(client: Client, svc: RunningService) -> None:
    cases = [
        (lambda: client.model("no-such-model"), 404, "MODEL_NOT_FOUND"),
        (lambda: client.load(SD15, "cuda:7"), 404, "NOT_FOUND"),
        (lambda: client.load(LORA), 422, "INVALID_REQUEST"),  # a LoRA is applied, not loaded
        (lambda: client.job("j-nope"), 404, "NOT_FOUND"),
        (lambda: client.load_on("cpu:0", "/etc/passwd"), 403, "FORBIDDEN"),
        (lambda: client.load("tiny-sdxl"), 422, "INVALID_REQUEST"),  # ambiguous: three models
    ]
    for call, status, code in cases:
        with pytest.raises(ApiError) as err:
            call()
        assert (err.value.status_code, err.value.error_code) == (status, code), err.value
        assert status_of(code) == status  # each code has one status (tests/api/test_error_statuses.py)
    bad = httpx.post(f"{svc.url}/api/model/load", json={"model_id": SD15, "priority": "urgent"})
    assert bad.status_code == 422
    assert bad.json()["error_code"] == "INVALID_REQUEST" and "priority" in bad.json()["error"]
    flag = httpx.post(f"{svc.url}/api/model/load", json={"model_id": SD15, "timeout_seconds": True})
    assert flag.status_code == 422 and "timeout_seconds" in flag.json()["error"]  # no number
    extra = httpx.post(f"{svc.url}/api/model/search", json={"colour": "blue"})
    assert extra.status_code == 422 and "colour" in extra.json()["error"]
    assert httpx.get(f"{svc.url}/api/nothing").json()["error_code"] == "NOT_FOUND"
    no_stream = httpx.get(f"{svc.url}/api/jobs/j-nope/events")  # was an empty 200 stream
    assert no_stream.status_code == 404 and no_stream.json()["details"] == {"job_id": "j-nope"}
    # found by the fuzzer: numbers past SQLite's integers, a lone UTF-16 surrogate in valid JSON
    assert httpx.get(f"{svc.url}/api/model", params={"offset": 10**20}).status_code == 422
    surrogate = httpx.post(
        f"{svc.url}/api/model/search",
        content=b'{"query": "\\ud800"}',
        headers={"content-type": "application/json"},
    )
    assert surrogate.status_code == 422 and surrogate.json()["error_code"] == "INVALID_REQUEST"
    lone = httpx.put(
        f"{svc.url}/api/model/{SD15}/metadata", content=b'{"description": "\\udc80"}',
        headers={"content-type": "application/json"},
    )  # fmt: skip
    assert lone.status_code == 422
    # curl -d without -H content-type: the body comes as a form; the answer says what to send
    form = httpx.post(f"{svc.url}/api/model/{SD15}/load", content=b'{"device_id": "cpu"}',
                      headers={"content-type": "application/x-www-form-urlencoded"})  # fmt: skip
    assert form.status_code == 422
    assert form.json()["error"].startswith("send the body as JSON with Content-Type: application/json"), (
        form.json()
    )


def test_metrics(client: Client) -> None:
    client.load(CLIP_L)
    text = client.metrics()
    for name in (
        "modelkeeper_load_seconds_bucket", "modelkeeper_cache_bytes", "modelkeeper_cache_hits_total",
        "modelkeeper_cache_misses_total", "modelkeeper_cache_evictions_total", "modelkeeper_device_memory_used_bytes",
        'modelkeeper_jobs{state="succeeded"}', "modelkeeper_worker_up",
    ):  # fmt: skip
        assert name in text, name


def test_event_stream_sees_a_load(client: Client, svc: RunningService) -> None:
    async def run() -> list[dict[str, object]]:
        seen: list[dict[str, object]] = []
        subscribed = asyncio.Event()
        async with AsyncClient(svc.url) as ac:

            async def listen() -> None:
                async for event in ac.events(type="model."):
                    if event.get("subscribed"):  # the stream's hello: every later event follows
                        subscribed.set()
                    if event.get("type") == "model.loaded":
                        seen.append(event)
                        return

            listener = asyncio.create_task(listen())
            await asyncio.wait_for(subscribed.wait(), 30)
            result = await ac.load(CLIP_L)
            assert result["result"]["state"] == "loaded"
            await asyncio.wait_for(listener, 30)
        return seen

    assert len(asyncio.run(run())) == 1


def test_lora_on_a_loaded_model(client: Client) -> None:
    mid, lid = model_id(client, SD15), model_id(client, LORA)
    with pytest.raises(ApiError) as err:
        client.apply_lora(mid, lid)
    assert err.value.error_code == "NOT_LOADED"
    before = client.load(SD15)["result"]
    applied = client.apply_lora(mid, LORA, strength=0.8)
    assert applied["lora_id"] == lid and applied["applied"][0]["device"] == before["device"]
    assert applied["applied"][0]["matched_keys"] > 0
    assert client.status(before["device"])["models"][0]["loras"][lid]["strength"] == 0.8
    assert client.lora_strength(mid, LORA, 0.3)["devices"][0]["device"] == before["device"]
    assert client.status(before["device"])["models"][0]["loras"][lid]["strength"] == 0.3
    client.remove_lora(mid, lid)
    assert client.status(before["device"])["models"][0]["loras"] == {}
    with pytest.raises(ApiError) as not_lora:
        client.apply_lora(mid, CLIP_L)
    assert not_lora.value.status_code == 422 and "not a LoRA" in not_lora.value.message


def test_ready_waits_for_preloads_and_placements_show_keep_alive(make_service: ServiceFactory) -> None:
    with make_service(preload=[CLIP_L, "nope"], keep_alive=600) as running, checked_client(running) as c:
        deadline = time.monotonic() + 60
        while True:
            answer = httpx.get(f"{running.url}/health/ready")
            body = answer.json()
            if body["preload"]["pending"] == 0 or time.monotonic() > deadline:
                break
            time.sleep(0.05)
        # one preload failed: the service says it is not ready, and why
        assert answer.status_code == 503 and not body["ready"]
        assert [e["model"] for e in body["preload"]["loaded"]] == [CLIP_L]
        assert body["preload"]["failed"][0]["model"] == "nope"
        placed = c.status()["devices"][0]["models"][0]
        assert placed["keep_loaded"] and placed["keep_alive"] == 600
        assert placed["expires_at"] == pytest.approx(placed["last_used"] + 600)
        own = c.load(SD15, keep_alive=-1)["result"]  # a load asks for its own
        assert own["keep_alive"] == -1 and own["expires_at"] is None
