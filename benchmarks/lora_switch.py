"""Time to apply a LoRA, change its strength and remove it: modelkeeper's LoraManager against
diffusers' own LoRA support, in the same run on the same UNet.

Usage: python benchmarks/lora_switch.py [--device cuda:0] [--small] [--rank 32] [--repeats 5] [--out FILE]

The UNet is SDXL-shaped: the full-size config (``load_known_config("sdxl", "unet")``), random fp16
weights made on the device (``--small``: the tiny SDXL UNet of ``modelkeeper.testing``, for a CPU
smoke test). The LoRA is PEFT-format (``unet.<module>.lora_A/B.weight``), rank ``--rank``, on every
attention projection (``to_q``, ``to_k``, ``to_v``, ``to_out.0`` of ``attn1`` and ``attn2``), read
from a safetensors file by both sides. Compared, each the median of ``--repeats`` rounds:

- modelkeeper: ``LoraManager.load`` (read, match, factors to the device, patch: fused weights),
  ``set_strength``, ``remove`` (bitwise restore, checked by fingerprint once);
- diffusers, PEFT layers (unfused): ``unet.load_lora_adapter``, ``unet.set_adapters``,
  ``unet.unload_lora``: cheap switches, but every denoising step pays for the extra layers;
- diffusers, fused: ``load_lora_adapter`` + ``fuse_lora``; strength: ``unfuse_lora`` +
  ``fuse_lora(lora_scale=...)``; remove: ``unfuse_lora`` + ``unload_lora`` (not bitwise).

Then one UNet forward (1024x1024, batch 1; ``--small``: 64x64) with no LoRA, with modelkeeper's
fused LoRA and with diffusers' unfused PEFT layers. Targets: strength change <= 50 ms, apply <= 0.3 s.
"""

from __future__ import annotations

import argparse
import os
import platform
import tempfile
from datetime import date
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import save_file

from _report import print_report
from _timing import median_seconds, medians, switch_rounds
from _weights import random_weights
from modelkeeper.worker.fingerprint import fingerprint
from modelkeeper.worker.lora import LoraManager

TARGETS = ("attn1.to_q", "attn1.to_k", "attn1.to_v", "attn1.to_out.0",
           "attn2.to_q", "attn2.to_k", "attn2.to_v", "attn2.to_out.0")  # fmt: skip


def build_unet(small: bool, device: torch.device, dtype: torch.dtype) -> Any:
    """SDXL UNet with random weights, made directly on the device (no CPU init, no copy)."""
    if small:
        from modelkeeper.testing import make_unet

        tiny: Any = make_unet("sdxl", dtype=dtype)
        return tiny.to(device).requires_grad_(False)
    from accelerate import init_empty_weights
    from diffusers.models.unets.unet_2d_condition import UNet2DConditionModel

    from modelkeeper.formats.known_configs import load_known_config

    config = {k: v for k, v in load_known_config("sdxl", "unet").items() if not k.startswith("_")}
    with init_empty_weights():
        unet: Any = UNet2DConditionModel(**config)
    return random_weights(unet, device, dtype).eval().requires_grad_(False)


def make_lora(unet: torch.nn.Module, rank: int, seed: int) -> dict[str, torch.Tensor]:
    """PEFT-format rank-``rank`` LoRA for every attention projection (fp16, on the CPU)."""
    generator = torch.Generator().manual_seed(seed)
    state: dict[str, torch.Tensor] = {}
    for name, module in unet.named_modules():
        if isinstance(module, torch.nn.Linear) and name.endswith(TARGETS):
            down = torch.randn(rank, module.in_features, generator=generator) * module.in_features**-0.5
            up = torch.randn(module.out_features, rank, generator=generator) * 0.01
            state[f"unet.{name}.lora_A.weight"] = down.half()
            state[f"unet.{name}.lora_B.weight"] = up.half()
    return state


def forward(unet: Any, device: torch.device, dtype: torch.dtype, small: bool, repeats: int) -> float:
    side = 8 if small else 128
    sample = torch.randn(1, 4, side, side, device=device, dtype=dtype)
    context = torch.randn(1, 77, unet.config.cross_attention_dim, device=device, dtype=dtype)
    added = {"text_embeds": torch.randn(1, 1280, device=device, dtype=dtype),
             "time_ids": torch.randn(1, 6, device=device, dtype=dtype)}  # fmt: skip
    t = torch.tensor([500.0], device=device)
    with torch.inference_mode():
        return median_seconds(
            lambda: unet(sample, t, context, added_cond_kwargs=added), device, repeats, warmups=1
        )


def run_ours(unet: Any, path: Path, device: torch.device, repeats: int) -> dict[str, list[float]]:
    manager = LoraManager(device)
    reports: list[Any] = []
    warmups = 1  # round 0 warms up (imports, allocator, kernels)
    out = switch_rounds(
        device,
        repeats,
        apply=lambda i: reports.append(manager.load("style", path, {"unet": unet}, strength=1.0)),
        strength=lambda i: manager.set_strength("style", 0.5 if i % 2 else 0.8),
        remove=lambda i: manager.remove("style"),
        warmups=warmups,
    )
    counted = reports[warmups:]
    out["read"] = [r.read_seconds for r in counted]
    out["prepare"] = [r.prepare_seconds for r in counted]
    out["patch"] = [r.apply_seconds for r in counted]
    return out


