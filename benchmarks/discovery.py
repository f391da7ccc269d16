"""Discovery benchmark: scan throughput and hashing speed.

1. First scan and unchanged rescan of 10,000 generated model files of mixed kinds (checkpoints,
   UNets, VAEs, text encoders, LoRAs of four formats, embeddings, diffusers folders), in ComfyUI-like
   folders. Each file carries the real header of one tiny demo model (``modelkeeper.testing``) with
   its own ``__metadata__``, and a sparse data section, so 10,000 files cost little disk. The
   structures vary as users' files do (``vary``: dtypes, LoRA ranks, embedding sizes), and the
   scan is timed twice: as it runs (remembering validated tensor sections and identifications
   across files that share a structure) and, as the anchor, with that memo off.
2. Hashing a 2 GB file: BLAKE3 (multithreaded) and hashlib SHA-256 alone, then both in one read as
   the hasher runs them (with and without component content ids), warm page cache, best of 3.

Targets on a 2-core machine: first scan >= 1,000 files/s; unchanged rescan of 10,000 files <= 1 s;
BLAKE3 >= 3x hashlib SHA-256.

    python benchmarks/discovery.py [--files 10000] [--hash-gb 2] [--out benchmarks/results/...txt]
"""

from __future__ import annotations

import argparse
import hashlib
import json
import math
import os
import platform
import random
import shutil
import struct
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from blake3 import blake3

from _report import cpu_name
from modelkeeper.discovery.hashing import TensorSpan, hash_file
from modelkeeper.discovery.scanner import Scanner
from modelkeeper.registry.store import Registry

#: Share of each demo entry in the generated library (a typical user's mix: many LoRAs and embeddings).
MIX: dict[str, float] = {
    "sd15-lora-kohya": 0.14,
    "sdxl-lora-kohya": 0.12,
    "sd15-lora-peft": 0.05,
    "sdxl-lora-peft": 0.05,
    "sd15-loha": 0.04,
    "sd15-lokr": 0.04,
    "sd15-embedding-a1111": 0.08,
    "sd15-embedding-diffusers": 0.04,
    "sd2-embedding-a1111": 0.03,
    "sdxl-embedding": 0.05,
    "sd15-checkpoint": 0.07,
    "sdxl-checkpoint": 0.06,
    "sd15-unet": 0.02,
    "sdxl-unet": 0.02,
    "sd15-vae": 0.03,
    "sdxl-vae": 0.02,
    "flux-vae": 0.02,
    "clip-l": 0.02,
    "clip-g": 0.02,
    "t5": 0.02,
    "sd15-unet-folder": 0.03,
    "flux-vae-folder": 0.03,
}
FOLDERS = {
    "lora": "loras",
    "textual_inversion": "embeddings",
    "main": "checkpoints",
    "unet": "unet",
    "vae": "vae",
    "text_encoder": "clip",
}
PER_FOLDER = 250


def _header(path: Path) -> tuple[dict[str, Any], int]:
    with open(path, "rb") as f:
        (n,) = struct.unpack("<Q", f.read(8))
        header = json.loads(f.read(n))
    size = path.stat().st_size - 8 - n
    return header, size


#: Where the LoRA formats keep their rank: (name part, dimension of the shape).
RANK_DIMS = (
    ("lora_down", 0),
    ("lora_up", 1),
    ("lora_A", 0),
    ("lora_B", 1),
    ("hada_w1_a", 1),
    ("hada_w2_a", 1),
    ("hada_w1_b", 0),
    ("hada_w2_b", 0),
)
DTYPE_BYTES = {"F16": 2, "BF16": 2, "F32": 4}


