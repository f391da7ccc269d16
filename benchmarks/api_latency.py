"""API latency benchmark: ``GET /api/model/status`` under 100 concurrent clients while loads run.

The service runs as its own process (``modelkeeper serve``, one CPU worker, the demo models); this
process plays 100 clients on one asyncio loop, each with its own keep-alive connection, speaking
bare HTTP/1.1 over asyncio streams (httpx itself tops out near 400 requests/s on 2 cores and
would measure itself). A third
party keeps the worker busy: a loop that loads and unloads the demo SDXL pipeline from disk
(RAM cache off) for the whole measurement, so the worker, the orchestrator's job and event paths
and the status endpoint all run at once.

Rows, each measured side by side in this one run:
- the anchor: ``GET /health/live`` (a constant answer: the floor of uvicorn + FastAPI + httpx here),
- ``GET /api/model/status``, idle and while loads run,
at each client pacing: every client polls at 2, 5 and 10 Hz (200, 500, 1,000 requests/s in all),
and closed loop (each client sends its next request when the previous answer arrives: saturation).
- ``GET /api/model/status`` while loads run with 5 dashboards open (``--dashboards``, in a process
  of their own, as browsers are; on this machine it shares the cores, so its CPU is reported):
  each is a tab on the devices page, doing what the page's scripts do (``_dashboard``: the event
  stream, the refetches it triggers through the page's refresher, the poll), over bare HTTP/1.1
  with each answer and event parsed, so the simulated tabs cost little CPU of their own. Their
  cost is the p99 change from the row above; ``--pairs N`` alternates N rows without and with
  them and compares the medians (background load on a shared machine drifts between rows).
Every row also reports the service process's CPU, and two last measurements resist a shared
machine's noise: the dashboards' cost without pollers (the service's CPU with the load loop
alone, then with the dashboards open), and the unit costs (the service's CPU for one event sent
on one stream, and for one status request; ``--unit-costs-only`` measures just these).
``--against OTHER/src`` compares this tree with another (a checkout of main) on one machine at
one time: both services run side by side, and rounds alternate between them measuring the
dashboards' cost without pollers and a status request's CPU (nothing else).

Target on a 2-core machine: p99 <= 10 ms with 100 concurrent clients while a load runs.

    python benchmarks/api_latency.py [--seconds 8] [--clients 100] [--dashboards 5] [--pairs 3] [--unit-costs-only]
        [--against ../main/src] [--out benchmarks/results/...txt]
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import multiprocessing
import os
import platform
import re
import shutil
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import httpx

MODEL = "diffusers/tiny-sdxl"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, max(0, round(q / 100 * len(ordered)) - 1))]


async def measure(
    url: str, path: str, clients: int, rate_hz: float | None, seconds: float, pid: int
) -> dict[str, float]:
    """Latencies (ms) of ``clients`` concurrent pollers of ``path``; ``rate_hz`` None is closed loop.
    Also the CPU the service (process ``pid``) and this client used, in shares of one core."""
    latencies: list[float] = []
    errors = 0
    host, port = url.removeprefix("http://").split(":")
    get = _http_get(request_bytes(url, path))
    conns = [await asyncio.open_connection(host, int(port)) for _ in range(clients)]
    await asyncio.gather(*(get(r, w) for r, w in conns))  # connected and warm before the clock starts
    end = time.perf_counter() + seconds
    period = 1.0 / rate_hz if rate_hz else 0.0

    async def one(i: int, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        nonlocal errors
        nxt = time.perf_counter() + (i / clients) * period  # spread the first requests
        while True:
            if period:
                delay = nxt - time.perf_counter()
                if delay > 0:
                    await asyncio.sleep(delay)
                nxt += period
            t0 = time.perf_counter()
            if t0 >= end:
                return
            status, _ = await get(reader, writer)
            latencies.append((time.perf_counter() - t0) * 1000)
            if status != 200:
                errors += 1

    started, server0, client0 = time.perf_counter(), cpu_seconds(pid), time.process_time()
    await asyncio.gather(*(one(i, r, w) for i, (r, w) in enumerate(conns)))
    wall = time.perf_counter() - started
    server, client = cpu_seconds(pid) - server0, time.process_time() - client0
    for _, w in conns:
        w.close()
    return {
        "requests": len(latencies),
        "rps": len(latencies) / wall,
        "p50": statistics.median(latencies),
        "p90": percentile(latencies, 90),
        "p99": percentile(latencies, 99),
        "max": max(latencies),
        "errors": errors,
        "server_cpu": server / wall,
        "client_cpu": client / wall,
    }


class LoadLoop:
    """Loads and unloads MODEL back to back in a thread until stopped; counts loads."""

    def __init__(self, url: str) -> None:
        self.url = url
        self.loads = 0
        self.seconds: list[float] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        with httpx.Client(base_url=self.url, timeout=120) as c:
            while not self._stop.is_set():
                t0 = time.perf_counter()
                r = c.post(f"/api/model/{MODEL}/load", json={})
                r.raise_for_status()
                self.seconds.append(time.perf_counter() - t0)
                self.loads += 1
                c.post(f"/api/model/{MODEL}/unload", json={}).raise_for_status()

    def __enter__(self) -> LoadLoop:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join(120)


def _http_get(request: bytes) -> Any:
    """A keep-alive HTTP/1.1 GET over asyncio streams, answer read whole (status, body): a client
    too thin to be the bottleneck (httpx costs ~1 ms of CPU a request here)."""

    async def get(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> tuple[int, bytes]:
        writer.write(request)
        head = await reader.readuntil(b"\r\n\r\n")
        length = next(
            int(h.split(b":")[1]) for h in head.split(b"\r\n") if h.lower().startswith(b"content-length")
        )
        return int(head.split(b" ", 2)[1]), await reader.readexactly(length)

    return get


def request_bytes(url: str, path: str, accept: str = "application/json") -> bytes:
    host = url.removeprefix("http://")
    return f"GET {path} HTTP/1.1\r\nHost: {host}\r\nAccept: {accept}\r\n\r\n".encode()


# What the devices page does, read from its scripts (so the simulated tabs cannot drift from them):
STATIC = Path(__file__).resolve().parents[1] / "src/modelkeeper/web/static"


def _from_script(name: str, pattern: str) -> str:
    found = re.search(pattern, (STATIC / name).read_text())
    if found is None:
        raise RuntimeError(f"{STATIC / name}: {pattern!r} not found; update the benchmark's reading of it")
    return found.group(1)


EVENTS_PATH = _from_script("app.js", r'const EVENTS = "([^"]+)"')  # one stream for every view
GAP_S = 0.25  # devices.js: refresher(..., 250, ...): at most one refresh per 250 ms, never two at once
SETTLE_S = int(_from_script("devices.js", r"const SETTLE_MS = (\d+);")) / 1000  # a kick waits this long
POLL_S = (
    int(_from_script("devices.js", r"const POLL_MS = (\d+);")) / 1000
)  # refetch after this long without one
REFETCH = re.compile(_from_script("devices.js", r"const REFETCH = /(.+)/;"))  # the events that refetch


class Refresher:
    """dom.js ``refresher()``: ``load`` at most once per ``gap`` s, never two at once, once more
    after the last kick, a kick waiting ``settle`` s (the tab is visible: loads are not deferred)."""

    def __init__(self, load: Any, gap: float, settle: float) -> None:
        self._load, self._gap, self._settle = load, gap, settle
        self._running = self._pending = False
        self._last = -1e9
        self._timer: asyncio.TimerHandle | None = None

    def kick(self) -> None:
        if self._running:
            self._pending = True
        else:
            self._schedule()

    def _schedule(self) -> None:
        if self._timer is None:
            loop = asyncio.get_running_loop()
            self._timer = loop.call_later(max(self._settle, self._last + self._gap - loop.time()), self._run)

    def _run(self) -> None:
        self._timer = None
        if self._running:
            self._pending = True
            return
        self._pending, self._running = False, True
        self._last = asyncio.get_running_loop().time()
        asyncio.get_running_loop().create_task(self._go())

    async def _go(self) -> None:
        try:
            await self._load()
        finally:
            self._running = False
            if self._pending:
                self._schedule()

    def stop(self) -> None:
        if self._timer is not None:
            self._timer.cancel()


async def read_events(reader: asyncio.StreamReader, on_event: Any) -> None:
    """Server-Sent Events from a chunked HTTP/1.1 answer: each event's type and parsed JSON data
    to ``on_event`` (what api.js EventStream does: split on blank lines, JSON.parse the data)."""
    head = await reader.readuntil(b"\r\n\r\n")
    if not head.startswith(b"HTTP/1.1 200"):
        raise RuntimeError(f"the event stream answered {head[:40]!r}")
    buffer = b""
    while True:
        size = int((await reader.readuntil(b"\r\n")).strip(), 16)
        if size == 0:
            return
        buffer += (await reader.readexactly(size + 2))[:-2]
        *blocks, buffer = buffer.split(b"\n\n")
        for block in blocks:
            kind, data = "message", []
            for line in block.split(b"\n"):
                if line.startswith(b"event:"):
                    kind = line[6:].strip().decode()
                elif line.startswith(b"data:"):
                    data.append(line[5:].strip())
            if data:
                on_event(kind, json.loads(b"\n".join(data)))


class Connection:
    """A browser's keep-alive connection to the service: reopened when the service has closed it
    (uvicorn closes one idle for 5 s), as a browser does."""

    def __init__(self, url: str) -> None:
        self.host, port = url.removeprefix("http://").split(":")
        self.port = int(port)
        self.streams: tuple[asyncio.StreamReader, asyncio.StreamWriter] | None = None

    async def get(self, request: bytes) -> tuple[int, bytes]:
        for attempt in (1, 2):
            if self.streams is None:
                self.streams = await asyncio.open_connection(self.host, self.port)
            try:
                return await _http_get(request)(*self.streams)
            except (asyncio.IncompleteReadError, ConnectionError):
                self.close()
                if attempt == 2:
                    raise
        raise AssertionError("unreachable")

    def close(self) -> None:
        if self.streams is not None:
            self.streams[1].close()
            self.streams = None


async def _dashboard(url: str, counts: Any) -> None:
    """One browser tab on the devices page: the event stream open, ``/api/model/status`` (and
    ``/api/leases`` when a model holds one) refetched on the events the page reacts to, through
    the page's refresher, and when POLL_S pass without a refetch; each answer parsed as the page
    parses it."""
    host, port = url.removeprefix("http://").split(":")
    stream = await asyncio.open_connection(host, int(port))
    api = Connection(url)
    status_request = request_bytes(url, "/api/model/status")
    leases_request = request_bytes(url, "/api/leases")

    poll: asyncio.TimerHandle | None = None

    async def load() -> None:
        nonlocal poll
        if poll is not None:
            poll.cancel()
        try:
            await draw()
        finally:
            poll = asyncio.get_running_loop().call_later(POLL_S, refresh.kick)

    async def draw() -> None:
        code, body = await api.get(status_request)
        if code != 200:
            raise RuntimeError(f"status answered {code}")
        status = json.loads(body)
        with counts.get_lock():
            counts[0] += 1
        if any(m.get("leases") for d in status["devices"] for m in d["models"]):
            json.loads((await api.get(leases_request))[1])
            with counts.get_lock():
                counts[0] += 1

    refresh = Refresher(load, GAP_S, SETTLE_S)

    def on_event(kind: str, data: Any) -> None:
        with counts.get_lock():
            counts[1] += 1
        if kind == "hello" or REFETCH.search(kind):  # hello: app.js refreshes the view once live
            refresh.kick()

    stream[1].write(request_bytes(url, EVENTS_PATH, "text/event-stream"))
    refresh.kick()  # mount
    try:
        await read_events(stream[0], on_event)
    finally:
        refresh.stop()
        if poll is not None:
            poll.cancel()
        stream[1].close()
        api.close()


def _dashboards_process(url: str, count: int, ready: Any, stop: Any, counts: Any) -> None:
    async def main() -> None:
        tasks = [asyncio.create_task(_dashboard(url, counts)) for _ in range(count)]
        await asyncio.sleep(0.5)  # every stream subscribed and the pages drawn before the clock starts
        with counts.get_lock():
            counts[0] = counts[1] = 0
        cpu = sum(os.times()[:2])
        ready.set()
        await asyncio.get_running_loop().run_in_executor(None, stop.wait)
        counts[2] = sum(os.times()[:2]) - cpu
        for t in tasks:
            t.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)

    asyncio.run(main())


class Dashboards:
    """``count`` browser tabs on the devices page, in a process of their own (browsers are: they
    must not share the measuring client's interpreter; on this machine they do share its cores,
    so their CPU time is counted and reported). Counts what they did."""

    def __init__(self, url: str, count: int) -> None:
        ctx = multiprocessing.get_context("spawn")
        self._ready, self._stop = ctx.Event(), ctx.Event()
        self._counts = ctx.Array("d", 3)  # requests, events, CPU seconds from ready to stop
        self._proc = ctx.Process(
            target=_dashboards_process, args=(url, count, self._ready, self._stop, self._counts), daemon=True
        )

    @property
    def requests(self) -> int:
        return int(self._counts[0])

    @property
    def events(self) -> int:
        return int(self._counts[1])

    @property
    def cpu_seconds(self) -> float:
        return float(self._counts[2])

    def __enter__(self) -> Dashboards:
        self._proc.start()
        if not self._ready.wait(60):
            raise TimeoutError("the dashboards did not start")
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._proc.join(30)


def cpu_seconds(pid: int) -> float:
    """User + system CPU time of process ``pid`` (all its threads) so far."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def serve(models: Path, work: Path, src: Path | None = None) -> tuple[subprocess.Popen[bytes], str]:
    """``modelkeeper serve`` over ``models``, once ready; ``src``: run the package of that folder
    (another tree's ``src``) instead of the one this process imports."""
    port = free_port()
    path = os.environ.get("PYTHONPATH", "")
    env = {
        **os.environ,
        "PYTHONPATH": f"{src}{os.pathsep}{path}" if src else path,
        "MODELKEEPER_HASH_ON_START": "false",
        "MODELKEEPER_CACHE_LOADS": "false",  # every load reads from disk: the worker stays busy
        "MODELKEEPER_DEVICES": '["cpu"]',
    }
    cmd = [sys.executable, "-m", "modelkeeper", "serve", "--models", str(models), "--port", str(port),
           "--db", str(work / "registry.sqlite3")]  # fmt: skip
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.DEVNULL, stderr=(work / "serve.log").open("wb"))
    url = f"http://127.0.0.1:{port}"
    end = time.monotonic() + 180
    answer: httpx.Response | None = None
    while time.monotonic() < end:
        try:
            answer = httpx.get(f"{url}/health/ready")
        except httpx.HTTPError:
            answer = None
        if answer is not None and answer.status_code == 200:
            return proc, url
        if proc.poll() is not None:
            raise RuntimeError((work / "serve.log").read_text())
        time.sleep(0.2)
    raise TimeoutError(f"the service did not get ready in 180 s: {answer.text if answer else 'no answer'}")


