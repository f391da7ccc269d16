"""A device whose worker cannot start (issue: devices=["cuda:0"] without CUDA served with a worker
``failed`` and no reason, and loads said ``WORKER_DIED: no worker is running``): the reason is the
device's ``last_error`` in the status, and a load there is refused with it. ``cuda:99`` exists on no
machine, so the test is the same with or without a GPU."""

from __future__ import annotations

import pytest

from modelkeeper.client import ApiError, Client
from tests.api.conftest import CLIP_L, ServiceFactory


def test_a_device_that_cannot_start_says_why_in_status_and_loads(make_service: ServiceFactory) -> None:
    with make_service(devices=["cuda:99"]) as svc, Client(svc.url) as client:
        (device,) = client.status()["devices"]
        assert device["id"] == "cuda:99" and device["state"] == "failed" and device["pid"] is None
        reason = device["last_error"]
        assert reason.startswith("worker did not start: device 'cuda:99': "), reason
        why = reason.removeprefix("worker did not start: ")
        with pytest.raises(ApiError) as not_ready:
            client.ready()
        assert not_ready.value.status_code == 503  # no worker runs
        for device_asked in ("cuda:99", None):  # named, or left to placement
            with pytest.raises(ApiError) as info:
                client.load(CLIP_L, device_asked)
            assert info.value.status_code == 503 and info.value.error_code == "NOT_READY", info.value
            assert why in info.value.message and "WORKER_DIED" not in str(info.value)
        assert not client.jobs(kind="load")  # refused before any job: nothing piles up
