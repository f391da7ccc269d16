"""Where the time of a cached load goes on a GPU: allocation, registration, the copy in one go or in
chunks, the tensor views, assembly. Prints one line per step (median of 5). Uses gpu_load's file."""

from __future__ import annotations

import gc
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "benchmarks"))
from gpu_load import make_files
from modelkeeper.cache.store import RamCache
from modelkeeper.worker import mapping
from modelkeeper.worker.assemble import SkeletonPool, build_module

DEV = torch.device("cuda:0")


def t(fn, n=5, before=None):  # type: ignore[no-untyped-def]
    out = []
    for _ in range(n):
        if before:
            before()
        torch.cuda.synchronize()
        s = time.perf_counter()
        fn()
        torch.cuda.synchronize()
        out.append(time.perf_counter() - s)
    return statistics.median(out), min(out)


def show(name, res, size=None):  # type: ignore[no-untyped-def]
    med, best = res
    rate = f"{size / med / 1e9:6.1f} GB/s" if size else ""
    print(f"{name:55s} median {med * 1e3:8.1f} ms  best {best * 1e3:8.1f} ms  {rate}", flush=True)


def main() -> None:
    a, _b, _folder, config = make_files(Path("/tmp/mk-gpu-load"))
    cache = RamCache(3 * a.stat().st_size)
    seg = cache.cache_file(a, component_id="unet-a")
    table = mapping.MappingTable(read_only=True)
    m = table.get(seg.path)
    header = m.header
    infos = sorted(header.tensors.values(), key=lambda i: i.begin)
    runs, where, size = mapping._plan(header, infos)
    print(f"segment {seg.path} {size / 1e9:.2f} GB, {len(infos)} tensors, {len(runs)} runs", flush=True)
    torch.empty(1, device=DEV)
    s = time.perf_counter()
    m.register()
    print(f"register {time.perf_counter() - s:.3f} s", flush=True)
    host = m.host

    def empty() -> None:
        gc.collect()
        torch.cuda.empty_cache()

    show("alloc after empty_cache", t(lambda: torch.empty(size, dtype=torch.uint8, device=DEV), before=empty))
    keep = torch.empty(size, dtype=torch.uint8, device=DEV)
    del keep
    show("alloc from the caching allocator", t(lambda: torch.empty(size, dtype=torch.uint8, device=DEV)))
    buf = torch.empty(size, dtype=torch.uint8, device=DEV)
    n = host.numel() - header.data_offset
    src = host[header.data_offset : header.data_offset + n]
    show("copy one go, default stream", t(lambda: buf[:n].copy_(src, non_blocking=True)), n)
    side = torch.cuda.Stream(DEV)

    def chunks(c: int) -> None:
        with torch.cuda.stream(side):
            for off in range(0, n, c):
                ln = min(c, n - off)
                buf[off : off + ln].copy_(src[off : off + ln], non_blocking=True)
        side.synchronize()

    for mb in (64, 256, 1024):
        show(f"copy {mb} MiB chunks, side stream", t(lambda mb=mb: chunks(mb << 20)), n)
    show("copy_from_mapping (runs)", t(lambda: mapping._copy_from_mapping(host, buf, runs, None, None)), n)
    show("views", t(lambda: mapping._views(buf, infos, where)))
    names = [i.name for i in infos]
    show(
        "load_tensors (alloc + copy + views), cache emptied",
        t(lambda: mapping.load_tensors(seg.path, names, DEV, table=table), before=empty),
        n,
    )
    show(
        "load_tensors, allocator warm", t(lambda: mapping.load_tensors(seg.path, names, DEV, table=table)), n
    )
    state = mapping.load_tensors(seg.path, names, DEV, table=table)
    pool = SkeletonPool()
    for _ in range(6):
        pool.prefetch("UNet2DConditionModel", config)
    show(
        "assemble with a prebuilt skeleton",
        t(
            lambda: build_module(
                "UNet2DConditionModel",
                config,
                dict(state),
                DEV,
                module=pool.take("UNet2DConditionModel", config).result(),
            )
        ),
    )
    show(
        "skeleton build", t(lambda: build_module.__globals__["skeleton"]("UNet2DConditionModel", config), n=3)
    )
    table.release()
    cache.close()


if __name__ == "__main__":
    main()
