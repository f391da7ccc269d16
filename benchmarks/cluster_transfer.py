"""Cluster transfer benchmark: a model file sent from the node that has it to one that does not,
against a plain copy of the same bytes between the same two nodes' folders.

A local two-node Ray cluster on this machine (``testing.cluster.local_ray_cluster``); node-a's
model root holds one safetensors file of ``--mb`` MB of random bytes; the driver asks node-b for
it (``ClusterLoads.transfer``: chunks through Ray, written to node-b's disk, then scanned, hashed
and checked against the cluster key). Rows: the chunked move itself (as node-b timed it), the
whole transfer as the driver saw it (move + scan + hash + check), and ``shutil.copyfile`` of the
same file between the two roots (the page cache warm for both). On one machine both go through
memory; between real hosts the network sets the pace.

    python benchmarks/cluster_transfer.py [--mb 200] [--chunk-mb 8] [--ahead 4]
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


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--mb", type=int, default=200)
    ap.add_argument("--chunk-mb", type=int, default=8)
    ap.add_argument("--ahead", type=int, default=4)
    args = ap.parse_args()
    work = Path(tempfile.mkdtemp(prefix="mkbench"))
    roots = {n: work / n / "models" for n in ("node-a", "node-b")}
    for root in roots.values():
        root.mkdir(parents=True)
    weights = np.frombuffer(os.urandom(args.mb << 20), dtype=np.float16).reshape(-1, 1024)
    save_file({"blob.weight": weights}, str(roots["node-a"] / "blob.safetensors"))
    node = {"devices": ["cpu"], "ram_cache_bytes": 64 << 20, "worker_warm": False, "status_poll_s": 60}
    overrides = {
        n: {**node, "model_roots": [str(r)], "db": str(r.parent / "db.sqlite3")} for n, r in roots.items()
    }
    try:
        with local_ray_cluster(list(roots)) as lc:
            cluster = ClusterSettings(
                address=lc.address, workers="inprocess", named_nodes_only=True, node_overrides=overrides,
                chunk_bytes=args.chunk_mb << 20, chunks_in_flight=args.ahead,
            )  # fmt: skip

            async def run() -> None:
                orch = ClusterOrchestrator(Settings(), cluster)
                await orch.start()
                try:
                    model = orch.catalog.find("blob")
                    t0 = time.perf_counter()
                    await orch.loads.transfer(model.key, "node-b")
                    total = time.perf_counter() - t0
                    sent = next(e for e in orch.bus.recent if e["type"] == "model.transferred")
                    t1 = time.perf_counter()
                    shutil.copyfile(roots["node-a"] / "blob.safetensors", work / "copy.safetensors")
                    copy = time.perf_counter() - t1
                    mb = sent["bytes"] / 1e6
                    print(f"{mb:.0f} MB, chunks of {args.chunk_mb} MiB, {args.ahead} ahead")
                    print(
                        f"  chunked move through Ray    {sent['seconds']:.3f} s  {mb / sent['seconds']:.0f} MB/s"
                    )
                    print(f"  whole transfer (+hash+scan) {total:.3f} s  {mb / total:.0f} MB/s")
                    print(f"  plain copy, same bytes      {copy:.3f} s  {mb / copy:.0f} MB/s")
                finally:
                    await orch.stop(agents=True)

            asyncio.run(run())
    finally:
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
