"""The model page's actions in headless Chromium against a real service: a load with options
(storage dtype, offload, keep-alive) and the form it made in the device list; a load refused
because the model is loaded in another form, then reloaded from the page; the result of a
validation and a benchmark shown next to them; an unknown address."""

from __future__ import annotations

import json
from collections.abc import Iterator
from typing import Any

import pytest
import torch
from playwright.sync_api import Page, Request, expect
from safetensors.torch import load_file, save_file

from modelkeeper.client import Client
from modelkeeper.testing import DemoManifest
from modelkeeper.testing.service import RunningService
from tests.web.conftest import ServiceFactory, Watched, open_live

pytestmark = pytest.mark.xdist_group("web")

CLIP_L = "clip/tiny-clip-l.safetensors"  # one component: loads, validates and benchmarks in ms
BROKEN = "clip/broken-clip-l.safetensors"


@pytest.fixture(scope="module")
def svc(
    make_service: ServiceFactory, demo: DemoManifest, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[RunningService]:
    """The demo models, and a copy of the tiny CLIP-L with NaN in one tensor (it fails validation)."""
    extra = tmp_path_factory.mktemp("nan-root")
    tensors = load_file(demo.root / CLIP_L)
    name = next(k for k, t in tensors.items() if t.is_floating_point())
    tensors[name] = torch.full_like(tensors[name], float("nan"))
    (extra / BROKEN).parent.mkdir(parents=True)
    save_file(tensors, extra / BROKEN)
    with make_service(hash_on_start=False, model_roots=[demo.root, extra]) as s:
        yield s


@pytest.fixture(scope="module")
def client(svc: RunningService) -> Iterator[Client]:
    with Client(svc.url) as c:
        yield c


@pytest.fixture
def clip(client: Client) -> Iterator[str]:
    """The tiny CLIP-L's id, not loaded before the test and unloaded after it."""
    mid = str(client.model(CLIP_L)["id"])
    assert client.model(mid)["state"]["vram"] == []
    yield mid
    if client.model(mid)["state"]["vram"]:
        client.unload(mid)


def load_bodies(page: Page) -> list[dict[str, Any]]:
    """The bodies of the load requests the page sends, as they are sent (recorded from now on)."""
    bodies: list[dict[str, Any]] = []

    def note(request: Request) -> None:
        if request.method == "POST" and request.url.endswith("/load"):
            bodies.append(json.loads(request.post_data or "{}"))

    page.on("request", note)
    return bodies


def open_model(w: Watched, svc: RunningService, mid: str) -> Page:
    page = open_live(w, f"{svc.url}/#/model/{mid}")
    page.wait_for_selector('[data-empty="vram"]')
    return page


def test_load_with_a_storage_dtype_and_see_its_form_in_the_device_list(
    svc: RunningService, client: Client, clip: str, watched: Watched
) -> None:
    page = open_model(watched, svc, clip)
    bodies = load_bodies(page)
    page.click(".load-options summary")
    page.select_option("select[name=storage_dtype]", "float8_e4m3fn")
    page.fill("input[name=keep_alive]", "600")
    expect(page.locator(".load-options summary")).to_contain_text("stored as float8_e4m3fn, keep-alive 600 s")
    page.select_option("select[name=device]", "cpu")
    page.click("button.load")
    result = page.locator('.job-result .result[data-action="load"]')
    expect(result).to_have_attribute("data-state", "succeeded")
    expect(result).to_contain_text("loaded on cpu")
    expect(result).to_contain_text(", stored as float8_e4m3fn")
    assert bodies == [
        {"device_id": "cpu", "keep_loaded": False, "storage_dtype": "float8_e4m3fn", "keep_alive": 600,
         "wait_for_completion": False}
    ]  # fmt: skip
    placement = client.model(clip)["state"]["vram"][0]
    assert placement["storage_dtype"] == "float8_e4m3fn" and placement["keep_alive"] == 600
    expect(page.locator('table.placements tr[data-device="cpu"] td.form')).to_have_text(
        f"{placement['dtype']}, stored as float8_e4m3fn"
    )

    page.click("nav a[data-route=devices]")
    cell = page.locator(f'section[data-device="cpu"] tr[data-model="{clip}"] td.form')
    expect(cell).to_have_text(f"{placement['dtype']}, stored as float8_e4m3fn")
    watched.clean()


def test_a_load_in_another_form_is_refused_then_reloaded_from_the_page(
    svc: RunningService, client: Client, clip: str, watched: Watched
) -> None:
    client.load(clip, device="cpu")
    loaded = client.model(clip)["state"]["vram"][0]
    assert loaded["storage_dtype"] is None
    page = open_live(watched, f"{svc.url}/#/model/{clip}")
    page.wait_for_selector('table.placements tr[data-device="cpu"] .badge-loaded')
    bodies = load_bodies(page)
    page.click(".load-options summary")

    # a size that is no size: said next to the field, nothing sent
    page.fill("input[name=offload]", "4 gigs")
    page.click("button.load")
    error = page.locator('.field-error[data-field="offload"]')
    expect(error).to_be_visible()
    expect(error).to_contain_text("offload: 4 gigs: expected none, auto or a size like 4GB")
    expect(page.locator("input[name=offload]")).to_have_attribute("aria-invalid", "true")
    assert bodies == []
    page.fill("input[name=offload]", "")
    expect(error).to_be_hidden()

    # another storage dtype than the model has: 409 ALREADY_LOADED, its message, and the offer
    page.select_option("select[name=storage_dtype]", "float8_e5m2")
    page.click("button.load")
    conflict = page.locator(".load-conflict")
    expect(conflict).to_be_visible()
    expect(conflict).to_contain_text(f"is loaded on cpu as {loaded['dtype']}")
    expect(conflict).to_contain_text("storage_dtype float8_e5m2")
    assert client.model(clip)["state"]["vram"][0]["storage_dtype"] is None  # nothing happened
    page.click(".load-conflict button.reload")
    result = page.locator('.job-result .result[data-action="load"]')
    expect(result).to_have_attribute("data-state", "succeeded")
    expect(result).to_contain_text(f"reloaded: was {loaded['dtype']}")
    expect(conflict).to_be_hidden()
    assert bodies[-1] == {"keep_loaded": False, "storage_dtype": "float8_e5m2", "reload": True,
                          "wait_for_completion": False}  # fmt: skip
    assert client.model(clip)["state"]["vram"][0]["storage_dtype"] == "float8_e5m2"
    expect(page.locator('table.placements tr[data-device="cpu"] td.form')).to_contain_text("float8_e5m2")

    # a size is sent as bytes (decimal units, as the CLI reads them)
    page.fill("input[name=offload]", "4GB")
    page.click("button.load")
    expect(conflict).to_contain_text("offload 4.0 GB")
    assert bodies[-1]["offload"] == 4_000_000_000
    watched.clean(console=False)  # the browser logs each 409


def test_validate_and_benchmark_results_shown_next_to_the_actions(
    svc: RunningService, client: Client, clip: str, watched: Watched
) -> None:
    page = open_model(watched, svc, clip)
    result = page.locator(".job-result .result")

    page.click("button.validate")  # not loaded: refused, and said where it was asked
    expect(result).to_have_attribute("data-action", "validate")
    expect(result).to_have_attribute("data-state", "failed")
    expect(result).to_contain_text("not loaded")

    client.load(clip, device="cpu")
    page.wait_for_selector('table.placements tr[data-device="cpu"] .badge-loaded')
    page.select_option("select[name=level]", "weights")
    page.click("button.validate")
    passed = page.locator('.job-result .result[data-action="validate"][data-state="passed"]')
    expect(passed).to_contain_text("passed on cpu (weights): 1 component passed")

    page.click("button.benchmark")
    bench = page.locator('.job-result .result[data-action="benchmark"][data-state="succeeded"]')
    expect(bench).to_contain_text("on cpu, median time per step:")
    figures = client.model(clip)["history"][0]
    assert figures["op"] == "benchmark"
    expect(bench.locator(".result-detail")).to_have_count(len(figures["data"]["components"]))
    expect(bench.locator(".result-detail").first).to_contain_text(" ms/step")

    # a validation that fails names the component and the check, with its message
    broken = str(client.model(BROKEN)["id"])
    client.load(broken, device="cpu")
    try:
        page.goto(f"{svc.url}/#/model/{broken}")
        page.wait_for_selector('table.placements tr[data-device="cpu"] .badge-loaded')
        page.select_option("select[name=level]", "weights")
        page.click("button.validate")
        failed = page.locator('.job-result .result[data-action="validate"][data-state="failed"]')
        expect(failed).to_contain_text("failed on cpu (weights): 1 of 1 component failed")
        expect(failed.locator(".result-detail")).to_contain_text("finite: ")
        expect(failed.locator(".result-detail")).to_contain_text("NaN")
    finally:
        client.unload(broken)
    watched.clean(console=False)  # the refused validate is logged by the browser


def test_an_unknown_address_says_so_and_links_the_pages(svc: RunningService, watched: Watched) -> None:
    page = open_live(watched, f"{svc.url}/#/bogus")
    box = page.locator('[data-page="not-found"] .not-found')
    expect(box.locator("h1")).to_have_text("No such page")
    expect(box).to_contain_text("#/bogus")
    assert box.locator("a").evaluate_all("links => links.map(a => a.getAttribute('href'))") == [
        "#/", "#/cache", "#/jobs", "#/library",
    ]  # fmt: skip
    assert page.locator("nav a.active").count() == 0
    # the address is shown as text, whatever it holds
    page.evaluate("location.hash = '#/<img src=x onerror=alert(1)>'")
    expect(box).to_contain_text("#/<img src=x onerror=alert(1)>")
    assert page.evaluate("document.querySelectorAll('main img').length") == 0
    page.click(".not-found a[href='#/library']")
    page.wait_for_selector("table.library")
    page.evaluate("location.hash = '#/devices'")  # the devices page by its name too, as the others are
    page.wait_for_selector('[data-page="devices"]')
    assert page.locator('[data-page="not-found"]').count() == 0
    watched.clean()
