"""LoRAs on models whose weights stay packed (fp8, scaled fp8, GGUF): applied as the layers decode
their weights, so the packed bytes never change. Each case is checked against the same LoRA fused
into a plain float32 twin holding the packed model's decoded weights (the same numbers, so the
outputs agree to rounding), and, for fp8 and Q8_0, against the LoRA on the full-precision model."""

from __future__ import annotations

import copy
import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import torch
from safetensors.torch import save_file

from modelkeeper.testing import DemoManifest, component_config, make_transformer, make_unet
from modelkeeper.testing.fp8_files import packed_state
from modelkeeper.testing.gguf_files import write_gguf
from modelkeeper.worker import InProcessWorker
from modelkeeper.worker.lora import LoraManager
from modelkeeper.worker.storage import plan_of, stored_forms

from .conftest import load_data

pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.fixture(scope="module")
def refs() -> dict[str, torch.nn.Module]:
    return {"sdxl": make_unet("sdxl"), "flux": make_transformer("flux")}


@pytest.fixture
def worker(worker_device: str) -> Iterator[InProcessWorker]:
    """An in-process worker; on CUDA with TF32 off for the test, since the float32 twin these
    tests compare with runs on the CPU and TF32's rounding (about 1e-3) would hide the LoRA's."""
    kept = torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = False
    try:
        with InProcessWorker(worker_device) as w:
            yield w
    finally:
        torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = kept


def write_packed(path: Path, ref: torch.nn.Module, form: str, arch: str = "sdxl") -> Path:
    """``ref`` as a file of ``form``: an fp8 form (safetensors) or ``gguf:<type>`` (of ``arch``)."""
    config = component_config(ref)
    if form.startswith("gguf:"):
        path = path.with_suffix(".gguf")
        write_gguf(path, ref.state_dict(), form.removeprefix("gguf:"), arch=arch, config=config)
        return path
    save_file(
        packed_state(ref.state_dict(), form), str(path), metadata={"modelkeeper.config": json.dumps(config)}
    )
    return path


def outputs(module: torch.nn.Module) -> torch.Tensor:
    from modelkeeper.worker.validate import probes

    with torch.inference_mode():
        return probes(module, seed=1)[0].run().float().flatten().cpu()


def cosine(a: torch.Tensor, b: torch.Tensor) -> float:
    return float(torch.nn.functional.cosine_similarity(a, b, dim=0))


def decoded_twin(module: torch.nn.Module, ref: torch.nn.Module) -> torch.nn.Module:
    """A plain float32 copy of ``ref`` holding ``module``'s weights as its layers decode them."""
    plan = plan_of(module)
    assert plan is not None
    state = {}
    for key, tensor in module.state_dict().items():
        owner, _, attr = key.rpartition(".")
        packed = plan.packed.get(owner, {}).get(attr)
        state[key] = (packed.decode(tensor, torch.float32) if packed else tensor.float()).cpu()
    twin = copy.deepcopy(ref)
    twin.load_state_dict(state)
    return twin


def assert_follows(got: torch.Tensor, want: torch.Tensor, bare: torch.Tensor) -> None:
    """``got`` is ``want`` up to rounding: their difference is a small part of the LoRA's effect."""
    effect = float((want - bare).norm())
    assert effect > 1e-4 * float(bare.norm())
    assert float((got - want).norm()) <= 0.01 * effect


def fingerprint(worker: InProcessWorker, name: str) -> str:
    info = worker.call("model.get_model_info", {"name": name, "fingerprint": True})
    return str(info["models"][0]["fingerprint"])


def check_apply_strength_remove(
    worker: InProcessWorker, twin: torch.nn.Module, lora: Path, targets: dict[str, str]
) -> dict[str, Any]:
    """Apply ``lora`` to the loaded model and to ``twin``; change its strength; remove it: the outputs
    follow the twin's, and after removal the fingerprint and the outputs are the original ones."""
    role = next(iter(targets))
    module = worker.module(targets[role])
    before, bare = fingerprint(worker, targets[role]), outputs(module)
    stored = {k: v.clone() for k, v in module.state_dict().items()}
    manager = LoraManager()
    manager.load("style", lora, {role: twin})
    report = worker.call("model.load_lora", {"name": "style", "path": str(lora), "targets": targets})
    assert report["params_patched"] > 0 and report["backup_bytes"] == 0  # packed weights keep no backup
    assert_follows(outputs(module), outputs(twin), bare)
    assert fingerprint(worker, targets[role]) == before  # the packed bytes are never written
    worker.call("model.set_lora_strength", {"name": "style", "strength": 0.5})
    manager.set_strength("style", 0.5)
    assert_follows(outputs(module), outputs(twin), bare)
    worker.call("model.set_lora_strength", {"name": "style", "strength": 0.0})
    assert torch.equal(outputs(module), bare)  # a zero strength adds nothing
    worker.call("model.set_lora_strength", {"name": "style", "strength": 0.5})
    removed = worker.call("model.unload_lora", {"name": "style"})
    assert removed["params_restored"] == report["params_patched"]
    assert fingerprint(worker, targets[role]) == before
    assert torch.equal(outputs(module), bare)
    assert all(torch.equal(t, stored[k]) for k, t in module.state_dict().items())
    return report