def check_ready(url: str) -> None:
    """Ready means the first scan registered the roots: the benchmark's model is known (a 404
    here once broke the load loop right after ready). A failed first scan is ready too: say why."""
    scan = httpx.get(f"{url}/health/ready").json()["scan"]
    if scan["state"] == "failed":
        raise RuntimeError(f"the service's first scan failed: {scan['error']}")
    found = httpx.get(f"{url}/api/model/{MODEL}")
    if found.status_code != 200:
        raise RuntimeError(f"{MODEL} is not known once ready: {found.status_code} {found.text[:300]}")


async def unit_costs(url: str, pid: int, streams: int = 50, events: int = 300) -> dict[str, float]:
    """The service's CPU for one event sent on one stream (``events`` metadata edits, each one
    ``model.metadata`` event, with ``streams`` of the page's event streams open against none) and
    for one ``GET /api/model/status``; in microseconds."""
    host, port = url.removeprefix("http://").split(":")
    model = httpx.get(f"{url}/api/model", params={"limit": 1}).json()["items"][0]["id"]
    body = b'{"description": "dashboard cost"}'
    edit = _http_get(
        f"PUT /api/model/{model}/metadata HTTP/1.1\r\nHost: {host}:{port}\r\nContent-Type: application/json\r\n"
        f"Content-Length: {len(body)}\r\n\r\n".encode()
        + body
    )

    async def drain(reader: asyncio.StreamReader) -> None:
        while await reader.read(65536):
            pass

    async def edits(count: int) -> float:
        conns = [await asyncio.open_connection(host, int(port)) for _ in range(count)]
        for _, w in conns:
            w.write(request_bytes(url, EVENTS_PATH, "text/event-stream"))
        readers = [asyncio.create_task(drain(r)) for r, _ in conns]
        api = await asyncio.open_connection(host, int(port))
        await edit(*api)
        await asyncio.sleep(0.5)  # subscribed, the warm-up edit sent
        cpu = cpu_seconds(pid)
        for _ in range(events):
            code, answer = await edit(*api)
            if code != 200:
                raise RuntimeError(f"a metadata edit answered {code}: {answer[:200]!r}")
        await asyncio.sleep(0.5)  # the last events sent
        cpu = cpu_seconds(pid) - cpu
        for t in readers:
            t.cancel()
        for _, w in [*conns, api]:
            w.close()
        return cpu

    alone, watched = await edits(0), await edits(streams)
    t0 = time.perf_counter()
    status = await status_cost(url, pid, events)
    return {
        "event": 1e6 * (watched - alone) / (events * streams),
        "status": status,
        "status_wall": 1e3 * (time.perf_counter() - t0) / (2 * events),  # half of it the idle wait
    }


