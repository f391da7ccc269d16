"""Time until a usable SDXL UNet is on the GPU: modelkeeper against the common loaders, side by side.

Usage (on a CUDA machine): python benchmarks/gpu_load.py [--dir /tmp/mk-gpu-load] [--repeats 3] [--out FILE]

Builds an SDXL-UNet-shaped file (exact key names and shapes of diffusers' SDXL UNet config, random
fp16 data, 5.14 GB) and measures, in one run: raw pinned and pageable host-to-device bandwidth;
``safetensors.load_file(device="cuda")``; diffusers ``UNet2DConditionModel.from_pretrained`` from a
local folder; runai-model-streamer; fastsafetensors (no GDS); modelkeeper from the RAM cache
(shared memory) and from the page cache; cold reads (page cache dropped) with a sequential read of
the same file as anchor; and a model switch (UNet A to UNet B, both cached, VRAM budget for one).
Every loader is timed until a module is assembled on the GPU (the non-module loaders get the same
meta-device assembly as modelkeeper). Prints seconds, GB/s and ratios.
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import shutil
import statistics
import subprocess
import threading
import time
from collections.abc import Callable
from datetime import date
from pathlib import Path
from typing import Any

import torch

from _report import print_report
from modelkeeper.cache import RamCache
from modelkeeper.formats.known_configs import load_known_config
from modelkeeper.protocol import CommandType
from modelkeeper.worker import InProcessWorker
from modelkeeper.worker.assemble import build_module

DEV = torch.device("cuda:0")
GB = 1e9


def sync() -> None:
    torch.cuda.synchronize(DEV)


def free() -> None:
    gc.collect()
    torch.cuda.empty_cache()


def drop_page_cache(path: Path) -> bool:
    """Evict the file from the page cache (fadvise), and all caches where allowed."""
    try:
        fd = os.open(path, os.O_RDONLY)
        os.fsync(fd)
        os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
        os.close(fd)
    except OSError:
        return False
    try:
        subprocess.run(["sync"], check=False)
        Path("/proc/sys/vm/drop_caches").write_text("3\n")
    except OSError:
        pass
    return True


def make_files(folder: Path) -> tuple[Path, Path, Path, dict[str, Any]]:
    from accelerate import init_empty_weights
    from diffusers import UNet2DConditionModel
    from safetensors.torch import save_file

    config = load_known_config("sdxl", "unet")
    a = folder / "unet-a" / "diffusion_pytorch_model.safetensors"
    b = folder / "unet-b.safetensors"
    if not a.exists():
        a.parent.mkdir(parents=True, exist_ok=True)
        with init_empty_weights():
            skeleton = UNet2DConditionModel.from_config(config)
        g = torch.Generator(DEV).manual_seed(0)
        tensors = {}
        for k, v in skeleton.state_dict().items():
            tensors[k] = (torch.randn(v.shape, generator=g, device=DEV, dtype=torch.float16) * 0.02).cpu()
        save_file(tensors, str(a), metadata={"modelkeeper.config": json.dumps(config)})
        (a.parent / "config.json").write_text(json.dumps(config))
        del tensors
        shutil.copyfile(a, b)
    return a, b, a.parent, config


def timed(
    fn: Callable[[], Any], repeats: int, before: Callable[[], None] | None = None
) -> tuple[float, list[float]]:
    times = []
    for _ in range(repeats):
        if before is not None:
            before()
        free()
        sync()
        t = time.perf_counter()
        result = fn()
        sync()
        times.append(time.perf_counter() - t)
        del result
        free()
    return statistics.median(times), times


def cold_reads(
    a: Path,
    add: Callable[..., None],
    load_file: Callable[..., dict[str, torch.Tensor]],
    assemble: Callable[[dict[str, torch.Tensor]], torch.nn.Module],
    repeats: int,
    sweep: bool = False,
) -> dict[str, float]:
    """The page cache dropped before each: ``dd``, safetensors, modelkeeper (to a module on the GPU;
    the unload of the previous one happens before the timing)."""
    cold: dict[str, float] = {}

    def seq_read() -> None:
        subprocess.run(["dd", f"if={a}", "of=/dev/null", "bs=16M"], check=True, capture_output=True)

    def before() -> None:
        drop_page_cache(a)

    cold["seq"] = timed(seq_read, repeats, before)[0]
    add("cold: sequential read (dd bs=16M)", cold["seq"], "anchor")
    cold["st"] = timed(lambda: assemble(load_file(str(a), device="cuda:0")), repeats, before)[0]
    add("cold: safetensors load_file + assembly", cold["st"])
    with InProcessWorker("cuda:0") as w:
        loaded = False

        def unload_then_drop() -> None:
            nonlocal loaded
            if loaded:
                w.call(CommandType.UNLOAD_MODEL, {"name": "c"})
                loaded = False
            drop_page_cache(a)

        def mk_cold() -> None:
            nonlocal loaded
            w.call(CommandType.LOAD_UNET, {"name": "c", "path": str(a)}, timeout=600)
            loaded = True

        cold["mk"] = timed(mk_cold, repeats, unload_then_drop)[0]
        add("cold: modelkeeper from disk", cold["mk"], "to a module on the GPU")
        if sweep:
            from modelkeeper.worker import mapping

            defaults = (mapping.READ_THREADS, mapping.STAGE_CHUNK)
            for threads in (2, 4, 8, 16):
                for chunk_mb in (16, 64):
                    mapping.READ_THREADS, mapping.STAGE_CHUNK = threads, chunk_mb << 20
                    secs = timed(mk_cold, repeats, unload_then_drop)[0]
                    print(
                        f"  cold sweep threads={threads:>2} chunk={chunk_mb:>3} MB: {secs:.3f} s "
                        f"({cold['seq'] / secs:.1%} of dd)",
                        flush=True,
                    )
            mapping.READ_THREADS, mapping.STAGE_CHUNK = defaults
    return cold


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--dir", default="/tmp/mk-gpu-load")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--out", default=None)
    parser.add_argument("--skip-cold", action="store_true")
    parser.add_argument("--only-cold", action="store_true", help="only the cold reads (and their target)")
    args = parser.parse_args()
    folder = Path(args.dir)
    folder.mkdir(parents=True, exist_ok=True)
    t0 = time.perf_counter()
    a, b, diffusers_dir, config = make_files(folder)
    size = a.stat().st_size
    print(f"files ready in {time.perf_counter() - t0:.1f} s: {size / GB:.2f} GB", flush=True)
    for p in (a, b):  # page cache warm
        subprocess.run(["cat", str(p)], stdout=subprocess.DEVNULL, check=True)

    from safetensors import safe_open
    from safetensors.torch import load_file

    n_tensors = len(safe_open(str(a), "pt").keys())
    rows: list[tuple[str, float, str]] = []

    def add(name: str, seconds: float, note: str = "") -> None:
        rows.append((name, seconds, note))
        print(f"{name:<44}{seconds:>8.3f} s {size / seconds / GB:>7.1f} GB/s  {note}", flush=True)

    if args.only_cold:
        only = cold_reads(
            a,
            add,
            load_file,
            lambda st: build_module("UNet2DConditionModel", config, st, DEV),
            args.repeats,
            True,
        )
        ratio = only["seq"] / only["mk"]
        print_report(
            [
                f"# gpu_load --only-cold — {date.today().isoformat()} — {torch.cuda.get_device_name(DEV)}, "
                f"SDXL UNet {n_tensors} tensors, {size / GB:.2f} GB fp16, median of {args.repeats}"
            ]
            + [f"{name:<50}{sec:>8.3f} s {size / sec / GB:>7.1f} GB/s  {note}" for name, sec, note in rows]
            + [f"  cold >= 95% of sequential read: {ratio:.1%} {'MET' if ratio >= 0.95 else 'MISSED'}"],
            args.out,
        )
        return

    # raw bandwidth anchors
    def raw_copy(pin: bool) -> float:
        host = torch.empty(size, dtype=torch.uint8, pin_memory=pin)
        host.fill_(1)
        dst = torch.empty(size, dtype=torch.uint8, device=DEV)
        return timed(lambda: dst.copy_(host, non_blocking=pin), args.repeats)[0]

    add("raw pinned host-to-device", raw_copy(True))
    add("raw pageable host-to-device", raw_copy(False))
    free()

    def assemble(state: dict[str, torch.Tensor]) -> torch.nn.Module:
        return build_module("UNet2DConditionModel", config, state, DEV)

    def assembly_alone() -> float:
        state = load_file(str(a), device="cuda:0")
        sync()
        return timed(lambda: assemble(dict(state)), args.repeats)[0]

    t_asm = assembly_alone()
    free()

    st_s = timed(lambda: assemble(load_file(str(a), device="cuda:0")), args.repeats)[0]
    add("safetensors load_file(cuda) + assembly", st_s)

    def diffusers_load() -> torch.nn.Module:
        from diffusers import UNet2DConditionModel

        return UNet2DConditionModel.from_pretrained(
            str(diffusers_dir), torch_dtype=torch.float16, device_map="cuda:0"
        )

    try:
        df_s = timed(diffusers_load, args.repeats)[0]
        add("diffusers from_pretrained(device_map=cuda)", df_s)
    except Exception as exc:
        print(f"diffusers from_pretrained failed: {exc}", flush=True)
        df_s = float("nan")

    def runai_load() -> torch.nn.Module:
        from runai_model_streamer import SafetensorsStreamer

        state = {}
        with SafetensorsStreamer() as streamer:
            streamer.stream_file(str(a))
            for name, tensor in streamer.get_tensors():
                state[name] = tensor.to(DEV, non_blocking=True)
        return assemble(state)

    def fst_load() -> torch.nn.Module:
        from fastsafetensors import fastsafe_open

        with fastsafe_open(filenames=[str(a)], nogds=True, device="cuda:0") as f:
            state = {k: f.get_tensor(k) for k in f.keys()}  # noqa: SIM118
        return assemble(state)

    for name, fn in (
        ("runai-model-streamer + assembly", runai_load),
        ("fastsafetensors (no GDS) + assembly", fst_load),
    ):
        try:
            add(name, timed(fn, args.repeats)[0])
        except Exception as exc:
            print(f"{name} failed: {exc}", flush=True)

    cache = RamCache(4 * size)
    try:
        t = time.perf_counter()
        seg_a = cache.cache_file(a, component_id="unet-a")
        fill_s = time.perf_counter() - t
        seg_b = cache.cache_file(b, component_id="unet-b")
        with InProcessWorker("cuda:0", reserve_mb=2048) as w:

            def mk(path: Path, name: str = "u") -> Callable[[], None]:
                def run() -> None:
                    w.call(CommandType.LOAD_UNET, {"name": name, "path": str(path)}, timeout=600)
                    w.call(CommandType.UNLOAD_MODEL, {"name": name})

                return run

            t = time.perf_counter()
            w.call(CommandType.LOAD_UNET, {"name": "first", "path": str(seg_a.path)}, timeout=600)
            sync()
            first_s = time.perf_counter() - t
            w.call(CommandType.UNLOAD_MODEL, {"name": "first"})
            # time to a module on the GPU (the unload after each load is outside the timing below)
            cached: list[float] = []
            page: list[float] = []
            for _ in range(args.repeats):
                for path, bucket in ((seg_a.path, cached), (a, page)):
                    free()
                    t = time.perf_counter()
                    res = w.call(CommandType.LOAD_UNET, {"name": "u", "path": str(path)}, timeout=600)
                    sync()
                    bucket.append(time.perf_counter() - t)
                    if bucket is cached:
                        res_c = res
                    else:
                        res_p = res
                    w.call(CommandType.UNLOAD_MODEL, {"name": "u"})
            print(f"  worker stage timings, RAM cache: {res_c['timings']}", flush=True)
            print(f"  worker stage timings, page cache: {res_p['timings']}", flush=True)
            from modelkeeper.worker import mapping

            defaults = (mapping.READ_THREADS, mapping.STAGE_CHUNK)
            for threads in (4, 8, 16):
                for chunk_mb in (16, 64):
                    mapping.READ_THREADS, mapping.STAGE_CHUNK = threads, chunk_mb << 20
                    ts = []
                    for _ in range(2):
                        free()
                        t = time.perf_counter()
                        r = w.call(CommandType.LOAD_UNET, {"name": "s", "path": str(a)}, timeout=600)
                        sync()
                        ts.append(time.perf_counter() - t)
                        w.call(CommandType.UNLOAD_MODEL, {"name": "s"})
                    print(
                        f"  page cache sweep threads={threads:>2} chunk={chunk_mb:>3} MB: {min(ts):.3f} s read {r['timings']['read']:.3f} s",
                        flush=True,
                    )
            mapping.READ_THREADS, mapping.STAGE_CHUNK = defaults
            mk_cached = statistics.median(cached)
            add(
                "modelkeeper from RAM cache (registered)",
                mk_cached,
                f"first load incl. registration {first_s:.3f} s",
            )
            add("modelkeeper from page cache", statistics.median(page))
            # what the orchestrator does for a component not cached yet: the worker reads the file
            # while the RAM cache fills a segment from it (cache_fill = "alongside")
            cache.drop("unet-a", force=True)
            free()
            filled: dict[str, float] = {}

            def fill_alongside() -> None:
                t0 = time.perf_counter()
                cache.cache_file(a, component_id="unet-a")
                filled["s"] = time.perf_counter() - t0

            filler = threading.Thread(target=fill_alongside)
            t = time.perf_counter()
            filler.start()
            w.call(CommandType.LOAD_UNET, {"name": "u", "path": str(a)}, timeout=600)
            sync()
            beside = time.perf_counter() - t
            filler.join()
            w.call(CommandType.UNLOAD_MODEL, {"name": "u"})
            add(
                "modelkeeper from page cache, cache filling alongside",
                beside,
                f"the fill beside it took {filled['s']:.2f} s",
            )
            seg_a = cache.get("unet-a")
            print(
                f"  RAM cache fill {fill_s:.2f} s ({size / fill_s / GB:.1f} GB/s); load result bytes {res['bytes']}",
                flush=True,
            )
            w.call(CommandType.RELEASE_SEGMENTS)

        budget_mb = size * 1.3 / 2**20
        with InProcessWorker("cuda:0", budget_mb=budget_mb) as w:
            w.call(CommandType.LOAD_UNET, {"name": "A", "path": str(seg_a.path)}, timeout=600)
            w.call(
                CommandType.LOAD_UNET,
                {"name": "B", "path": str(seg_b.path), "allow_evict": True},
                timeout=600,
            )
            switches = []
            for i in range(args.repeats * 2):
                target, source = ("A", seg_a.path) if i % 2 == 0 else ("B", seg_b.path)
                free()
                t = time.perf_counter()
                res = w.call(
                    CommandType.LOAD_UNET,
                    {"name": target, "path": str(source), "allow_evict": True},
                    timeout=600,
                )
                sync()
                switches.append(time.perf_counter() - t)
                assert res["evicted"], res
            add(
                "modelkeeper switch A->B (cached, budget for one)",
                statistics.median(switches),
                "includes the unload",
            )
    finally:
        cache.close()

    cold: dict[str, float] = {}
    if not args.skip_cold:
        cold = cold_reads(a, add, load_file, assemble, args.repeats)
    raw = next(s for n, s, _ in rows if n.startswith("raw pinned"))
    lines = [
        f"# gpu_load — {date.today().isoformat()} — {torch.cuda.get_device_name(DEV)}, torch {torch.__version__}, "
        f"SDXL UNet {n_tensors} tensors, {size / GB:.2f} GB fp16, median of {args.repeats}",
        f"{'loader':<50}{'s':>8}{'GB/s':>8}{'/ raw pinned':>14}{'vs safetensors':>16}{'vs diffusers':>14}  note",
    ]
    for name, s, note in rows:
        lines.append(
            f"{name:<50}{s:>8.3f}{size / s / GB:>8.1f}{(size / s) / (size / raw):>14.2f}{st_s / s:>15.2f}x{df_s / s:>13.2f}x  {note}"
        )
    lines.append(f"module assembly alone (meta build + assign, tensors already on GPU): {t_asm:.3f} s")
    mk_c = next(s for n, s, _ in rows if n.startswith("modelkeeper from RAM"))
    mk_p = next(s for n, s, _ in rows if n.startswith("modelkeeper from page"))
    sw = next(s for n, s, _ in rows if "switch" in n)
    lines.append("targets:")
    lines.append(f"  cached SDXL UNet ready <= 0.2 s: {mk_c:.3f} s {'MET' if mk_c <= 0.2 else 'MISSED'}")
    copy_s = res_c["timings"].get("copy", res_c["timings"]["read"])
    read_s = res_c["timings"]["read"]
    lines.append(
        f"  cached copy >= 90% of raw pinned: the copy {copy_s:.3f} s = {size / copy_s / GB:.1f} GB/s = "
        f"{raw / copy_s:.0%} of raw {'MET' if raw / copy_s >= 0.9 else 'MISSED'}; the whole read stage "
        f"(allocation, copy, tensor views) {read_s:.3f} s = {raw / read_s:.0%} of raw"
    )
    lines.append(
        f"  page cache >= 25 GB/s: {size / mk_p / GB:.1f} GB/s {'MET' if size / mk_p / GB >= 25 else 'MISSED'}"
    )
    if cold:
        ratio = cold["seq"] / cold["mk"]
        lines.append(f"  cold >= 95% of sequential read: {ratio:.1%} {'MET' if ratio >= 0.95 else 'MISSED'}")
    lines.append(f"  switch <= 0.25 s: {sw:.3f} s {'MET' if sw <= 0.25 else 'MISSED'}")
    print_report(lines, args.out)


if __name__ == "__main__":
    main()
