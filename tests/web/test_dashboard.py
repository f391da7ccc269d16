"""The dashboard against a running service, in headless Chromium: live updates, job progress,
actions, search, and untrusted text shown as text."""

from __future__ import annotations

import re
import time
from collections.abc import Iterator

import pytest
from playwright.sync_api import Page, Route, expect

from modelkeeper.client import Client
from modelkeeper.testing.service import RunningService
from tests.web.conftest import HOSTILE, PAYLOADS, ServiceFactory, Watched, open_live

pytestmark = pytest.mark.xdist_group("web")

SD15 = "diffusers/tiny-sd15"
SDXL = "diffusers/tiny-sdxl"  # 4 components: a load reports progress four times
CLIP_L = "clip/tiny-clip-l.safetensors"
LORA = "loras/tiny-sd15-kohya.safetensors"
DASH = "\u2013"  # the pager separates a range with an en dash

#: Records every value a job's progress bar takes (attribute changes and new rows), in the page.
RECORD_PROGRESS = """() => {
  window.__bars = {};
  const note = (bar) => {
    const row = bar.closest("tr[data-job]");
    if (!row) return;
    (window.__bars[row.dataset.job] ??= []).push(bar.getAttribute("value"));
  };
  new MutationObserver((records) => {
    for (const r of records) {
      if (r.type === "attributes" && r.target.matches("progress")) note(r.target);
      for (const n of r.addedNodes || []) n.querySelectorAll?.("progress").forEach(note);
    }
  }).observe(document.querySelector("tbody"), {subtree: true, childList: true, attributes: true, attributeFilter: ["value"]});
}"""


@pytest.fixture(scope="module")
def svc(make_service: ServiceFactory) -> Iterator[RunningService]:
    with make_service() as s:
        yield s


@pytest.fixture(scope="module")
def client(svc: RunningService) -> Iterator[Client]:
    with Client(svc.url) as c:
        yield c


def test_the_shell_is_served_with_a_strict_policy(svc: RunningService, client: Client) -> None:
    import httpx

    r = httpx.get(f"{svc.url}/")
    assert r.status_code == 200 and r.headers["content-type"].startswith("text/html")
    csp = r.headers["content-security-policy"]
    assert "script-src 'self'" in csp and "unsafe-inline" not in csp and "frame-ancestors 'none'" in csp
    assert "<script>" not in r.text  # no inline script: only <script type="module" src=...>
    again = httpx.get(
        f"{svc.url}/ui/app.js", headers={"if-none-match": httpx.get(f"{svc.url}/ui/app.js").headers["etag"]}
    )
    assert again.status_code == 304
    assert httpx.post(f"{svc.url}/", content=b"x").status_code == 405
    assert httpx.get(f"{svc.url}/ui/nope.js").status_code == 404
    assert httpx.get(f"{svc.url}/", headers={"host": "evil.example"}).status_code == 400  # DNS rebinding


def test_a_model_loaded_through_the_api_appears_within_a_second(
    svc: RunningService, client: Client, watched: Watched
) -> None:
    page = open_live(watched, f"{svc.url}/#/")
    page.wait_for_selector('section[data-device="cpu"]')
    mid = client.model(SD15)["id"]
    client.load(mid)
    done = time.monotonic()
    page.wait_for_selector(f'tr[data-model="{mid}"] .badge-loaded', timeout=1000)
    assert time.monotonic() - done < 1.0
    assert "tiny-sd15" in page.inner_text(f'tr[data-model="{mid}"]')
    client.unload(mid)
    page.wait_for_selector(f'tr[data-model="{mid}"]', state="detached", timeout=1000)
    watched.clean()