def vary(header: dict[str, Any], data_size: int, rng: random.Random) -> tuple[dict[str, Any], int]:
    """The template's structure as users' files vary it: the dtype of the weights; for LoRAs the
    rank (mostly a common one, one in ten anything from 1 to 256) and, one in ten, no text encoder
    part; for embeddings the number of vectors. Offsets are laid out again."""
    meta = header.get("__metadata__")
    tensors = {k: dict(v) for k, v in header.items() if k != "__metadata__"}
    names = " ".join(tensors)
    lora = any(part in names for part, _ in RANK_DIMS)
    embedding = len(tensors) <= 2 and "." not in names
    dtype = rng.choices(["F16", "BF16", "F32"], weights=[7, 2, 1])[0]
    if embedding:
        dtype = rng.choice(["F32", "F16"])
        vectors = rng.randint(1, 16)
    if lora:
        rank = rng.choice([4, 8, 16, 32, 64, 128]) if rng.random() < 0.9 else rng.randint(1, 256)
        if rng.random() < 0.1:
            tensors = {k: v for k, v in tensors.items() if not k.startswith(("lora_te", "text_encoder"))}
    offset = 0
    for name, entry in tensors.items():
        shape = list(entry["shape"])
        if lora:
            for part, dim in RANK_DIMS:
                if part in name and len(shape) > dim:
                    shape[dim] = rank
        if embedding and len(shape) == 2:
            shape[0] = vectors
        if entry["dtype"] in DTYPE_BYTES:
            entry["dtype"] = dtype
        size = math.prod(shape) * DTYPE_BYTES.get(entry["dtype"], 1)
        entry["shape"], entry["data_offsets"] = shape, [offset, offset + size]
        offset += size
    out: dict[str, Any] = {"__metadata__": meta} if meta is not None else {}
    out.update(tensors)
    return out, offset


def _write_sparse(path: Path, header: dict[str, object], data_size: int, i: int) -> None:
    h = dict(header)
    meta = dict(h.get("__metadata__") or {})  # type: ignore[call-overload]
    meta["bench.copy"] = str(i)
    h = {"__metadata__": meta, **{k: v for k, v in h.items() if k != "__metadata__"}}  # as safetensors writes
    raw = json.dumps(h, separators=(",", ":")).encode()
    raw += b" " * (-len(raw) % 8)
    with open(path, "wb") as f:
        f.write(struct.pack("<Q", len(raw)) + raw)
    os.truncate(path, 8 + len(raw) + data_size)


def _copy_folder(src: Path, dst: Path, i: int) -> None:
    for item in src.rglob("*"):
        target = dst / item.relative_to(src)
        if item.is_dir():
            target.mkdir(parents=True, exist_ok=True)
        elif item.suffix == ".safetensors":
            target.parent.mkdir(parents=True, exist_ok=True)
            _write_sparse(target, *_header(item), i)
        else:
            target.parent.mkdir(parents=True, exist_ok=True)
            shutil.copyfile(item, target)


def generate_library(root: Path, count: int, demo_root: Path, seed: int = 0) -> tuple[int, int]:
    """Write ``count`` model files and folders; returns (made, distinct tensor sections)."""
    rng = random.Random(seed)
    structures: set[str] = set()
    manifest = json.loads((demo_root / "manifest.json").read_text())
    entries = {e["name"]: e for e in manifest["entries"]}
    templates = {
        name: _header(demo_root / entries[name]["path"])
        for name in MIX
        if entries[name]["format"] == "safetensors"
    }
    made = 0
    for name, share in MIX.items():
        entry = entries[name]
        n = max(1, round(count * share))
        folder = FOLDERS.get(entry["type"], "other")
        for i in range(n):
            sub = root / folder / f"{name}-{i // PER_FOLDER:03d}"
            if entry["format"] == "diffusers":
                _copy_folder(demo_root / entry["path"], root / "diffusers" / f"{name}-{i:05d}", i)
            else:
                sub.mkdir(parents=True, exist_ok=True)
                header, size = vary(*templates[name], rng)
                structures.add(json.dumps({k: v for k, v in header.items() if k != "__metadata__"}))
                _write_sparse(sub / f"{name}-{i:05d}.safetensors", header, size, i)
            made += 1
    return made, len(structures)