def report_unit_costs(say: Any, url: str, pid: int, runs: int) -> None:
    costs = [asyncio.run(unit_costs(url, pid)) for _ in range(runs)]
    say(
        f"  unit costs (service CPU, median of {runs}): one event on one stream "
        f"{statistics.median(c['event'] for c in costs):.0f} us ({joined(c['event'] for c in costs)}), "
        f"one status request {statistics.median(c['status'] for c in costs):.0f} us "
        f"({joined(c['status'] for c in costs)}; the service's idle CPU over as long subtracted: one "
        f"request after the other took {statistics.median(c['status_wall'] for c in costs):.1f} ms each); "
        "300 metadata edits with 50 streams open against none"
    )


def joined(values: Iterable[float]) -> str:
    return ", ".join(f"{v:.1f}" for v in values)


def quiet_cost(url: str, pid: int, dashboards: int, seconds: float) -> dict[str, float]:
    """The service's CPU (share of a core) over ``seconds`` while the load loop runs and no poller
    does, with ``dashboards`` open (0: none): the dashboards' own cost, away from 100 pollers."""
    with (
        LoadLoop(url) as loop,
        Dashboards(url, dashboards) if dashboards else contextlib.nullcontext() as dash,
    ):
        t0, cpu0 = time.perf_counter(), cpu_seconds(pid)
        time.sleep(seconds)
        wall, cpu = time.perf_counter() - t0, cpu_seconds(pid) - cpu0
    out = {"server_cpu": cpu / wall, "loads": loop.loads / wall}
    if isinstance(dash, Dashboards):
        out |= {
            "client_cpu": dash.cpu_seconds / wall,
            "requests": dash.requests / wall,
            "events": dash.events / wall,
        }
    return out


