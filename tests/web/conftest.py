"""The dashboard in a real browser: headless Chromium (Debian's package, driven by Playwright)
against a real service (uvicorn, a CPU worker subprocess, SQLite, the demo models plus one model
whose sidecar is hostile)."""

from __future__ import annotations

import json
from collections.abc import Callable, Iterator
from contextlib import AbstractContextManager
from pathlib import Path
from typing import Any

import pytest

from modelkeeper.testing import DemoManifest
from modelkeeper.testing.service import RunningService

pytest.importorskip("playwright.sync_api")
from playwright.sync_api import Browser, Page

from modelkeeper.testing.browser import chromium
from tests.conftest import scanned_service

LORA = "loras/tiny-sd15-kohya.safetensors"
#: What a hostile .civitai.info says: each field lands in a different place of the pages.
PAYLOADS = {
    "name": "<img src=x onerror=alert('name')>",
    "description": "<script>alert('description')</script>",
    "trained": "\"><svg onload=alert('trigger')>",
    "tag": "<b onmouseover=alert('tag')>bold</b>",
}
HOSTILE = "hostile/evil-lora.safetensors"

ServiceFactory = Callable[..., AbstractContextManager[RunningService]]


def hostile_root(folder: Path, demo: DemoManifest) -> Path:
    """A model root with one real LoRA whose civitai sidecar holds script payloads."""
    target = folder / HOSTILE
    target.parent.mkdir(parents=True)
    # its own content (not a copy of the demo LoRA, which would be one model with two locations)
    from safetensors.torch import load_file, save_file

    save_file(load_file(demo.root / LORA), target, metadata={"ss_output_name": "evil-lora"})
    info = {
        "id": 1,
        "modelId": 2,
        "name": PAYLOADS["name"],
        "description": PAYLOADS["description"],
        "trainedWords": [PAYLOADS["trained"]],
        "model": {"name": PAYLOADS["name"], "type": "LORA", "tags": [PAYLOADS["tag"]]},
    }
    target.with_suffix(".civitai.info").write_text(json.dumps(info))
    return folder


@pytest.fixture(scope="module")
def make_service(tmp_path_factory: pytest.TempPathFactory, demo: DemoManifest) -> ServiceFactory:
    """``with make_service(**settings) as svc``: a service whose first scan has finished."""

    def make(**overrides: Any) -> AbstractContextManager[RunningService]:
        folder = tmp_path_factory.mktemp("web-service")
        settings = {"model_roots": [demo.root, hostile_root(folder / "extra", demo)], **overrides}
        return scanned_service(folder, **settings)

    return make


@pytest.fixture(scope="module")
def browser() -> Iterator[Browser]:
    with chromium() as b:
        yield b


class Watched:
    """A page whose script errors, dialogs and failed API calls are recorded (any one fails a test)."""

    def __init__(self, page: Page) -> None:
        self.page = page
        self.errors: list[str] = []
        self.console: list[str] = []
        self.dialogs: list[str] = []
        page.on("pageerror", lambda e: self.errors.append(str(e)))
        page.on("dialog", self._dialog)
        page.on("console", lambda m: self.console.append(m.text) if m.type == "error" else None)

    def _dialog(self, dialog: Any) -> None:
        self.dialogs.append(dialog.message)
        dialog.dismiss()

    def clean(self, console: bool = True) -> None:
        """No dialog, no script error; with ``console``, no error logged either (a failed request is one)."""
        assert self.dialogs == [], f"a dialog opened: {self.dialogs}"
        assert self.errors == [], f"script errors: {self.errors}"
        if console:
            assert self.console == [], f"console errors: {self.console}"


@pytest.fixture
def watched(browser: Browser) -> Iterator[Watched]:
    context = browser.new_context(viewport={"width": 1440, "height": 900})
    page = context.new_page()
    page.set_default_timeout(15_000)
    w = Watched(page)
    yield w
    context.close()


def open_live(w: Watched, url: str) -> Page:
    """Open ``url`` and wait until the event stream is connected (so no event is missed)."""
    w.page.goto(url)
    w.page.wait_for_selector('#live[data-state="live"]')
    return w.page
