"""The dashboard's library page over a 10,000-model registry: is paging still fast?

Generates 10,000 model files (``discovery.generate_library``: real demo headers, sparse data),
scans them into a registry, serves it (``scan_on_start`` off, one CPU worker not warmed) and
measures, side by side:
- the API answer the page asks for: ``GET /api/model?limit=50&offset=N`` at the first, a middle
  and the last page, sorted by name, and with a search; median and max of 20;
- in headless Chromium (``modelkeeper.testing.browser``), from the action to the new page drawn
  (timed in the page): the first page, "Next", a filter, a search.

Target: a page of the library drawn in under 100 ms at 10,000 models.

    python benchmarks/dashboard_library.py [--models 10000] [--out benchmarks/results/...txt]
"""

from __future__ import annotations

import argparse
import os
import platform
import statistics
import sys
import tempfile
import time
from pathlib import Path

import httpx

sys.path.insert(0, str(Path(__file__).parent))
from discovery import generate_library
from modelkeeper.discovery.scanner import Scanner
from modelkeeper.orchestrator import Settings
from modelkeeper.registry.store import Registry
from modelkeeper.testing import write_demo_models
from modelkeeper.testing.browser import chromium
from modelkeeper.testing.service import running_service

#: Runs in the page: do ``action``, resolve with the milliseconds until the pager says ``expected``.
TIMED = """async ([action, expected]) => {
  const pager = document.querySelector(".pager");
  const form = document.querySelector("form.filters");
  const t0 = performance.now();
  const done = new Promise((resolve) => {
    const obs = new MutationObserver(() => {
      const c = pager.querySelector(".count");
      if (c && c.textContent.includes(expected)) { obs.disconnect(); resolve(performance.now() - t0); }
    });
    obs.observe(pager, {childList: true, subtree: true, characterData: true});
  });
  const [kind, name, value] = action.split(":");
  if (kind === "next") pager.querySelector("button.next").click();
  else {
    form.elements[name].value = value;
    form.elements[name].dispatchEvent(new Event("change", {bubbles: true}));
  }
  return await done;
}"""


def api_rows(url: str, total: int, say: object) -> None:
    assert callable(say)
    cases = {
        "first page": {"limit": 50, "offset": 0},
        "middle page": {"limit": 50, "offset": total // 2},
        "last page": {"limit": 50, "offset": total - 50},
        "search 'sdxl'": {"limit": 50, "query": "sdxl"},
        "type=lora, by size desc": {"limit": 50, "type": "lora", "sort": "size", "descending": "true"},
        "base=sdxl (fits included)": {"limit": 50, "base": "sdxl"},
        "type=vae, base=sdxl": {"limit": 50, "type": "vae", "base": "sdxl"},
    }
    with httpx.Client(base_url=url, timeout=60) as c:
        for name, params in cases.items():
            times = []
            for _ in range(20):
                t = time.perf_counter()
                r = c.get("/api/model", params=params)
                times.append((time.perf_counter() - t) * 1000)
                r.raise_for_status()
            say(f"API  {name:<26} median {statistics.median(times):6.1f} ms  max {max(times):6.1f} ms  "
                f"({len(r.json()['items'])} of {r.json()['total']})")  # fmt: skip


def browser_rows(url: str, total: int, say: object) -> None:
    assert callable(say)
    with chromium() as browser:
        page = browser.new_page(viewport={"width": 1440, "height": 900})
        t = time.perf_counter()
        page.goto(f"{url}/#/library")
        page.wait_for_function("() => document.querySelector('.pager .count')?.textContent.includes(' of ')")
        say(
            f"page first library page (load, modules, first answer) {1000 * (time.perf_counter() - t):6.0f} ms"
        )
        lora_total = httpx.get(f"{url}/api/model", params={"type": "lora", "limit": 1}).json()["total"]
        steps = [
            ("next", f"51\u2013100 of {total}"),
            ("next", f"101\u2013150 of {total}"),
            ("set:type:lora", f" of {lora_total}"),
            ("set:type:", f" of {total}"),
            ("set:query:sdxl-lora-000", " of "),
        ]
        for action, expected in steps:
            time.sleep(0.3)  # past the page's refresh gap: the action starts a request at once
            ms = page.evaluate(TIMED, [action, expected])
            say(f"page {action:<26} drawn in {ms:6.1f} ms")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--models", type=int, default=10_000)
    parser.add_argument("--out", type=Path, default=None)
    args = parser.parse_args(argv)
    lines: list[str] = []

    def say(line: str = "") -> None:
        print(line, flush=True)
        lines.append(line)

    with tempfile.TemporaryDirectory(prefix="mk-lib-bench-") as tmp:
        work = Path(tmp)
        write_demo_models(work / "demo")
        t = time.perf_counter()
        generate_library(work / "library", args.models, work / "demo")
        registry = Registry.open(work / "registry.sqlite3")
        Scanner(registry, [work / "library"]).scan()
        registry.close()
        say(f"# dashboard_library  {time.strftime('%Y-%m-%d %H:%M:%S')}  {platform.node()}")
        say(f"# CPU: {platform.processor() or platform.machine()}, {os.cpu_count()} cores; "
            f"load average {os.getloadavg()[0]:.2f}; python {platform.python_version()}")  # fmt: skip
        say(f"# {args.models} models generated and scanned in {time.perf_counter() - t:.0f} s")
        settings = Settings(devices=["cpu"], model_roots=[work / "library"], db=work / "registry.sqlite3",
                            port=0, scan_on_start=False, hash_on_start=False, worker_warm=False)  # fmt: skip
        with running_service(settings) as svc:
            total = httpx.get(f"{svc.url}/api/model", params={"limit": 1}).json()["total"]
            say(f"# registry: {total} models")
            api_rows(svc.url, total, say)
            browser_rows(svc.url, total, say)
    if args.out:
        args.out.write_text("\n".join(lines) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