CASES = [
    ("float8_e4m3fn", "sdxl-lora-kohya"),
    ("float8_e4m3fn", "sdxl-lora-peft"),
    ("scaled_float8_e4m3fn", "sdxl-lora-kohya"),
    ("gguf:Q8_0", "sdxl-lora-kohya"),
    ("gguf:Q8_0", "sdxl-lora-peft"),
    ("gguf:Q4_0", "sdxl-lora-kohya"),
    ("gguf:Q4_0", "sdxl-lora-peft"),
]


@pytest.mark.parametrize(("form", "entry"), CASES)
def test_lora_on_a_packed_unet(
    worker: InProcessWorker, refs: dict[str, torch.nn.Module], demo: DemoManifest, tmp_path: Path,
    form: str, entry: str,
) -> None:  # fmt: skip
    ref = refs["sdxl"]
    path = write_packed(tmp_path / "unet.safetensors", ref, form)
    result = worker.call(
        "model.load_model", {"name": "m", "path": str(path), "type": "unet", "dtype": "float32"}
    )
    assert result["storage"] == form
    module = worker.module("m")
    report = check_apply_strength_remove(worker, decoded_twin(module, ref), demo.path(entry), {"unet": "m"})
    packed = stored_forms(module)
    assert any(f"{layer}.weight" in packed for layer in _patched_layers(module, demo.path(entry)))
    assert report["skipped_roles"] == ["text_encoder", "text_encoder_2"]


def _patched_layers(module: torch.nn.Module, lora: Path) -> list[str]:
    from modelkeeper.worker.lora import parse_lora, read_lora_file, resolve

    state, metadata = read_lora_file(lora)
    _fmt, layers, _ignored = parse_lora(state, metadata, str(lora))
    return [m.module for m in resolve(layers, {"unet": module})[0]]


@pytest.mark.parametrize("entry", ["sd15-loha", "sd15-lokr"])
def test_lycoris_on_a_storage_cast(worker: InProcessWorker, demo: DemoManifest, entry: str) -> None:
    """A model cast down on load (``storage_dtype``) takes LoHa and LoKr deltas the same way."""
    data = load_data(
        demo["sd15-unet"], demo.root, type="unet", dtype="float32", storage_dtype="float8_e4m3fn"
    )
    assert worker.call("model.load_model", data)["storage"] == "float8_e4m3fn"
    module = worker.module(data["name"])
    twin = decoded_twin(module, make_unet("sd1"))
    check_apply_strength_remove(worker, twin, demo.path(entry), {"unet": data["name"]})


def flux_lora(module: torch.nn.Module, rank: int = 4) -> dict[str, torch.Tensor]:
    """A kohya LoRA (diffusers' names, flattened) on every linear layer of ``module``'s blocks."""
    generator = torch.Generator().manual_seed(3)
    state: dict[str, torch.Tensor] = {}
    for name, layer in module.named_modules():
        if isinstance(layer, torch.nn.Linear) and "transformer_blocks" in name:
            key = "lora_unet_" + name.replace(".", "_")
            state[f"{key}.lora_down.weight"] = torch.randn(rank, layer.in_features, generator=generator) * 0.2
            state[f"{key}.lora_up.weight"] = torch.randn(layer.out_features, rank, generator=generator) * 0.2
            state[f"{key}.alpha"] = torch.tensor(float(rank))
    return state


@pytest.mark.parametrize("form", ["float8_e4m3fn", "gguf:Q8_0"])
def test_lora_on_packed_matches_the_lora_on_full_precision(
    worker: InProcessWorker, refs: dict[str, torch.nn.Module], tmp_path: Path, form: str
) -> None:
    ref = refs["flux"]
    path = write_packed(tmp_path / "flux.safetensors", ref, form, arch="flux")
    data = {"name": "flux", "path": str(path), "type": "transformer", "dtype": "float32"}
    assert worker.call("model.load_model", data)["storage"] == form
    lora = tmp_path / "flux-lora.safetensors"
    save_file(flux_lora(ref), str(lora))
    full = copy.deepcopy(ref)
    manager = LoraManager()
    manager.load("style", lora, {"transformer": full})
    report = worker.call(
        "model.load_lora", {"name": "style", "path": str(lora), "targets": {"transformer": "flux"}}
    )
    assert report["unmatched_keys"] == 0
    module = worker.module("flux")
    assert cosine(outputs(module), outputs(full)) >= 0.999
    assert cosine(outputs(module), outputs(ref)) < 0.999  # the LoRA's effect is larger than the rounding
    worker.call("model.set_lora_strength", {"name": "style", "strength": 0.3})
    manager.set_strength("style", 0.3)
    assert cosine(outputs(module), outputs(full)) >= 0.999
    worker.call("model.unload_lora", {"name": "style"})


