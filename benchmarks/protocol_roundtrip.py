"""Request-to-response latency and throughput of ``model.get_status`` over a worker's pipes.

Usage: python benchmarks/protocol_roundtrip.py [--device cpu] [--requests 5000] [--out FILE]

Anchors, measured side by side in the same run: a bare pipe echo round trip of a line of the
same size (the floor any JSON-lines protocol over pipes pays), and the same status request
answered by the in-process worker (same server, no process boundary). Prints a table of
p50/p99 latency, throughput and ratios to the anchors.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import threading
import time
from concurrent.futures import Future
from datetime import date

from _report import print_report
from modelkeeper.protocol import CommandType, WorkerConnection, WorkerProcess
from modelkeeper.worker import InProcessWorker

ECHO = "import sys\nfor line in sys.stdin.buffer:\n    sys.stdout.buffer.write(line); sys.stdout.buffer.flush()\n"


def percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, round(q / 100 * (len(ordered) - 1)))]


def sequential(call: object, n: int) -> list[float]:
    out = []
    for _ in range(n):
        t = time.perf_counter()
        call()  # type: ignore[operator]
        out.append(time.perf_counter() - t)
    return out


def pipelined(conn: WorkerConnection, n: int, window: int = 64) -> float:
    """Requests kept ``window`` deep in flight; returns requests per second."""
    t = time.perf_counter()
    inflight: list[Future[dict[str, object]]] = []
    for _ in range(n):
        inflight.append(conn.submit(CommandType.GET_STATUS))
        if len(inflight) >= window:
            inflight.pop(0).result(30)
    for f in inflight:
        f.result(30)
    return n / (time.perf_counter() - t)


def echo_roundtrip(n: int, size: int) -> list[float]:
    proc = subprocess.Popen([sys.executable, "-c", ECHO], stdin=subprocess.PIPE, stdout=subprocess.PIPE)
    assert proc.stdin and proc.stdout
    line = b"x" * (size - 1) + b"\n"
    lat = []
    for _ in range(n):
        t = time.perf_counter()
        proc.stdin.write(line)
        proc.stdin.flush()
        proc.stdout.readline()
        lat.append(time.perf_counter() - t)
    proc.stdin.close()
    proc.wait()
    return lat


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--requests", type=int, default=5000)
    parser.add_argument("--out", default=None)
    args = parser.parse_args()
    n = args.requests

    worker = WorkerProcess(args.device)
    sample = json.dumps({"success": True, "data": worker.call(CommandType.GET_STATUS), "request_id": "w-1"})
    for _ in range(200):
        worker.call(CommandType.GET_STATUS)
    sub = sequential(lambda: worker.call(CommandType.GET_STATUS), n)
    sub_tput = pipelined(worker, n)
    device_name = worker.hello["device"]["name"]
    worker.stop()

    inproc = InProcessWorker(args.device)
    for _ in range(200):
        inproc.call(CommandType.GET_STATUS)
    inp = sequential(lambda: inproc.call(CommandType.GET_STATUS), n)
    inp_tput = pipelined(inproc, n)
    inproc.stop()

    echo = echo_roundtrip(n, len(sample) + 1)

    rows = [
        ("pipe echo (anchor)", echo, n / sum(echo)),
        ("in-process worker", inp, inp_tput),
        ("subprocess worker", sub, sub_tput),
    ]
    lines = [
        f"# protocol_roundtrip — {date.today().isoformat()} — {device_name} ({os.cpu_count()} cores), "
        f"Python {platform.python_version()}, device {args.device}, {n} requests, response {len(sample)} bytes",
        f"{'path':<22}{'p50 µs':>10}{'p99 µs':>10}{'seq req/s':>12}{'pipelined req/s':>17}{'p50 / echo':>12}{'p99 / echo':>12}",
    ]
    e50, e99 = percentile(echo, 50), percentile(echo, 99)
    for name, lat, tput in rows:
        p50, p99 = percentile(lat, 50), percentile(lat, 99)
        seq = 1 / statistics.fmean(lat)
        lines.append(
            f"{name:<22}{p50 * 1e6:>10.0f}{p99 * 1e6:>10.0f}{seq:>12.0f}{tput:>17.0f}{p50 / e50:>12.2f}{p99 / e99:>12.2f}"
        )
    print_report(lines, args.out)


if __name__ == "__main__":
    threading.stack_size(0)
    main()