def test_a_jobs_progress_bar_moves_and_finishes(
    svc: RunningService, client: Client, watched: Watched
) -> None:
    page = open_live(watched, f"{svc.url}/#/jobs")
    page.wait_for_selector("tr[data-job]")  # the scan job: the list has loaded
    page.evaluate(RECORD_PROGRESS)
    job = client.load(SDXL, wait=False)["job"]
    page.wait_for_selector(f'tr[data-job="{job["id"]}"][data-state="succeeded"]', timeout=60_000)
    values = [float(v) for v in page.evaluate(f"window.__bars[{job['id']!r}]") if v is not None]
    assert values[-1] == 1.0
    assert any(0 < v < 1 for v in values), values  # it moved through the components
    assert values == sorted(values)
    assert page.inner_text(f'tr[data-job="{job["id"]}"] .job-pct') == "100%"
    client.unload(SDXL)
    watched.clean()


def test_load_lora_and_unload_from_the_model_page(
    svc: RunningService, client: Client, watched: Watched
) -> None:
    mid = client.model(SD15)["id"]
    page = open_live(watched, f"{svc.url}/#/model/{mid}")
    page.wait_for_selector('[data-empty="vram"]')
    page.select_option("select[name=device]", "cpu")
    page.click("button.load")
    page.wait_for_selector('table.placements tr[data-device="cpu"] .badge-loaded', timeout=30_000)
    assert [p["device"] for p in client.model(mid)["state"]["vram"]] == ["cpu"]

    lora = client.model(LORA)["id"]
    page.wait_for_selector(f'select[name=lora] option[value="{lora}"]', state="attached")
    page.select_option("select[name=lora]", lora)
    page.fill("input[name=strength]", "0.75")
    page.click("button.apply-lora")
    page.wait_for_selector(f'table.loras tr[data-lora="{lora}"]')
    assert client.model(mid)["state"]["vram"][0]["loras"][lora]["strength"] == 0.75
    page.fill(f'table.loras tr[data-lora="{lora}"] input[type=range]', "-0.5")
    expect(page.locator(f'table.loras tr[data-lora="{lora}"] output')).to_have_text("-0.50")
    page.wait_for_function(  # the slider's change reached the worker
        "([url, lora]) => fetch(url).then(r => r.json()).then(d => d.state.vram[0].loras[lora]?.strength === -0.5)",
        arg=[f"/api/model/{mid}", lora],
    )
    page.click(f'table.loras tr[data-lora="{lora}"] button.remove-lora')
    page.wait_for_selector(f'table.loras tr[data-lora="{lora}"]', state="detached")
    assert client.model(mid)["state"]["vram"][0]["loras"] == {}

    page.click("button.unload")
    page.wait_for_selector('[data-empty="vram"]')
    assert client.model(mid)["state"]["vram"] == []
    watched.clean()


def rows(page: Page) -> list[list[str]]:
    return [r.split("\t") for r in page.locator("table.library tbody tr").all_inner_texts()]


def test_search_filters_and_pages(svc: RunningService, client: Client, watched: Watched) -> None:
    page = open_live(watched, f"{svc.url}/#/library")
    total = client.list_models(limit=1)["total"]
    count = page.locator(".pager .count")
    expect(count).to_have_text(f"1{DASH}{total} of {total}")

    page.fill("input[name=query]", "sdxl")
    expect(count).to_have_text(re.compile(f" of {client.list_models(query='sdxl')['total']}$"))
    assert rows(page) and all("sdxl" in " ".join(r) for r in rows(page))

    page.fill("input[name=query]", "")
    page.select_option("select[name=type]", "lora")
    expected = client.list_models(type="lora", limit=200)
    expect(count).to_have_text(re.compile(f" of {expected['total']}$"))
    assert sorted(r[0] for r in rows(page)) == sorted(m["name"] for m in expected["items"])
    assert {r[1] for r in rows(page)} == {"lora"}

    page.select_option("select[name=type]", "vae")
    page.select_option("select[name=base]", "sdxl")  # what fits SDXL, the SD-family VAEs included
    expected = client.list_models(type="vae", base="sdxl", limit=200)
    expect(count).to_have_text(re.compile(f" of {expected['total']}$"))
    assert sorted(r[0] for r in rows(page)) == sorted(m["name"] for m in expected["items"])
    assert "tiny-sdxl-vae" in {r[0] for r in rows(page)}
    page.select_option("select[name=base]", "")

    page.select_option("select[name=type]", "")
    page.select_option("select[name=limit]", "10")
    expect(count).to_have_text(f"1{DASH}10 of {total}")
    page.click("button.next")
    expect(count).to_have_text(f"11{DASH}20 of {total}")
    second = [m["name"] for m in client.list_models(limit=10, offset=10)["items"]]
    assert [r[0] for r in rows(page)] == second
    page.select_option("select[name=limit]", "50")  # the tab remembers: leave it as found
    watched.clean()