def test_a_failure_midway_leaves_no_hook(
    worker: InProcessWorker, refs: dict[str, torch.nn.Module], demo: DemoManifest, tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> None:  # fmt: skip
    from modelkeeper.worker.lora import manager as lora_manager

    path = write_packed(tmp_path / "unet.safetensors", refs["sdxl"], "float8_e4m3fn")
    worker.call("model.load_model", {"name": "m", "path": str(path), "type": "unet", "dtype": "float32"})
    module = worker.module("m")
    bare = outputs(module)
    calls = {"n": 0}
    original = lora_manager._Decoded.rederive

    def flaky(state: Any) -> None:
        calls["n"] += 1
        if calls["n"] == 5:
            raise RuntimeError("device lost")
        original(state)

    monkeypatch.setattr(lora_manager._Decoded, "rederive", flaky)
    manager = LoraManager()
    with pytest.raises(RuntimeError, match="device lost"):
        manager.load("style", demo.path("sdxl-lora-kohya"), {"unet": module})
    assert manager.names() == [] and calls["n"] > 5  # the undo went through the hooked weights
    assert not any("_modelkeeper_adjust" in layer.__dict__ for layer in module.modules())
    assert torch.equal(outputs(module), bare)


def fused_flux_lora(module: torch.nn.Module, rank: int = 4) -> dict[str, torch.Tensor]:
    """A kohya LoRA in sd-scripts' Flux names, whose fused layers split over several packed weights
    (q, k, v of both block kinds, the single blocks' MLP input) or swap halves (the last modulation)."""
    block, single = module.transformer_blocks[0], module.single_transformer_blocks[0]  # type: ignore[index]
    fused = {
        "double_blocks_0_img_attn_qkv": [block.attn.to_q, block.attn.to_k, block.attn.to_v],
        "single_blocks_0_linear1": [single.attn.to_q, single.attn.to_k, single.attn.to_v, single.proj_mlp],
        "final_layer_adaLN_modulation_1": [module.norm_out.linear],
    }
    generator = torch.Generator().manual_seed(4)
    state: dict[str, torch.Tensor] = {}
    for name, layers in fused.items():
        rows, cols = sum(layer.out_features for layer in layers), layers[0].in_features
        state[f"lora_unet_{name}.lora_down.weight"] = torch.randn(rank, cols, generator=generator) * 0.2
        state[f"lora_unet_{name}.lora_up.weight"] = torch.randn(rows, rank, generator=generator) * 0.2
    return state


@pytest.mark.parametrize("form", ["gguf:Q8_0", "scaled_float8_e4m3fn"])
def test_fused_flux_layers_split_over_packed_weights(
    worker: InProcessWorker, refs: dict[str, torch.nn.Module], tmp_path: Path, form: str
) -> None:
    """Row slices of one fused delta land on the packed weights by their logical shapes (a GGUF
    weight's stored shape is its bytes)."""
    ref = refs["flux"]
    path = write_packed(tmp_path / "flux.safetensors", ref, form, arch="flux")
    data = {"name": "flux", "path": str(path), "type": "transformer", "dtype": "float32"}
    assert worker.call("model.load_model", data)["storage"] == form
    module = worker.module("flux")
    assert {"norm_out.linear.weight", "transformer_blocks.0.attn.to_q.weight"} <= set(stored_forms(module))
    lora = tmp_path / "fused.safetensors"
    save_file(fused_flux_lora(ref), str(lora))
    check_apply_strength_remove(worker, decoded_twin(module, ref), lora, {"transformer": "flux"})


def test_two_loras_on_a_packed_model(
    worker: InProcessWorker, refs: dict[str, torch.nn.Module], demo: DemoManifest, tmp_path: Path
) -> None:
    """Two LoRAs on the same packed weights add up; removing one leaves exactly the other."""
    ref = refs["sdxl"]
    path = write_packed(tmp_path / "unet.safetensors", ref, "gguf:Q8_0")
    worker.call("model.load_model", {"name": "m", "path": str(path), "type": "unet", "dtype": "float32"})
    module = worker.module("m")
    before, bare = fingerprint(worker, "m"), outputs(module)
    twin = decoded_twin(module, ref)
    manager = LoraManager()
    for name, entry, strength in (("a", "sdxl-lora-kohya", 0.7), ("b", "sdxl-lora-peft", 1.5)):
        manager.load(name, demo.path(entry), {"unet": twin}, strength=strength)
        data = {"name": name, "path": str(demo.path(entry)), "targets": {"unet": "m"}, "strength": strength}
        worker.call("model.load_lora", data)
    assert_follows(outputs(module), outputs(twin), bare)
    worker.call("model.unload_lora", {"name": "a"})
    manager.remove("a")
    assert_follows(outputs(module), outputs(twin), bare)
    assert worker.call("model.unload_lora", {"name": "b"})["params_restored"] > 0
    assert fingerprint(worker, "m") == before and torch.equal(outputs(module), bare)
