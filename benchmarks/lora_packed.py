"""A LoRA on a packed (fp8) Flux-size transformer: apply, strength, remove and the step it costs,
against the same LoRA fused into the bf16 model, in the same run.

Usage: python benchmarks/lora_packed.py [--device cuda:0] [--blocks 19,38] [--rank 16] [--repeats 3]
       [--steps 5] [--out FILE]
       python benchmarks/lora_packed.py --tiny      (the tiny demo Flux on the CPU: checks the script runs)

The transformer is Flux-dev's (the shipped ``flux_dev/transformer`` config; ``--blocks D,S`` keeps D
double and S single blocks) with random bf16 weights made on the device. ``fp8`` is the same model
packed as a ``storage_dtype=float8_e4m3fn`` load packs it (``storage.plan_storage`` and the decode
hooks), so GGUF models take LoRAs by the same path. The LoRA (kohya keys, diffusers' module names)
has rank ``--rank`` on every linear layer of the blocks.

Measured per form: ``LoraManager.load`` (read, match, factors to the device, then: bf16 fused in
place with a backup; fp8 hooked, nothing written), ``set_strength``, ``remove`` (each the median of
``--repeats``); one denoising step at 1024x1024 (4096 image tokens, 512 text tokens) without and with
the LoRA (median of ``--steps`` after two warm-ups); the device bytes with the LoRA on; whether the
fingerprint after removal is the one before; the cosine of the fp8 and bf16 outputs with the LoRA.
The fused bf16 step pays nothing for the LoRA; the fp8 step pays one ``up @ down`` product per
patched layer, added to the weight its hook decodes anyway.
"""

from __future__ import annotations

import argparse
import gc
import tempfile
from datetime import date
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import save_file

from _report import print_report
from _timing import median_seconds, medians, switch_rounds
from _weights import random_weights
from modelkeeper.formats.known_configs import load_known_config
from modelkeeper.worker import storage
from modelkeeper.worker.fingerprint import fingerprint
from modelkeeper.worker.lora import LoraManager, LoraReport
from modelkeeper.worker.validate import probes

GB = 1e9


def allocated(dev: torch.device) -> int:
    return int(torch.cuda.memory_allocated(dev)) if dev.type == "cuda" else 0


def skeleton(tiny: bool, blocks: tuple[int, int]) -> torch.nn.Module:
    """The transformer's modules: the tiny demo Flux (real bf16 weights, on the host), or Flux-dev's
    config with ``blocks`` on the meta device (no memory yet)."""
    if tiny:
        from modelkeeper.testing import make_transformer

        return make_transformer("flux", dtype=torch.bfloat16)
    from accelerate import init_empty_weights
    from diffusers.models.transformers.transformer_flux import FluxTransformer2DModel

    config = {k: v for k, v in load_known_config("flux_dev", "transformer").items() if not k.startswith("_")}
    config["num_layers"], config["num_single_layers"] = blocks
    with init_empty_weights():
        module: torch.nn.Module = FluxTransformer2DModel(**config)
    return module


def build(tiny: bool, blocks: tuple[int, int], dev: torch.device) -> torch.nn.Module:
    """The bf16 transformer with random weights drawn on the device (the same for every call)."""
    module = skeleton(tiny, blocks)
    if not tiny:
        module = random_weights(module, dev, torch.bfloat16)
    return module.eval().requires_grad_(False)


def pack_fp8(module: torch.nn.Module) -> None:
    """Pack ``module`` as a ``storage_dtype=float8_e4m3fn`` load does: fp8 weights, decode hooks."""
    state = dict(module.state_dict())
    packed, plan = storage.plan_storage(module, state, compute=torch.bfloat16, storage=torch.float8_e4m3fn)
    del state
    module.load_state_dict(packed, assign=True)
    storage.attach(module, plan)


def make_lora(module: torch.nn.Module, rank: int) -> dict[str, torch.Tensor]:
    """kohya keys on every linear layer of the blocks, in bf16 on the host."""
    generator = torch.Generator().manual_seed(1)
    out: dict[str, torch.Tensor] = {}
    for name, layer in module.named_modules():
        if isinstance(layer, torch.nn.Linear) and "transformer_blocks" in name:
            key = "lora_unet_" + name.replace(".", "_")
            down = torch.randn(rank, layer.in_features, generator=generator) * layer.in_features**-0.5
            out[f"{key}.lora_down.weight"] = down.to(torch.bfloat16)
            out[f"{key}.lora_up.weight"] = (
                torch.randn(layer.out_features, rank, generator=generator) * 0.02
            ).to(torch.bfloat16)
            out[f"{key}.alpha"] = torch.tensor(float(rank))
    return out