def test_untrusted_metadata_is_shown_as_text_and_never_runs(
    svc: RunningService, client: Client, watched: Watched
) -> None:
    model = client.model(HOSTILE)
    assert model["name"].startswith(PAYLOADS["name"])  # the sidecar named it
    page = open_live(watched, f"{svc.url}/#/model/{model['id']}")
    page.wait_for_selector(".meta-view")
    assert page.inner_text(".model-head h1").startswith(PAYLOADS["name"])
    shown = page.inner_text(".meta-view")
    for payload in PAYLOADS.values():
        assert payload in shown
    assert page.input_value("textarea[name=description]") == PAYLOADS["description"]
    # and in the library listing and search
    page.goto(f"{svc.url}/#/library")
    page.fill("input[name=query]", "evil")
    page.wait_for_selector(f'tr[data-model="{model["id"]}"]')
    assert PAYLOADS["name"] in page.inner_text(f'tr[data-model="{model["id"]}"]')
    page.fill("input[name=query]", "")
    # nothing became markup: no element the payloads would have made, no handler attribute
    made = page.evaluate(
        "document.querySelectorAll('main script, main img, main b, main [onerror], main [onload], main [onmouseover]').length"
    )
    assert made == 0
    watched.clean()


def test_editing_metadata_from_the_page(svc: RunningService, client: Client, watched: Watched) -> None:
    mid = client.model(CLIP_L)["id"]
    page = open_live(watched, f"{svc.url}/#/model/{mid}")
    page.wait_for_selector("form.meta-form")
    page.fill("input[name=tags]", "clip, <i>text encoder</i>")
    page.fill("textarea[name=description]", "a <u>tiny</u> CLIP-L")
    page.click("form.meta-form button[type=submit]")
    expect(page.locator(".meta-view")).to_contain_text("a <u>tiny</u> CLIP-L")
    detail = client.model(mid)["meta"]
    assert (
        sorted(detail["tags"]) == ["<i>text encoder</i>", "clip"]
        and detail["description"] == "a <u>tiny</u> CLIP-L"
    )
    assert page.evaluate("document.querySelectorAll('main i, main u').length") == 0
    watched.clean()


def test_cancel_a_running_job_from_the_page(svc: RunningService, client: Client, watched: Watched) -> None:
    mid = client.model(SD15)["id"]
    client.load(mid)
    page = open_live(watched, f"{svc.url}/#/jobs")
    job = client.benchmark(mid, wait=False, steps=10_000, warmup=0)["job"]  # minutes, unless cancelled
    row = f'tr[data-job="{job["id"]}"]'
    page.wait_for_selector(f'{row}[data-state="running"]')
    page.click(f"{row} button.cancel")
    page.wait_for_selector(f'{row}[data-state="cancelled"]', timeout=15_000)
    assert client.job(job["id"])["state"] == "cancelled"
    expect(page.locator(f"{row} button.cancel")).to_be_hidden()
    client.unload(mid)
    watched.clean()


