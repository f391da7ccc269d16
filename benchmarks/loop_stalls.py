"""Event-loop stalls of the service while models load: who held the loop, or whether nobody did.

The service runs in this process (uvicorn, the API app, one CPU worker subprocess, the demo
models); a second process loads and unloads the demo SDXL pipeline back to back (from disk, or
from the RAM cache with ``--cache``) and polls ``GET /api/model/status`` from 20 clients at 10 Hz
each. Two instruments watch the loop:

- a heartbeat coroutine (every 2 ms) and a watchdog thread: when the heartbeat is more than 10 ms
  late, the watchdog samples the loop thread's stack, and at the end of the stall it reads the CPU
  time each of the service's threads, the worker process and the whole machine used meanwhile
  (``/proc``). A stall the loop's own code caused shows the loop thread busy for about its length;
  one another thread caused (the GIL) shows that thread busy; one the machine caused (other
  processes on the cores, the VM's steal) shows the service's threads idle;
- every callback the loop runs is timed in the loop thread's CPU time (not wall time, which the
  machine's load inflates): those over 1 ms are listed by coroutine.

    python benchmarks/loop_stalls.py [--seconds 12] [--cache] [--out benchmarks/results/...txt]
"""

from __future__ import annotations

import argparse
import asyncio
import asyncio.events
import collections
import os
import platform
import subprocess
import sys
import tempfile
import threading
import time
import traceback
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import psutil

HERE = Path(__file__).resolve().parent
BEAT_S = 0.002  # the heartbeat's period
LATE_S = 0.010  # a stall: the heartbeat this late


@dataclass
class Stall:
    late: float = 0.0
    stacks: list[str] = field(default_factory=list)
    cpu_before: dict[str, float] = field(default_factory=dict)
    started: float = 0.0
    cpu: dict[str, float] = field(default_factory=dict)  # ms each party used during the stall
    wall: float = 0.0


def cpu_times() -> dict[str, float]:
    """CPU seconds so far: each thread of this process, its children (the worker; the clients'
    process, which loads and polls), the machine's busy time."""
    out: dict[str, float] = {}
    names = {t.native_id: t.name for t in threading.enumerate()}
    for tid in os.listdir("/proc/self/task"):
        try:
            ns = int(Path(f"/proc/self/task/{tid}/schedstat").read_text().split()[0])
        except OSError:
            continue
        out[names.get(int(tid), f"thread {tid}")] = ns / 1e9
    for child in psutil.Process().children(recursive=True):
        try:
            t = child.cpu_times()
            role = "the clients" if "-c" in child.cmdline() else "the worker"
            out[f"{role} ({child.pid})"] = t.user + t.system
        except psutil.Error:
            pass
    fields = [int(x) for x in Path("/proc/stat").read_text().split("\n", 1)[0].split()[1:9]]
    busy = sum(fields) - fields[3] - fields[4]  # all but idle and iowait; steal included
    out["machine (every process)"] = busy / os.sysconf("SC_CLK_TCK")
    return out


class Watch:
    """The heartbeat's lateness, the loop thread's stacks during stalls, callbacks' CPU."""

    def __init__(self) -> None:
        self.beat = time.perf_counter()
        self.loop_thread = threading.get_ident()
        self.stalls: list[Stall] = []
        self.callbacks: collections.Counter[str] = collections.Counter()
        self.callback_max: dict[str, float] = {}
        self._stop = threading.Event()

    def reset(self) -> None:
        self.stalls.clear()
        self.callbacks.clear()
        self.callback_max.clear()

    async def heartbeat(self) -> None:
        while True:
            self.beat = time.perf_counter()
            await asyncio.sleep(BEAT_S)

    def watchdog(self) -> None:
        current: Stall | None = None
        while not self._stop.is_set():
            time.sleep(BEAT_S)
            late = time.perf_counter() - self.beat
            if late > LATE_S:
                if current is None:
                    current = Stall(cpu_before=cpu_times(), started=time.perf_counter() - late)
                current.late = max(current.late, late)
                frame = sys._current_frames().get(self.loop_thread)
                stack = traceback.extract_stack(frame)[-8:] if frame is not None else []
                current.stacks.append(
                    " <- ".join(f"{Path(f.filename).name}:{f.lineno}:{f.name}" for f in reversed(stack))
                )
            elif current is not None:
                after = cpu_times()
                current.cpu = {
                    k: 1000 * (after[k] - v) for k, v in current.cpu_before.items() if after.get(k, v) > v
                }
                current.wall = 1000 * (time.perf_counter() - current.started)
                self.stalls.append(current)
                current = None

    def time_callbacks(self) -> None:
        """Every loop callback timed in the loop thread's CPU time; those over 1 ms counted."""
        run = asyncio.events.Handle._run
        watch = self

        def timed(handle: asyncio.events.Handle) -> None:
            owner = getattr(handle._callback, "__self__", None)  # type: ignore[attr-defined]
            where = repr(handle._callback)[:120]  # type: ignore[attr-defined]
            if isinstance(owner, asyncio.Task):
                coro: Any = owner.get_coro()
                frame = getattr(coro, "cr_frame", None)
                where = getattr(coro, "__qualname__", str(coro))
                if frame is not None:
                    scope = getattr(frame.f_locals.get("self"), "scope", None)
                    if isinstance(scope, dict):
                        where += f" {scope.get('method', '')} {scope.get('path', '')}"
            t0 = time.thread_time()
            run(handle)
            spent = time.thread_time() - t0
            if spent > 0.001:
                watch.callbacks[where] += 1
                watch.callback_max[where] = max(watch.callback_max.get(where, 0.0), spent * 1000)

        asyncio.events.Handle._run = timed  # type: ignore[method-assign,assignment]

    def stop(self) -> None:
        self._stop.set()