def time_step(
    module: torch.nn.Module, dev: torch.device, tiny: bool, steps: int
) -> tuple[float, torch.Tensor]:
    (probe,) = probes(module, resolution=256 if tiny else 1024, tokens=8 if tiny else 512, seed=0)
    with torch.inference_mode():
        seconds = median_seconds(probe.run, dev, steps, warmups=2)
        out = probe.run()
    return seconds, out.float().flatten().cpu()


def measure(form: str, lora: Path, args: argparse.Namespace, dev: torch.device) -> dict[str, Any]:
    module = build(args.tiny, args.blocks, dev)
    if form == "fp8":
        pack_fp8(module)
    before = fingerprint(module)
    bare_s, _ = time_step(module, dev, args.tiny, args.steps)
    manager = LoraManager(dev)
    reports: list[LoraReport] = []
    rounds = medians(
        switch_rounds(
            dev,
            args.repeats,
            apply=lambda i: reports.append(manager.load("l", lora, {"transformer": module})),
            strength=lambda i: manager.set_strength("l", 0.5),
            remove=lambda i: manager.remove("l"),
        )
    )
    manager.load("l", lora, {"transformer": module})
    lora_s, out = time_step(module, dev, args.tiny, args.steps)
    held = allocated(dev)
    manager.remove("l")
    exact = fingerprint(module) == before
    return {"bare_s": bare_s, "lora_s": lora_s, "apply_s": rounds["apply"], "strength_s": rounds["strength"],
            "remove_s": rounds["remove"], "bytes": held, "exact": exact, "out": out,
            "params": reports[-1].params_patched}  # fmt: skip


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--tiny", action="store_true", help="the tiny demo Flux on the CPU")
    parser.add_argument("--device", default="cuda:0")
    parser.add_argument("--blocks", default="19,38", help="double,single blocks kept (Flux-dev: 19,38)")
    parser.add_argument("--rank", type=int, default=16)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--steps", type=int, default=5)
    parser.add_argument("--out", default=None)
    args = parser.parse_args()
    dev = torch.device("cpu" if args.tiny else args.device)
    if args.tiny:
        torch.set_num_threads(min(4, torch.get_num_threads()))
    args.blocks = tuple(int(b) for b in args.blocks.split(","))
    with tempfile.TemporaryDirectory() as tmp:
        lora = Path(tmp) / "lora.safetensors"
        save_file(make_lora(skeleton(args.tiny, args.blocks), args.rank), str(lora))
        results = {}
        for form in ("bf16", "fp8"):
            results[form] = measure(form, lora, args, dev)
            gc.collect()  # the form's model goes before the next is built
            if dev.type == "cuda":
                torch.cuda.empty_cache()
    name = "cpu" if dev.type == "cpu" else torch.cuda.get_device_name(dev)
    cos = float(torch.nn.functional.cosine_similarity(results["fp8"]["out"], results["bf16"]["out"], dim=0))
    lines = [f"# lora_packed — {date.today().isoformat()} — {name}, Flux transformer "
             f"{'tiny' if args.tiny else f'real shapes ({args.blocks[0]}+{args.blocks[1]} blocks)'}, rank {args.rank}, "
             f"{results['bf16']['params']} layers patched",
             f"{'form':<6}{'apply ms':>10}{'strength ms':>13}{'remove ms':>11}{'step ms':>9}{'+LoRA ms':>10}"
             f"{'overhead':>10}{'device GB':>11}  exact removal"]  # fmt: skip
    for form, r in results.items():
        lines.append(f"{form:<6}{r['apply_s'] * 1e3:>10.1f}{r['strength_s'] * 1e3:>13.2f}{r['remove_s'] * 1e3:>11.1f}"
                     f"{r['bare_s'] * 1e3:>9.1f}{r['lora_s'] * 1e3:>10.1f}{r['lora_s'] / r['bare_s'] - 1:>10.1%}"
                     f"{r['bytes'] / GB:>11.2f}  {'yes' if r['exact'] else 'NO'}")  # fmt: skip
    lines.append(f"cosine of the outputs with the LoRA, fp8 against bf16: {cos:.5f}")
    print_report(lines, args.out)


if __name__ == "__main__":
    main()