def test_a_late_progress_event_never_revives_a_finished_job(
    svc: RunningService, client: Client, watched: Watched
) -> None:
    """A progress event the worker sent before it saw the cancel can reach the page after the job's
    end. The event stream is served by the test here, in the service's own format and with a real
    job's info, so that order is certain: running, cancelled, then a late progress event. The row
    stays cancelled, and so it does after the page's own listing and the stream's replay."""
    import json

    real = client.jobs(limit=1)[0]
    job = {**real, "id": "j-late-progress", "kind": "benchmark", "state": "running", "error": None,
           "finished_at": None, "progress": {"step": 1, "steps": 10}}  # fmt: skip
    ended = {**job, "state": "cancelled", "finished_at": job["started_at"] or time.time()}
    events = [
        ("hello", {}),
        ("job.running", {"job": job["id"], "kind": "benchmark", "info": job}),
        ("job.cancelled", {"job": job["id"], "kind": "benchmark", "info": ended}),
        ("job.progress", {"job": job["id"], "kind": "benchmark", "progress": {"step": 9, "steps": 10}}),
    ]
    body = "".join(f"event: {t}\ndata: {json.dumps(d)}\n\n" for t, d in events)
    served = []

    def stream(route: Route) -> None:
        served.append(route.request.url)  # the first answer carries the events; a reconnect only hello
        text = body if len(served) == 1 else "event: hello\ndata: {}\n\n"
        route.fulfill(status=200, headers={"content-type": "text/event-stream"}, body=text)

    watched.page.route(re.compile(r".*/api/events(\?.*)?$"), stream)
    page = watched.page
    page.goto(f"{svc.url}/#/jobs")
    row = f'tr[data-job="{job["id"]}"]'
    page.wait_for_selector(f'{row}[data-state="cancelled"]')
    expect(page.locator(f"{row} .job-progress")).to_have_attribute("data-state", "cancelled")
    page.wait_for_timeout(800)  # the stream reconnects (500 ms) and the listing refreshes meanwhile
    assert len(served) >= 2
    expect(page.locator(row)).to_have_attribute("data-state", "cancelled")
    expect(page.locator(f"{row} button.cancel")).to_be_hidden()
    watched.clean()


def test_an_unknown_model_says_so(svc: RunningService, watched: Watched) -> None:
    page = open_live(watched, f"{svc.url}/#/model/{'<b>nope</b>'}")
    expect(page.locator(".model-head h1")).to_have_text("No such model")
    expect(page.locator(".model-head p")).to_contain_text("<b>nope</b>")
    watched.clean(console=False)  # the 404 is logged by the browser


#: Makes the tab look hidden (True) or shown (False) to the page, as switching tabs does.
SET_HIDDEN = """(hidden) => {
  Object.defineProperty(document, "hidden", { configurable: true, get: () => hidden });
  Object.defineProperty(document, "visibilityState", { configurable: true, get: () => (hidden ? "hidden" : "visible") });
  document.dispatchEvent(new Event("visibilitychange"));
}"""


def test_a_hidden_tab_requests_nothing_and_catches_up_when_shown(
    svc: RunningService, client: Client, watched: Watched
) -> None:
    requests: list[str] = []
    watched.page.on("request", lambda r: requests.append(r.url))
    page = open_live(watched, f"{svc.url}/#/")
    page.wait_for_selector('section[data-device="cpu"]')
    assert any(u.endswith("/api/events?exclude=worker.state") for u in requests), requests
    page.evaluate(SET_HIDDEN, True)
    requests.clear()
    mid = client.model(CLIP_L)["id"]
    client.load(mid)  # its events reach the hidden page: no refetch, no poll
    page.wait_for_timeout(2500)  # past the devices page's 2 s poll
    assert requests == [] and page.locator(f'tr[data-model="{mid}"]').count() == 0
    page.evaluate(SET_HIDDEN, False)
    page.wait_for_selector(f'tr[data-model="{mid}"] .badge-loaded', timeout=1000)
    assert [u for u in requests if "/api/" in u] == [f"{svc.url}/api/model/status"]  # one, not one per event
    client.unload(mid)
    page.wait_for_selector(f'tr[data-model="{mid}"]', state="detached", timeout=1000)
    watched.clean()