def run_diffusers(
    unet: Any, path: Path, device: torch.device, repeats: int, fused: bool
) -> dict[str, list[float]]:
    kwargs = {"prefix": "unet", "weight_name": path.name, "low_cpu_mem_usage": True}

    def apply(i: int) -> None:
        unet.load_lora_adapter(str(path.parent), adapter_name=f"style{i}", **kwargs)
        if fused:
            unet.fuse_lora(lora_scale=1.0, adapter_names=[f"style{i}"])

    def strength(i: int) -> None:
        scale = 0.5 if i % 2 else 0.8
        if fused:
            unet.unfuse_lora()
            unet.fuse_lora(lora_scale=scale, adapter_names=[f"style{i}"])
        else:
            unet.set_adapters([f"style{i}"], weights=[scale])

    def remove(i: int) -> None:
        if fused:
            unet.unfuse_lora()
        unet.unload_lora()

    return switch_rounds(device, repeats, apply, strength, remove, warmups=1)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--device", default="cuda:0" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--small", action="store_true", help="tiny SDXL UNet (CPU smoke test)")
    parser.add_argument("--rank", type=int, default=32)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--out", default=None)
    parser.add_argument(
        "--profile", action="store_true", help="print where one modelkeeper apply spends its time"
    )
    args = parser.parse_args()
    device = torch.device(args.device)
    dtype = torch.float16 if device.type == "cuda" else torch.float32
    if device.type == "cpu":
        torch.set_num_threads(1)  # tiny matrices: threads only add waiting (and noise on shared machines)
    unet = build_unet(args.small, device, dtype)
    lora = make_lora(unet, args.rank, seed=1)
    params = sum(p.numel() for p in unet.parameters())
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "lora.safetensors"
        save_file(lora, str(path))
        original = fingerprint(unet)
        base_step = forward(unet, device, dtype, args.small, 2 * args.repeats)
        ours = run_ours(unet, path, device, args.repeats)
        exact = fingerprint(unet) == original
        if args.profile:
            import cProfile
            import pstats

            profiler = LoraManager(device)
            cProfile.runctx(
                "profiler.load('p', path, {'unet': unet})", globals(), locals(), str(Path(tmp) / "prof")
            )
            pstats.Stats(str(Path(tmp) / "prof")).sort_stats("tottime").print_stats(20)
            profiler.remove("p")
        manager = LoraManager(device)
        manager.load("style", path, {"unet": unet})
        ours_step = forward(unet, device, dtype, args.small, 2 * args.repeats)
        manager.remove("style")
        unfused = run_diffusers(unet, path, device, args.repeats, fused=False)
        unet.load_lora_adapter(str(path.parent), adapter_name="step", prefix="unet", weight_name=path.name)
        peft_step = forward(unet, device, dtype, args.small, 2 * args.repeats)
        unet.unload_lora()
        fused = run_diffusers(unet, path, device, args.repeats, fused=True)
        fused_exact = fingerprint(unet) == original
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else platform.processor() or "cpu"
    med = {"ours": medians(ours), "peft": medians(unfused), "fused": medians(fused)}
    lines = [
        f"# lora_switch — {date.today().isoformat()} — {name} ({os.cpu_count()} cores), Python "
        f"{platform.python_version()}, torch {torch.__version__}, device {device}, {dtype}",
        f"# UNet {'tiny SDXL' if args.small else 'SDXL'} ({params / 1e6:.0f} M parameters); LoRA rank {args.rank} on "
        f"{len(lora) // 2} attention projections ({sum(t.numel() for t in lora.values()) * 2 / 2**20:.1f} MiB); "
        f"median of {args.repeats} rounds",
        f"{'operation':<14}{'modelkeeper':>13}{'diffusers PEFT':>16}{'diffusers fused':>17}{'PEFT / mk':>11}"
        f"{'fused / mk':>12}{'target':>9}{'met':>5}",
    ]
    targets = {"apply": 0.3, "strength": 0.05, "remove": None}
    for op, target in targets.items():
        o, p, f = med["ours"][op], med["peft"][op], med["fused"][op]
        met = "-" if target is None else ("yes" if o <= target else "NO")
        goal = "-" if target is None else f"{target * 1e3:.0f} ms"
        lines.append(f"{op:<14}{o * 1e3:>10.1f} ms{p * 1e3:>13.1f} ms{f * 1e3:>14.1f} ms{p / o:>11.2f}"
                     f"{f / o:>12.2f}{goal:>9}{met:>5}")  # fmt: skip
    lines.append(f"{'unet step':<14}{ours_step * 1e3:>10.1f} ms{peft_step * 1e3:>13.1f} ms{'-':>17}"
                 f"{peft_step / ours_step:>11.2f}{'-':>12}   (no LoRA: {base_step * 1e3:.1f} ms)")  # fmt: skip
    lines.append(f"# modelkeeper apply = read {med['ours']['read'] * 1e3:.1f} ms + match and move factors "
                 f"{med['ours']['prepare'] * 1e3:.1f} ms + back up and patch {med['ours']['patch'] * 1e3:.1f} ms")  # fmt: skip
    lines.append(f"# removal restores the weights bitwise: modelkeeper {'yes' if exact else 'NO'}, "
                 f"diffusers fused {'yes' if fused_exact else 'no'} (unfused PEFT layers never touch them)")  # fmt: skip
    print_report(lines, args.out)


if __name__ == "__main__":
    main()