DRIVER = """
import asyncio, sys, httpx
sys.path.insert(0, {here!r})
import api_latency as b
url = {url!r}
with httpx.Client(base_url=url, timeout=120) as c:  # the first load imports diffusers in the worker
    c.post(f"/api/model/{{b.MODEL}}/load", json={{}}).raise_for_status()
    c.post(f"/api/model/{{b.MODEL}}/unload", json={{}}).raise_for_status()
print("warm", flush=True)
with b.LoadLoop(url) as loop:
    r = asyncio.run(b.measure(url, "/api/model/status", 20, 10.0, {seconds}, {pid}))
print(f"{{loop.loads}} loads; status: {{r['requests']}} requests, p50 {{r['p50']:.2f}} ms, p99 {{r['p99']:.2f}} ms, "
      f"max {{r['max']:.1f}} ms", flush=True)
"""


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--seconds", type=float, default=12.0, help="length of the measurement")
    parser.add_argument("--cache", action="store_true", help="loads through the RAM cache (from RAM)")
    parser.add_argument("--out", type=Path, default=None, help="also write the report to this file")
    args = parser.parse_args(argv)

    import uvicorn

    from modelkeeper.api.app import create_app
    from modelkeeper.orchestrator import Settings
    from modelkeeper.testing import write_demo_models

    sys.path.insert(0, str(HERE))
    from api_latency import free_port

    work = Path(tempfile.mkdtemp(prefix="mk-loop-stalls-"))
    write_demo_models(work / "models")
    port = free_port()
    settings = Settings(model_roots=[work / "models"], db=work / "registry.sqlite3", port=port,
                        devices=["cpu"], hash_on_start=False, cache_loads=args.cache)  # fmt: skip
    server = uvicorn.Server(
        uvicorn.Config(create_app(settings), host="127.0.0.1", port=port, log_level="warning")
    )
    watch = Watch()
    watch.time_callbacks()
    lines: list[str] = []

    async def drive() -> None:
        while not server.started:
            await asyncio.sleep(0.1)
        code = DRIVER.format(
            here=str(HERE), url=f"http://127.0.0.1:{port}", seconds=args.seconds, pid=os.getpid()
        )
        proc = await asyncio.create_subprocess_exec(sys.executable, "-c", code, stdout=subprocess.PIPE)
        assert proc.stdout is not None
        await proc.stdout.readline()  # warm
        watch.reset()
        lines.extend((await proc.stdout.read()).decode().splitlines())
        await proc.wait()
        server.should_exit = True

    async def run() -> None:
        beat = asyncio.create_task(watch.heartbeat())
        threading.Thread(target=watch.watchdog, name="watchdog", daemon=True).start()
        await asyncio.gather(server.serve(), drive())
        beat.cancel()
        watch.stop()

    load = os.getloadavg()
    asyncio.run(run())
    report: list[str] = []

    def say(line: str = "") -> None:
        print(line, flush=True)
        report.append(line)

    say(f"# loop_stalls  {time.strftime('%Y-%m-%d %H:%M:%S')}  {platform.node()}; {os.cpu_count()} cores; "
        f"load average {' '.join(f'{x:.2f}' for x in load)} at start, "
        f"{' '.join(f'{x:.2f}' for x in os.getloadavg())} at end")  # fmt: skip
    say(
        f"# loads from {'RAM (cache on)' if args.cache else 'disk (cache off)'}, {args.seconds:g} s; "
        + "; ".join(lines)
    )
    stalls = sorted(watch.stalls, key=lambda s: -s.late)
    total: collections.Counter[str] = collections.Counter()
    for s in stalls:
        total.update(s.cpu)
    say(f"stalls (heartbeat > {LATE_S * 1000:.0f} ms late): {len(stalls)}, {sum(s.wall for s in stalls):.0f} ms in all; "
        "CPU used meanwhile (ms): " + ", ".join(f"{k} {v:.0f}" for k, v in total.most_common()))  # fmt: skip
    for s in stalls[:10]:
        say(f"  {s.late * 1000:.0f} ms late ({s.wall:.0f} ms); CPU ms: "
            + ", ".join(f"{k} {v:.1f}" for k, v in sorted(s.cpu.items(), key=lambda kv: -kv[1])))  # fmt: skip
        for stack, n in collections.Counter(s.stacks).most_common(2):
            say(f"      {n}x {stack[:220]}")
    say("loop callbacks over 1 ms of the loop thread's CPU (count, max ms):")
    for where, n in watch.callbacks.most_common(15):
        say(f"  {n:4d} {watch.callback_max[where]:6.1f}  {where}")
    if args.out is not None:
        args.out.write_text("\n".join(report) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
