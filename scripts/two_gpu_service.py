"""The service on a machine with several GPUs: one worker per device, one model loaded on every
device from one RAM-cache segment, and the status that shows it.

Writes the demo models and an SDXL UNet (exact diffusers key names and shapes, random fp16 data,
5.1 GB) into a model root, serves it with ``devices=["auto"]``, and through the Python client:
loads the UNet on every device (``POST /api/model/load``), reads ``GET /api/model/status`` and
the cache, validates the model on each device, and loads a tiny SDXL pipeline on both as well.

    python scripts/two_gpu_service.py --root /tmp/mk-models --out gpu-out/two_gpu_service.json
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path
from typing import Any

import torch

from modelkeeper.client import Client
from modelkeeper.formats.known_configs import load_known_config
from modelkeeper.orchestrator import Settings
from modelkeeper.testing import write_demo_models
from modelkeeper.testing.service import running_service

UNET = "unet/sdxl-unet-random.safetensors"


def write_sdxl_unet(path: Path) -> None:
    from accelerate import init_empty_weights
    from diffusers import UNet2DConditionModel
    from safetensors.torch import save_file

    if path.exists():
        return
    config = load_known_config("sdxl", "unet")
    with init_empty_weights():
        skeleton = UNet2DConditionModel.from_config(config)
    g = torch.Generator("cuda").manual_seed(0)
    tensors = {
        k: (torch.randn(v.shape, generator=g, device="cuda", dtype=torch.float16) * 0.02).cpu()
        for k, v in skeleton.state_dict().items()
    }
    path.parent.mkdir(parents=True, exist_ok=True)
    save_file(tensors, str(path))


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--root", type=Path, default=Path("/tmp/mk-models"))
    parser.add_argument("--out", type=Path, default=Path("two_gpu_service.json"))
    parser.add_argument("--unet", default=UNET, help="model to load everywhere (a dry run: a demo UNet)")
    args = parser.parse_args()
    unet_ref = args.unet
    if not (args.root / "manifest.json").exists():
        write_demo_models(args.root)
    t = time.perf_counter()
    if unet_ref == UNET:
        write_sdxl_unet(args.root / UNET)
    print(f"models ready in {time.perf_counter() - t:.1f} s", flush=True)
    gpus = [torch.cuda.get_device_name(i) for i in range(torch.cuda.device_count())]
    report: dict[str, Any] = {"gpus": gpus}
    settings = Settings(
        devices=["auto"], model_roots=[args.root], db=args.root.parent / "mk-registry.sqlite3", port=0,
        ram_cache_bytes=24 << 30, hash_on_start=True,
    )  # fmt: skip
    with running_service(settings) as svc, Client(svc.url) as c:
        for job in c.jobs(kind="scan"):
            c.wait_job(job["id"], timeout=600)
        report["ready"] = c.ready()
        unet = c.model(unet_ref)
        report["unet"] = {k: unet[k] for k in ("id", "type", "base", "size", "rule")}
        t = time.perf_counter()
        loaded = c.load_everywhere(unet_ref)["result"]
        report["load_everywhere_seconds"] = round(time.perf_counter() - t, 3)
        report["placements"] = loaded["placements"]
        report["status"] = c.status()
        report["cache"] = c.cache()
        report["validate"] = c.validate(unet["id"], level="weights")["result"]
        c.unload(unet["id"])
        for device in [d["id"] for d in report["status"]["devices"]]:  # cached now: a load per device
            t = time.perf_counter()
            again = c.load(unet_ref, device)["result"]
            report.setdefault("cached_load_seconds", {})[device] = {
                "wall": round(time.perf_counter() - t, 3), "worker": again["load_seconds"]}  # fmt: skip
        report["pipeline"] = c.load_everywhere("diffusers/tiny-sdxl")["result"]["placements"]
        report["pipeline_validate"] = c.validate("diffusers/tiny-sdxl", level="functional")["result"]
        report["status_after"] = c.status()
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(report, indent=2))
    st = report["status"]
    print(f"GPUs: {report['gpus']}")
    for d in st["devices"]:
        print(f"{d['id']} ({d['name']}): pid {d['pid']}, models {[m['name'] for m in d['models']]}, "
              f"{d['memory']['models_bytes'] / 1e9:.2f} GB of {d['memory']['budget_bytes'] / 1e9:.1f} GB")  # fmt: skip
    segs = report["cache"]["segments"]
    print(
        f"cache: {len(segs)} segment(s): "
        + ", ".join(f"{s['component_id'][:12]} {s['bytes'] / 1e9:.2f} GB hits {s['hits']}" for s in segs)
    )
    for p in report["placements"]:
        print(
            f"placement {p['device']}: {p['bytes'] / 1e9:.2f} GB from {p['sources']} in {p['load_seconds']:.3f} s"
        )
    print(
        f"load on every device: {report['load_everywhere_seconds']} s wall; cached loads per device: {report['cached_load_seconds']}"
    )
    checks = report["validate"]  # one entry per device holding the model
    print("validate:", {r["device"]: r["components"]["unet"]["passed"] for r in checks})
    print("pipeline:", [(p["device"], p["sources"]) for p in report["pipeline"]])


if __name__ == "__main__":
    main()
