"""Cluster transfer benchmark: a model file sent from the node that has it to one that does not,
against a plain copy of the same bytes between the same two nodes' folders.

A local two-node Ray cluster on this machine (``testing.cluster.local_ray_cluster``); node-a's
model root holds ``--repeat`` safetensors files of ``--mb`` MB of random bytes each; the driver
asks node-b for each in turn (``ClusterLoads.transfer``: chunks read into NumPy arrays on node-a,
``--ahead`` in flight through Ray's object stores, written on node-b from its object store's
memory into shared memory with BLAKE3 updated as they arrive; then copied to node-b's disk unless
``--ram-only``, scanned and hashed by its registry, checked against the cluster key, and made
node-b's RAM-cache segment). Rows per file: the chunked move into node-b's RAM (as node-b timed
it), the whole transfer as the driver saw it, and ``shutil.copyfile`` of the same file between
the two roots (the page cache warm for both), with the ratio of the two throughputs. On one
machine both go through memory; between real hosts the network sets the pace. The load average
is printed before and after: on a shared machine it says how much the figures are worth.

    python benchmarks/cluster_transfer.py [--mb 200] [--chunk-mb 64] [--ahead 4] [--repeat 3] [--ram-only]
"""

from __future__ import annotations

import argparse
import asyncio
import os
import shutil
import tempfile
import time
from pathlib import Path

import numpy as np
from safetensors.numpy import save_file

from modelkeeper.cluster import ClusterOrchestrator, ClusterSettings
from modelkeeper.orchestrator import Settings
from modelkeeper.testing.cluster import local_ray_cluster


def load_average() -> str:
    return " ".join(f"{x:.2f}" for x in os.getloadavg())


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--mb", type=int, default=200)
    ap.add_argument("--chunk-mb", type=int, default=64)
    ap.add_argument("--ahead", type=int, default=4)
    ap.add_argument("--repeat", type=int, default=3, help="files sent one after the other")
    ap.add_argument("--ram-only", action="store_true", help="into node-b's RAM cache only, not its disk")
    args = ap.parse_args()
    work = Path(tempfile.mkdtemp(prefix="mkbench"))
    roots = {n: work / n / "models" for n in ("node-a", "node-b")}
    for root in roots.values():
        root.mkdir(parents=True)
    for i in range(args.repeat):
        weights = np.frombuffer(os.urandom(args.mb << 20), dtype=np.float16).reshape(-1, 1024)
        save_file({"blob.weight": weights}, str(roots["node-a"] / f"blob{i}.safetensors"))
    node = {"devices": ["cpu"], "ram_cache_bytes": 4 << 30, "worker_warm": False, "status_poll_s": 60}
    overrides = {
        n: {**node, "model_roots": [str(r)], "db": str(r.parent / "db.sqlite3")} for n, r in roots.items()
    }
    store = max(256 << 20, 2 * args.ahead * (args.chunk_mb << 20))
    print(f"load average before: {load_average()} ({os.cpu_count()} cores)")
    try:
        with local_ray_cluster(list(roots), object_store_bytes=store) as lc:
            cluster = ClusterSettings(
                address=lc.address, workers="inprocess", named_nodes_only=True, node_overrides=overrides,
                chunk_bytes=args.chunk_mb << 20, chunks_in_flight=args.ahead,
                receive_to_disk=not args.ram_only,
            )  # fmt: skip

            async def run() -> None:
                orch = ClusterOrchestrator(Settings(), cluster)
                await orch.start()
                try:
                    where = "RAM only" if args.ram_only else "RAM + disk"
                    print(
                        f"{args.mb} MiB files, chunks of {args.chunk_mb} MiB, {args.ahead} ahead, into {where}"
                    )
                    for i in range(args.repeat):
                        await one(orch, i)
                finally:
                    await orch.stop(agents=True)

            async def one(orch: ClusterOrchestrator, i: int) -> None:
                model = orch.catalog.find(f"blob{i}")
                t0 = time.perf_counter()
                await orch.loads.transfer(model.key, "node-b")
                total = time.perf_counter() - t0
                sent = next(
                    e
                    for e in orch.bus.recent
                    if e["type"] == "model.transferred" and e["model_id"] == model.key
                )
                src = roots["node-a"] / f"blob{i}.safetensors"
                t1 = time.perf_counter()
                shutil.copyfile(src, work / "copy.safetensors")
                copy = time.perf_counter() - t1
                mb = sent["bytes"] / 1e6
                move = mb / sent["seconds"]
                print(f"file {i + 1}: {mb:.0f} MB, {sent['segments']} segment(s) in node-b's RAM cache")
                print(f"  chunked move into node-b's RAM {sent['seconds']:.3f} s  {move:.0f} MB/s")
                print(f"  whole transfer (+disk, scan)   {total:.3f} s  {mb / total:.0f} MB/s")
                print(f"  plain copy, same bytes         {copy:.3f} s  {mb / copy:.0f} MB/s")
                print(f"  plain copy / chunked move      {(mb / copy) / move:.1f}x")

            asyncio.run(run())
    finally:
        shutil.rmtree(work, ignore_errors=True)
        print(f"load average after: {load_average()}")


if __name__ == "__main__":
    main()
