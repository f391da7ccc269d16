"""Concurrent callers: coalesced loads, priorities, timeouts, eviction against budgets and leases."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Iterator
from typing import Any

import pytest

from modelkeeper.client import ApiError, AsyncClient, Client
from modelkeeper.testing.service import RunningService
from tests.api.conftest import CLIP_L, SD15, SD15_CKPT, SDXL, ServiceFactory, checked_client, model_id


@pytest.fixture(scope="module")
def slow(make_service: ServiceFactory) -> Iterator[RunningService]:
    """One CPU worker reading at 10 MB/s: an SDXL pipeline load takes about 3 s."""
    with make_service(worker_args=["--throttle-mb-s", "10"], hash_on_start=False) as running:
        yield running


@pytest.fixture
def client(slow: RunningService) -> Iterator[Client]:
    with checked_client(slow) as c:
        yield c
        c.unload_all(force=True)


def test_concurrent_loads_of_one_model_become_one_load(client: Client, slow: RunningService) -> None:
    mid = model_id(client, SD15)
    loads_before = client.model(mid)["performance"]["loads"]

    async def many() -> list[dict[str, Any]]:
        async with AsyncClient(slow.url) as ac:
            return list(await asyncio.gather(*(ac.load(SD15) for _ in range(6))))

    results = [r["result"] for r in asyncio.run(many())]
    assert all(r["state"] == "loaded" and r["model_id"] == mid for r in results)
    fresh = [r for r in results if not r.get("coalesced") and not r.get("already_loaded")]
    assert len(fresh) == 1, results
    assert sum(1 for r in results if r.get("coalesced")) >= 1
    assert client.model(mid)["performance"]["loads"] == loads_before + 1
    assert [m["model_id"] for m in client.status("cpu")["models"]] == [mid]


def test_queued_operations_run_by_priority(client: Client) -> None:
    blocker = client.load(SDXL, wait=False)["job"]
    end = time.monotonic() + 30
    while client.status("cpu")["running"] is None:  # the blocker holds the device before the others queue
        assert time.monotonic() < end, "the blocking load never started"
        time.sleep(0.02)
    low = client.load(CLIP_L, wait=False, priority="low")["job"]
    high = client.load(SD15_CKPT, wait=False, priority="critical")["job"]
    jobs = {
        name: client.wait_job(j["id"], timeout=60) for name, j in (("b", blocker), ("l", low), ("h", high))
    }
    assert all(j["state"] == "succeeded" for j in jobs.values()), jobs
    assert (
        jobs["b"]["result"]["loaded_at"] < jobs["h"]["result"]["loaded_at"] < jobs["l"]["result"]["loaded_at"]
    )


def test_timeouts_running_and_queued(client: Client) -> None:
    mid = model_id(client, SDXL)
    with pytest.raises(ApiError) as err:
        client.load(SDXL, timeout=0.5)
    assert err.value.status_code == 504 and err.value.error_code == "TIMEOUT"
    assert client.status("cpu")["models"] == []  # rolled back, nothing half-loaded
    assert client.model(mid)["state"]["failed"][0]["error_code"] == "TIMEOUT"
    # queued behind a running load, a short deadline passes in the queue
    blocker = client.load(SDXL, wait=False)["job"]
    with pytest.raises(ApiError) as queued:
        client.load(CLIP_L, timeout=0.3)
    assert queued.value.status_code == 504
    assert client.wait_job(blocker["id"], timeout=60)["state"] == "succeeded"
    assert client.load(CLIP_L)["result"]["state"] == "loaded"  # the device works on


def test_cancel_a_load_job(client: Client) -> None:
    job = client.load(SDXL, wait=False)["job"]
    client.wait_job(job["id"], timeout=0.5)
    cancelled = client.cancel_job(job["id"])
    assert cancelled["state"] == "cancelled", cancelled
    assert client.status("cpu")["models"] == []
    assert client.load(SD15)["result"]["state"] == "loaded"


@pytest.fixture(scope="module")
def small(make_service: ServiceFactory) -> Iterator[RunningService]:
    """One CPU worker whose budget (12 MiB) holds one SD1.5 model (8.7 MB) at a time."""
    with make_service(worker_budget_mb=12, hash_on_start=False) as running:
        yield running


def test_eviction_respects_leases_and_force(small: RunningService) -> None:
    with Client(small.url) as c:
        a, b = model_id(c, SD15), model_id(c, SD15_CKPT)
        c.load(a)
        second = c.load(b)["result"]
        assert second["evicted"] == [a]
        assert [m["model_id"] for m in c.status("cpu")["models"]] == [b]
        lease = c.lease(b)
        with pytest.raises(ApiError) as err:
            c.load(a)
        assert err.value.status_code == 507 and err.value.error_code == "INSUFFICIENT_MEMORY"
        assert "held by tiny-sd15@checkpoints" in err.value.message and b in err.value.details["held"]
        assert c.load(a, force=True)["result"]["evicted"] == [b]
        with pytest.raises(ApiError) as revoked:  # forced out: its lease ends with it
            c.get_lease(lease["id"])
        assert revoked.value.status_code == 404
        with pytest.raises(ApiError) as too_big:
            c.load(SDXL)
        assert too_big.value.status_code == 507 and "budget" in too_big.value.message
        c.unload_all(force=True)
