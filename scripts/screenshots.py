"""Screenshots of every dashboard page at 1440x900, for the README: ``docs/img/dashboard-*.png``.

Serves the demo models (a CPU worker), gives the pages something to show (loads, a validation,
benchmarks, a LoRA, a cached model), then photographs each page in headless Chromium, the same
Playwright setup the tests use (``modelkeeper.testing.browser``).

    python scripts/screenshots.py [--out docs/img]
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

from modelkeeper.client import Client
from modelkeeper.orchestrator import Settings
from modelkeeper.testing import write_demo_models
from modelkeeper.testing.browser import chromium
from modelkeeper.testing.service import running_service

SD15 = "diffusers/tiny-sd15"
SDXL = "diffusers/tiny-sdxl"
LORA = "loras/tiny-sd15-kohya.safetensors"


def stage(c: Client) -> str:
    """Some history: loads from disk and from the RAM cache, a validation, benchmarks, a LoRA."""
    for job in c.jobs(kind="scan"):
        c.wait_job(job["id"], timeout=300)
    mid = str(c.model(SD15)["id"])
    c.load(mid)
    c.unload(mid)
    c.load(mid)
    c.set_metadata(mid, tags=["demo", "sd1.5"], description="A tiny SD1.5 pipeline.")
    c.validate(mid, level="weights")
    for _ in range(2):
        c.benchmark(mid, steps=3, warmup=1)
    c.apply_lora(mid, str(c.model(LORA)["id"]), strength=0.8)
    c.load(SDXL)
    c.lease(mid, holder="my-pipeline", ttl=600)
    return mid


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--out", type=Path, default=Path("docs/img"))
    args = parser.parse_args(argv)
    args.out.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix="mk-shots-") as tmp:
        work = Path(tmp)
        write_demo_models(work / "models")
        settings = Settings(devices=["cpu"], model_roots=[work / "models"], db=work / "registry.sqlite3", port=0,
                            ram_cache_bytes=1 << 30)  # fmt: skip
        with running_service(settings) as svc, Client(svc.url) as c, chromium() as browser:
            mid = stage(c)
            page = browser.new_page(viewport={"width": 1440, "height": 900})
            pages = {"devices": "#/", "cache": "#/cache", "jobs": "#/jobs", "library": "#/library",
                     "model": f"#/model/{mid}"}  # fmt: skip
            for name, route in pages.items():
                page.goto(f"{svc.url}/{route}")
                page.wait_for_selector('#live[data-state="live"]')
                page.wait_for_selector("main .card")
                time.sleep(0.5)  # the view's first answers rendered
                path = args.out / f"dashboard-{name}.png"
                page.screenshot(path=str(path))
                print(path)
    return 0


if __name__ == "__main__":
    sys.exit(main())
