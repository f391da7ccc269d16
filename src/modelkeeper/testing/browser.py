"""A real headless browser for the dashboard's tests and screenshots: Playwright driving the
system's Chromium (Debian's ``chromium`` package; Playwright's own browser download is not used).

``with chromium() as browser: page = browser.new_page(); page.goto(svc.url)``
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from playwright.sync_api import Browser

#: Where Debian's package puts the binary (``/usr/bin/chromium`` is a shell wrapper around it).
DEFAULT_CHROMIUM = "/usr/lib/chromium/chromium"
ARGS = ["--disable-dev-shm-usage", "--disable-gpu"]


def chromium_path() -> str:
    """The Chromium binary: ``$MODELKEEPER_CHROMIUM`` or Debian's; a clear error when absent."""
    path = os.environ.get("MODELKEEPER_CHROMIUM", DEFAULT_CHROMIUM)
    if not Path(path).is_file():
        raise FileNotFoundError(
            f"{path}: no Chromium binary (apt-get install chromium, or set MODELKEEPER_CHROMIUM)"
        )
    return path


@contextmanager
def chromium() -> Iterator[Browser]:
    """A headless Chromium for the block (the sync API: call it outside any running event loop)."""
    from playwright.sync_api import sync_playwright

    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=chromium_path(), args=ARGS)
        try:
            yield browser
        finally:
            browser.close()