def compare(say: Any, ours: tuple[int, str], theirs: tuple[int, str], against: Path, dashboards: int,
            rounds: int, seconds: float) -> None:  # fmt: skip
    """This tree's service and ``against``'s side by side, in rounds alternating their order: the
    service's CPU with the load loop alone and with the dashboards open, and for one status
    request (the shared machine's drift falls on both alike)."""
    services = {"this tree": ours, str(against): theirs}
    seen: dict[str, list[tuple[float, float]]] = {name: [] for name in services}
    for i in range(rounds):
        for name in list(services)[:: 1 if i % 2 == 0 else -1]:
            pid, url = services[name]
            base, dash = quiet_cost(url, pid, 0, seconds), quiet_cost(url, pid, dashboards, seconds)
            status = asyncio.run(status_cost(url, pid))
            seen[name].append((1000 * (dash["server_cpu"] - base["server_cpu"]) / dashboards, status))
            say(
                f"  round {i + 1}, {name}: the load loop {100 * base['server_cpu']:.1f}% of a core, with "
                f"{dashboards} dashboards {100 * dash['server_cpu']:.1f}% ({seen[name][-1][0]:.2f} ms of CPU per "
                f"second per dashboard; {dash['loads']:.2f} loads/s, {dash['requests']:.1f} requests/s, "
                f"{dash['events']:.1f} events/s); one status request {status:.0f} us"
            )
    for name, costs in seen.items():
        say(
            f"{name}: a dashboard {statistics.median(c[0] for c in costs):.2f} ms of CPU per second "
            f"(median of {rounds}: {joined(c[0] for c in costs)}), a status request "
            f"{statistics.median(c[1] for c in costs):.0f} us ({joined(c[1] for c in costs)})"
        )


