"""Install benchmark: a large file from the local fake Hub, against ``curl`` of the same URL.

A safetensors file of ``--size-mb`` (default 2048: one tensor of random bytes) is published on
:class:`modelkeeper.testing.hubserver.FakeHub` (127.0.0.1, ``sendfile``), run in a process of its
own (:class:`~modelkeeper.testing.hubserver.HubProcess`) for both clients: a server on a thread of
the benchmark's process would share its GIL with the install measured, not with curl. Each run, in
turn:

- ``curl -o`` of the file's CDN URL into the same folder (the anchor: a plain transfer to disk;
  first in odd runs, after the install in even ones);
- ``Installer.install`` of the repo: metadata through huggingface_hub, the transfer with the
  SHA-256 computed alongside, verification, the rename into place; its transfer phase (first to
  last byte, from its progress events) is timed apart from the whole;
- registration: a discovery scan of the model root into a fresh SQLite registry.

Reported per run and as medians: curl's and the install's throughput and their ratio (target
>= 0.90), and install + registration over the transfer time (target <= 1.10; against curl's time
and against the install's own transfer phase), with the CPU seconds each client used (curl's
process; the install's whole process, all threads) and the load average after each run: on a
shared machine the CPU time says more than the wall time. Source file, curl output and installs
share one file system; the source is in the page cache for both, and dirty pages are written
back (``sync``) before each transfer.

    python benchmarks/install.py [--size-mb 2048] [--runs 3] [--work /tmp] [--out benchmarks/results/...txt]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import shutil
import statistics
import subprocess
import tempfile
import time
from pathlib import Path

from _report import cpu_name
from modelkeeper.discovery.scanner import Scanner
from modelkeeper.install import Installer, InstallProgress
from modelkeeper.registry.store import Registry
from modelkeeper.testing.hubserver import HubProcess

MB = 1000 * 1000
_BLOCK = 16 * 1024 * 1024


def write_safetensors(path: Path, size: int) -> None:
    """A valid safetensors file of about ``size`` bytes: one U8 tensor of random data."""
    header = b""
    data_len = size
    for _ in range(2):  # the header's length depends on the data length, which depends on it
        text = json.dumps({"weight": {"dtype": "U8", "shape": [data_len], "data_offsets": [0, data_len]}})
        header = text.encode().ljust((len(text) + 7) // 8 * 8, b" ")
        data_len = max(1, size - 8 - len(header))
    with open(path, "wb") as f:
        f.write(len(header).to_bytes(8, "little") + header)
        left = data_len
        while left:
            n = min(_BLOCK, left)
            f.write(os.urandom(n))
            left -= n


def cpu_seconds(who: int) -> float:
    """User + system CPU seconds of this process (``resource.RUSAGE_SELF``, all its threads) or of
    its waited-for children (``resource.RUSAGE_CHILDREN``)."""
    usage = resource.getrusage(who)
    return usage.ru_utime + usage.ru_stime


def run_curl(url: str, out: Path) -> tuple[float, float]:
    """(wall, CPU) seconds of curl."""
    cpu = cpu_seconds(resource.RUSAGE_CHILDREN)
    started = time.perf_counter()
    subprocess.run(["curl", "-s", "-f", "-o", str(out), url], check=True)
    elapsed = time.perf_counter() - started
    out.unlink()
    return elapsed, cpu_seconds(resource.RUSAGE_CHILDREN) - cpu


def run_install(hub: HubProcess, repo: str, work: Path) -> tuple[float, float, float, float]:
    """(transfer phase, install, registration, install CPU) seconds."""
    root = work / "models"
    shutil.rmtree(root, ignore_errors=True)
    marks: dict[str, float] = {}

    def progress(event: InstallProgress) -> None:
        now = time.perf_counter()
        if event.phase == "download":
            marks.setdefault("start", now)
            if event.file_done_bytes == event.file_total_bytes:
                marks["end"] = now

    with Installer(hub_endpoint=hub.url, hub_token=False, hub_cache_dir=work / "no-hf-cache") as installer:
        cpu = cpu_seconds(resource.RUSAGE_SELF)
        started = time.perf_counter()
        result = installer.install(repo, root, progress=progress)
        installed = time.perf_counter() - started
        cpu = cpu_seconds(resource.RUSAGE_SELF) - cpu
    assert result.files[0].transferred_bytes == result.size
    started = time.perf_counter()
    registry = Registry.open(work / "registry.sqlite3")
    try:
        Scanner(registry, [str(root)]).scan()
    finally:
        registry.close()
        (work / "registry.sqlite3").unlink()
    registered = time.perf_counter() - started
    shutil.rmtree(root)
    return marks["end"] - marks["start"], installed, registered, cpu


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--size-mb", type=int, default=2048)
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--work", type=Path, default=Path(tempfile.gettempdir()))
    parser.add_argument("--out", type=Path)
    args = parser.parse_args()
    work = Path(tempfile.mkdtemp(prefix="mk-install-bench-", dir=args.work))
    lines: list[str] = []

    def emit(text: str) -> None:
        print(text, flush=True)
        lines.append(text)

    try:
        source = work / "big.safetensors"
        write_safetensors(source, args.size_mb * MB)
        size = source.stat().st_size
        emit(f"# install benchmark  {time.strftime('%Y-%m-%d %H:%M')}  {cpu_name()}, {os.cpu_count()} cores")
        emit(
            f"# python {platform.python_version()}, load average {os.getloadavg()[0]:.2f}, file {size / MB:,.0f} MB"
        )
        with HubProcess({"bench/big": {"big.safetensors": source}}) as hub:
            url = f"{hub.cdn_url}/cdn/{hub.sha256['big.safetensors']}"
            emit(
                "run  curl MB/s  install MB/s  ratio  install+reg s  transfer s  curl s  (install+reg)/curl"
                "  /transfer  curl CPU s  install CPU s  load"
            )
            rows = []
            for run in range(1, args.runs + 1):
                # Alternate who goes first, and start each from written-back page cache (the source's
                # write-back, or the other's, would otherwise run during the next transfer).
                if run % 2:
                    os.sync()
                    curl_s, curl_cpu = run_curl(url, work / "curl.out")
                os.sync()
                transfer_s, install_s, register_s, install_cpu = run_install(hub, "bench/big", work)
                if not run % 2:
                    os.sync()
                    curl_s, curl_cpu = run_curl(url, work / "curl.out")
                total = install_s + register_s
                row = (
                    size / MB / curl_s,
                    size / MB / transfer_s,
                    curl_s / transfer_s,
                    total,
                    transfer_s,
                    curl_s,
                    curl_cpu,
                    install_cpu,
                )
                rows.append(row)
                emit(
                    f"{run:>3}  {row[0]:>9,.0f}  {row[1]:>12,.0f}  {row[2]:>5.2f}  {total:>12.2f}  {transfer_s:>10.2f}"
                    f"  {curl_s:>6.2f}  {total / curl_s:>18.2f}  {total / transfer_s:>9.2f}"
                    f"  {curl_cpu:>10.2f}  {install_cpu:>13.2f}  {os.getloadavg()[0]:>4.1f}"
                )
            med = [statistics.median(r[i] for r in rows) for i in range(8)]
            emit(
                f"median curl {med[0]:,.0f} MB/s, install {med[1]:,.0f} MB/s: throughput ratio {med[2]:.2f} (target >= 0.90); "
                f"install+registration {med[3]:.2f} s = {med[3] / med[5]:.2f}x curl's transfer, "
                f"{med[3] / med[4]:.2f}x its own transfer phase (target <= 1.10); "
                f"CPU per GB: curl {med[6] / size * 1e9:.2f} s, install {med[7] / size * 1e9:.2f} s (hash included)"
            )
            emit(f"# load average after: {os.getloadavg()[0]:.2f}")
    finally:
        shutil.rmtree(work, ignore_errors=True)
    if args.out is not None:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text("\n".join(lines) + "\n")


if __name__ == "__main__":
    main()