def bench_scan(count: int, work: Path, log: Callable[[str], None]) -> dict[str, float]:
    from modelkeeper.testing.demo import write_demo_models

    demo = work / "demo"
    write_demo_models(demo)
    lib = work / "library"
    t = time.perf_counter()
    made, structures = generate_library(lib, count, demo)
    log(
        f"generated {made} model files and folders in {time.perf_counter() - t:.1f} s; "
        f"{structures} distinct tensor sections among the single files"
    )
    os.sync()
    # Anchor: the same first scan without the scan's memo, every header parsed and identified.
    plain = Registry.open(work / "plain.sqlite3")
    t = time.perf_counter()
    anchor = Scanner(plain, [lib], memo=False).scan()
    anchor_s = time.perf_counter() - t
    plain.close()
    log(
        f"first scan, no memo {len(anchor.entries):6d} entries  {anchor_s:6.2f} s  {len(anchor.entries) / anchor_s:8.0f} files/s"
    )
    registry = Registry.open(work / "registry.sqlite3")
    scanner = Scanner(registry, [lib])
    t, cpu = time.perf_counter(), time.process_time()
    first = scanner.scan()
    first_s, first_cpu = time.perf_counter() - t, time.process_time() - cpu
    s = first.summary()
    memo = scanner.last_memo
    hits = f"header memo {memo.headers.hits} hits, {memo.headers.misses} misses" if memo else "no memo"
    log(
        f"first scan      {s['total']:6d} entries  {first_s:6.2f} s  {s['total'] / first_s:8.0f} files/s  ({s['added']} added, {s['rejected']} rejected)"
        f"  CPU {first_cpu / s['total'] * 1e3:.2f} ms/file in {scanner.processes or 1} process(es); {hits}"
        f"; {first_s / anchor_s:.2f}x the time of the scan without memo"
    )
    times = []
    for _ in range(3):
        t = time.perf_counter()
        again = scanner.scan()
        times.append(time.perf_counter() - t)
        assert again.summary()["unchanged"] == s["total"] - s["rejected"] + again.summary()["rejected"]
    best = min(times)
    log(
        f"unchanged rescan {len(again.entries):5d} entries  {best:6.2f} s  {len(again.entries) / best:8.0f} files/s  (best of 3: {', '.join(f'{x:.2f}' for x in times)})"
    )
    registry.close()
    breakdown(lib, log)
    return {"entries": float(s["total"]), "first_s": first_s, "rescan_s": best}


def breakdown(lib: Path, log: Callable[[str], None], sample: int = 1000) -> None:
    """CPU time per file of each step, in this process (less sensitive to other load than wall time)."""
    from modelkeeper.discovery.identify import identify_table
    from modelkeeper.discovery.records import ModelFormat
    from modelkeeper.discovery.tables import read_safetensors_table
    from modelkeeper.discovery.walker import Walker
    from modelkeeper.formats.safetensors_header import read_header

    files = sorted(lib.rglob("*.safetensors"))[::7][:sample]
    t = time.process_time()
    for f in files:
        read_header(f)
    header_ms = (time.process_time() - t) / len(files) * 1e3
    t = time.process_time()
    for f in files:
        with open(f, "rb") as fh:
            (n,) = struct.unpack("<Q", fh.read(8))
            json.loads(fh.read(n))
    json_ms = (time.process_time() - t) / len(files) * 1e3
    tables = [read_safetensors_table(f) for f in files]
    t = time.process_time()
    for table in tables:
        identify_table(table, ModelFormat.SAFETENSORS)
    ident_ms = (time.process_time() - t) / len(files) * 1e3
    t = time.process_time()
    candidates = list(Walker([str(lib)]))
    walk_ms = (time.process_time() - t) / len(candidates) * 1e3
    tensors = sum(len(t.tensors) for t in tables) / len(tables)
    log(
        f"CPU per file (sample of {len(files)} files, {tensors:.0f} tensors on average): "
        f"safetensors_header.read_header {header_ms:.2f} ms (plain json.loads of the header {json_ms:.2f} ms), "
        f"identification {ident_ms:.2f} ms, walk {walk_ms:.3f} ms"
    )


