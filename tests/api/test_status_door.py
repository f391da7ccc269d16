"""``GET /api/model/status`` answered before FastAPI's router (api/fastpath.py): behind the same
doors as every route, the same body and headers as the documented route, and never stale after
an event (the snapshot it serves is rebuilt after each one)."""

from __future__ import annotations

import json
import time
from pathlib import Path

import httpx

from modelkeeper.api.fastpath import StatusDoor
from modelkeeper.testing import DemoManifest
from tests.api.conftest import CLIP_L, inprocess_service

TOKEN = "door-token"


def test_status_door_keeps_the_doors_and_the_answer(demo: DemoManifest, tmp_path: Path) -> None:
    with inprocess_service(demo, tmp_path, token=TOKEN) as svc:
        auth = {"Authorization": f"Bearer {TOKEN}"}
        url = f"{svc.url}/api/model/status"
        assert httpx.get(url).status_code == 401  # the token is checked before the door
        assert httpx.get(url, headers={**auth, "Host": "evil.example.com"}).status_code == 400
        answer = httpx.get(url, headers=auth, params={"unused": "1"})  # a query changes nothing
        assert answer.status_code == 200 and answer.headers["content-type"] == "application/json"
        assert answer.content == svc.service.views.status_json()
        assert int(answer.headers["content-length"]) == len(answer.content)
        assert json.loads(answer.content)["devices"][0]["id"] == "cpu"
        # other methods and paths go on to the router as before
        assert httpx.post(url, headers=auth).status_code == 405
        assert httpx.get(f"{url}/cpu", headers=auth).json()["id"] == "cpu"
        app = svc.server.config.app
        assert any(m.cls is StatusDoor for m in app.user_middleware)  # type: ignore[attr-defined]


def until_ready(c: httpx.Client) -> None:
    """Until ``/health/ready`` answers 200: the first scan has registered the demo models."""
    end = time.monotonic() + 60
    while c.get("/health/ready").status_code != 200:
        assert time.monotonic() < end, c.get("/health/ready").json()
        time.sleep(0.02)


def test_status_is_never_stale_after_an_event(demo: DemoManifest, tmp_path: Path) -> None:
    with inprocess_service(demo, tmp_path) as svc, httpx.Client(base_url=svc.url, timeout=60) as c:
        until_ready(c)
        assert c.get("/api/model/status").json()["leases"] == 0
        granted = c.post("/api/leases", json={"model_id": CLIP_L, "ttl_seconds": 600})
        assert granted.status_code == 201, granted.text
        lease = granted.json()
        assert c.get("/api/model/status").json()["leases"] == 1  # at once: no quarter-second wait
        jobs = c.get("/api/model/status").json()["jobs"]
        c.post(f"/api/model/{CLIP_L}/load", json={}).raise_for_status()
        after = c.get("/api/model/status").json()
        assert after["jobs"]["succeeded"] == jobs["succeeded"] + 1
        assert [m["name"] for m in after["devices"][0]["models"]] == ["tiny-clip-l"]
        c.delete(f"/api/leases/{lease['id']}").raise_for_status()
        c.post(f"/api/model/{CLIP_L}/unload", json={}).raise_for_status()
        final = c.get("/api/model/status").json()
        assert final["leases"] == 0 and final["devices"][0]["models"] == []