async def status_cost(url: str, pid: int, requests: int = 100) -> float:
    """The service's CPU for one ``GET /api/model/status`` (us), its idle CPU over as long subtracted."""
    host, port = url.removeprefix("http://").split(":")
    get = _http_get(request_bytes(url, "/api/model/status"))
    api = await asyncio.open_connection(host, int(port))
    await get(*api)
    cpu, t0 = cpu_seconds(pid), time.perf_counter()
    for _ in range(requests):
        await get(*api)
    cpu, wall = cpu_seconds(pid) - cpu, time.perf_counter() - t0
    api[1].close()
    idle = cpu_seconds(pid)
    await asyncio.sleep(wall)
    return 1e6 * (cpu - (cpu_seconds(pid) - idle)) / requests


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--seconds", type=float, default=8.0, help="length of each measurement")
    parser.add_argument("--clients", type=int, default=100)
    parser.add_argument("--rates", default="2,5,10", help="per-client polling rates in Hz")
    parser.add_argument(
        "--dashboards", type=int, default=5, help="dashboards open in the last row (0: no row)"
    )
    parser.add_argument(
        "--pairs", type=int, default=1, help="rows without and with the dashboards, alternated"
    )
    parser.add_argument(
        "--unit-costs-only",
        action="store_true",
        help="only the cost of an event on a stream and of a status request",
    )
    parser.add_argument(
        "--against",
        type=Path,
        default=None,
        help="the src folder of another tree (a checkout of main): only the dashboards' cost and a "
        "status request's, of both services side by side, in --pairs rounds of --seconds",
    )
    parser.add_argument("--out", type=Path, default=None, help="also write the report to this file")
    args = parser.parse_args(argv)
    lines: list[str] = []

    def say(line: str = "") -> None:
        print(line, flush=True)
        lines.append(line)

    work = Path(tempfile.mkdtemp(prefix="mk-api-bench-"))
    from modelkeeper.testing import write_demo_models

    write_demo_models(work / "models")
    proc, url = serve(work / "models", work)
    pid = proc.pid

    def row(path: str, rate: float | None) -> dict[str, float]:
        return asyncio.run(measure(url, path, args.clients, rate, args.seconds, pid))

    try:
        check_ready(url)
        with httpx.Client(base_url=url, timeout=120) as c:  # warm the worker: first load imports diffusers
            c.post(f"/api/model/{MODEL}/load", json={}).raise_for_status()
            c.post(f"/api/model/{MODEL}/unload", json={}).raise_for_status()
        say(f"# api_latency  {time.strftime('%Y-%m-%d %H:%M:%S')}  {platform.node()}")
        say(
            f"# CPU: {platform.processor() or platform.machine()}, {os.cpu_count()} cores; python {platform.python_version()}; "
            f"load average {' '.join(f'{x:.2f}' for x in os.getloadavg())} (1/5/15 min; other work shares these cores)"
        )
        say(
            f"# {args.clients} concurrent clients, {args.seconds:g} s per row; load loop: {MODEL} from disk; "
            "srv CPU: the service's process, in % of one core"
        )
        say()
        if args.unit_costs_only:
            report_unit_costs(say, url, pid, args.pairs)
            return 0
        if args.against:
            (work / "against").mkdir()
            other, other_url = serve(work / "models", work / "against", args.against.resolve())
            try:
                check_ready(other_url)
                with httpx.Client(base_url=other_url, timeout=120) as c:  # warm its worker too
                    c.post(f"/api/model/{MODEL}/load", json={}).raise_for_status()
                    c.post(f"/api/model/{MODEL}/unload", json={}).raise_for_status()
                compare(say, (pid, url), (other.pid, other_url), args.against, args.dashboards, args.pairs,
                        max(args.seconds, 10.0))  # fmt: skip
            finally:
                other.terminate()
                other.wait(60)
            say(f"# load average at the end {' '.join(f'{x:.2f}' for x in os.getloadavg())}")
            return 0
        header = f"{'endpoint':<20} {'condition':<12} {'pacing':<12} {'req/s':>7} {'p50 ms':>7} {'p90 ms':>7} {'p99 ms':>7} {'max ms':>7} {'p99/anchor':>10} {'srv CPU':>8} {'loads':>6}"
        say(header)
        say("-" * len(header))
        rates: list[float | None] = [float(r) for r in args.rates.split(",")] + [None]
        dashboard_notes: list[str] = []
        for rate in rates:
            pacing = f"{rate:g} Hz each" if rate else "closed loop"
            anchor = row("/health/live", rate)
            idle = row("/api/model/status", rate)
            with LoadLoop(url) as loop:
                busy = row("/api/model/status", rate)
            rows = [
                ("/health/live", "idle", anchor, None),
                ("/api/model/status", "idle", idle, None),
                ("/api/model/status", "loading", busy, loop.loads),
            ]
            if args.dashboards:
                # Pairs without and with the dashboards, alternated (--pairs): on a shared machine
                # the background load drifts between rows; the medians of the pairs resist it.
                without, with_ = [busy], []
                dash_cpu: list[float] = []
                for i in range(args.pairs):
                    if i:
                        with LoadLoop(url):
                            without.append(row("/api/model/status", rate))
                    with LoadLoop(url) as dloop, Dashboards(url, args.dashboards) as dash:
                        seen = row("/api/model/status", rate)
                    with_.append(seen)
                    dash_cpu.append(dash.cpu_seconds / args.seconds)
                    if i == 0:
                        rows.append(("/api/model/status", f"load+{args.dashboards}dash", seen, dloop.loads))

                def med(runs: list[dict[str, float]], key: str) -> float:
                    return statistics.median(r[key] for r in runs)

                before, after = med(without, "p99"), med(with_, "p99")
                dashboard_notes.append(
                    f"{pacing}: p99 {before:.2f} -> {after:.2f} ms ({100 * (after / before - 1):+.0f}%), median of "
                    f"{len(without)} alternated pairs (without: {joined(r['p99'] for r in without)}; "
                    f"with: {joined(r['p99'] for r in with_)}); service CPU {100 * med(without, 'server_cpu'):.0f}% "
                    f"-> {100 * med(with_, 'server_cpu'):.0f}% of a core; the dashboards' process used "
                    f"{100 * statistics.median(dash_cpu):.1f}% of a core, the measuring client "
                    f"{100 * med(with_, 'client_cpu'):.0f}%; the dashboards of the last pair made {dash.requests} "
                    f"requests and received {dash.events} events"
                )
            for name, cond, r, loads in rows:
                ratio = r["p99"] / anchor["p99"]
                say(f"{name:<20} {cond:<12} {pacing:<12} {r['rps']:>7.0f} {r['p50']:>7.2f} {r['p90']:>7.2f} "
                    f"{r['p99']:>7.2f} {r['max']:>7.1f} {ratio:>9.2f}x {100 * r['server_cpu']:>7.0f}% "
                    f"{loads if loads is not None else '':>6}")  # fmt: skip
                if r["errors"]:
                    say(f"   {r['errors']} non-200 answers")
        say()
        say("Target: p99 <= 10 ms for GET /api/model/status with 100 concurrent clients while a load runs.")
        if dashboard_notes:
            say(f"{args.dashboards} dashboards open (target: p99 moves by at most 10%):")
            for note in dashboard_notes:
                say(f"  {note}")
            quiet_s = max(args.seconds, 10.0)  # CPU time comes in 10 ms ticks
            quiet = [(quiet_cost(url, pid, 0, quiet_s), quiet_cost(url, pid, args.dashboards, quiet_s))
                     for _ in range(args.pairs)]  # fmt: skip
            base = statistics.median(a["server_cpu"] for a, _ in quiet)
            dash_on = statistics.median(b["server_cpu"] for _, b in quiet)
            say(
                f"  no pollers, the load loop running ({statistics.median(a['loads'] for a, _ in quiet):.1f} loads/s): "
                f"service CPU {100 * base:.1f}% -> {100 * dash_on:.1f}% of a core with the dashboards, "
                f"{1000 * (dash_on - base) / args.dashboards:.1f} ms of CPU per second per dashboard (median of "
                f"{args.pairs}: without {joined(100 * a['server_cpu'] for a, _ in quiet)}; with "
                f"{joined(100 * b['server_cpu'] for _, b in quiet)}); the {args.dashboards} made "
                f"{statistics.median(b['requests'] for _, b in quiet):.1f} requests/s and received "
                f"{statistics.median(b['events'] for _, b in quiet):.1f} events/s, their process used "
                f"{100 * statistics.median(b['client_cpu'] for _, b in quiet):.1f}% of a core"
            )
            report_unit_costs(say, url, pid, args.pairs)
        say(f"# load average at the end {' '.join(f'{x:.2f}' for x in os.getloadavg())}")
    finally:
        proc.terminate()
        proc.wait(60)
        shutil.rmtree(work, ignore_errors=True)
        if args.out:
            args.out.write_text("\n".join(lines) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