def _best(fn: Callable[[], object], repeat: int = 3) -> float:
    times = []
    for _ in range(repeat):
        t = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t)
    return min(times)


def _sha256_file(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(8 << 20):
            h.update(chunk)
    return h.hexdigest()


def _blake3_file(path: Path) -> str:
    return blake3(max_threads=blake3.AUTO).update_mmap(str(path)).hexdigest()


def bench_hash(gb: float, work: Path, log: Callable[[str], None]) -> dict[str, float]:
    path = work / "blob.bin"
    size = int(gb * 1e9) // (1 << 20) * (1 << 20)
    block = os.urandom(64 << 20)
    with open(path, "wb") as f:
        for _ in range(size // len(block)):
            f.write(block)
        f.write(block[: size % len(block)])
    spans = {"all": [TensorSpan(s, min(s + (16 << 20), size), "F16") for s in range(0, size, 16 << 20)]}
    results = {
        "hashlib sha256 (8 MiB reads)": _best(lambda: _sha256_file(path)),
        "blake3 (mmap, all threads)": _best(lambda: _blake3_file(path)),
        "hash_file blake3 only": _best(lambda: hash_file(path, sha256=False)),
        "hash_file blake3 + sha256 (one read)": _best(lambda: hash_file(path)),
        "hash_file + component ids": _best(lambda: hash_file(path, spans=spans)),
    }
    assert hash_file(path).sha256 == _sha256_file(path)
    out = {}
    for name, secs in results.items():
        rate = size / secs / 1e9
        out[name] = rate
        log(f"{name:40s} {secs:6.2f} s  {rate:6.2f} GB/s")
    log(
        f"blake3 / sha256 = {out['hash_file blake3 only'] / out['hashlib sha256 (8 MiB reads)']:.2f}x (hash_file), "
        f"{out['blake3 (mmap, all threads)'] / out['hashlib sha256 (8 MiB reads)']:.2f}x (blake3 mmap)"
    )
    path.unlink()
    return out


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--files", type=int, default=10_000)
    parser.add_argument("--hash-gb", type=float, default=2.0)
    parser.add_argument("--out", type=Path, default=None, help="also write the report to this file")
    parser.add_argument("--work", type=Path, default=None, help="scratch folder (default: a temporary one)")
    args = parser.parse_args(argv)
    lines: list[str] = []

    def log(line: str) -> None:
        print(line, flush=True)
        lines.append(line)

    log(f"# modelkeeper discovery benchmark, {time.strftime('%Y-%m-%d %H:%M')}")
    log(
        f"# CPU: {cpu_name()}, {os.cpu_count()} cores; Python {platform.python_version()}; {platform.system()} {platform.release()}"
    )
    log("# targets: first scan >= 1000 files/s, unchanged rescan of 10,000 <= 1 s, BLAKE3 >= 3x SHA-256")
    log(
        "# load average at start: "
        + ", ".join(f"{x:.2f}" for x in os.getloadavg())
        + " (other work shares these cores)"
    )
    work = Path(tempfile.mkdtemp(prefix="mk-bench-", dir=args.work))
    try:
        scan = bench_scan(args.files, work, log)
        hashing = bench_hash(args.hash_gb, work, log)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    ratio = hashing["hash_file blake3 only"] / hashing["hashlib sha256 (8 MiB reads)"]
    log("# load average at end: " + ", ".join(f"{x:.2f}" for x in os.getloadavg()))
    log("# verdict")
    log(
        f"first scan       {scan['entries'] / scan['first_s']:8.0f} files/s   target >= 1000   {'ok' if scan['entries'] / scan['first_s'] >= 1000 else 'MISSED'}"
    )
    log(
        f"unchanged rescan {scan['rescan_s']:8.2f} s        target <= 1 s    {'ok' if scan['rescan_s'] <= 1 else 'MISSED'}"
    )
    log(f"blake3 / sha256  {ratio:8.2f}x        target >= 3x     {'ok' if ratio >= 3 else 'MISSED'}")
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text("\n".join(lines) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
