"""The token flow in a real browser: the page asks for the token, sends it in a header on every
call and on the event stream, keeps it out of URLs and out of the page, and asks again when it
is refused."""

from __future__ import annotations

from collections.abc import Iterator

import httpx
import pytest
from playwright.sync_api import Request, expect

from modelkeeper.testing.service import RunningService
from tests.web.conftest import ServiceFactory, Watched

pytestmark = pytest.mark.xdist_group("web")

TOKEN = "tok-7f3a9c1e-do-not-show"


@pytest.fixture(scope="module")
def svc(make_service: ServiceFactory) -> Iterator[RunningService]:
    with make_service(token=TOKEN, worker_warm=False, hash_on_start=False) as s:
        yield s


def test_the_shell_loads_without_the_token_and_the_api_still_needs_it(svc: RunningService) -> None:
    assert httpx.get(f"{svc.url}/").status_code == 200
    assert httpx.get(f"{svc.url}/ui/app.js").status_code == 200
    assert httpx.get(f"{svc.url}/api/model/status").status_code == 401
    assert httpx.get(f"{svc.url}/api/events").status_code == 401


def test_the_page_asks_for_the_token_and_keeps_it_out_of_sight(svc: RunningService, watched: Watched) -> None:
    page = watched.page
    sent: list[Request] = []
    page.on("request", lambda r: sent.append(r) if "/api/" in r.url else None)
    page.goto(f"{svc.url}/")
    expect(page.locator("#login")).to_be_visible()
    expect(page.locator("section.device")).to_have_count(0)

    page.fill("#token", "wrong")
    page.click("#login-form button[type=submit]")
    expect(page.locator("#login-error")).to_have_text("That token was refused.")
    assert page.evaluate("sessionStorage.length") == 0  # a refused token is not kept

    page.fill("#token", TOKEN)
    page.click("#login-form button[type=submit]")
    expect(page.locator('section[data-device="cpu"]')).to_be_visible()
    expect(page.locator("#live")).to_have_attribute("data-state", "live")  # the stream got through
    assert page.input_value("#token") == ""
    assert TOKEN not in page.content() and TOKEN not in page.url
    assert all(TOKEN not in r.url for r in sent)
    authorized = [r for r in sent if r.headers.get("authorization") == f"Bearer {TOKEN}"]
    assert {r.url.removeprefix(svc.url).split("?")[0] for r in authorized} >= {
        "/api/model/status",
        "/api/events",
    }
    assert page.evaluate("document.cookie") == ""

    page.click("#forget")
    expect(page.locator("#login")).to_be_visible()
    assert page.evaluate("sessionStorage.length") == 0
    watched.clean(console=False)  # the refused calls log 401s; nothing else may fail
