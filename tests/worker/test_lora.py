"""LoRA patching on live tiny modules: every format applied, strength changed, removed bitwise,
cross-checked against diffusers' own fused LoRA, and refused when made for another base."""

from __future__ import annotations

import hashlib
import math
import shutil
from pathlib import Path
from typing import Any

import pytest
import torch
from safetensors.torch import load_file, save_file

from modelkeeper.formats.errors import UnsupportedFormat
from modelkeeper.protocol import CommandType, ErrorCode
from modelkeeper.testing import DemoManifest, make_text_encoder, make_unet
from modelkeeper.worker import InProcessWorker
from modelkeeper.worker.errors import AlreadyLoaded, WorkerNotLoaded
from modelkeeper.worker.fingerprint import differing, fingerprint, tensor_fingerprints
from modelkeeper.worker.lora import LoraIncompatible, LoraManager
from modelkeeper.worker.lora import manager as lora_manager

from .conftest import load_data

#: demo entry -> (base, text encoders it patches)
FORMATS = {
    "sd15-lora-kohya": ("sd1", ("clip_l",)),
    "sd15-lora-peft": ("sd1", ("clip_l",)),
    "sd15-loha": ("sd1", ()),
    "sd15-lokr": ("sd1", ()),
    "sdxl-lora-kohya": ("sdxl", ("clip_l", "clip_g")),
    "sdxl-lora-peft": ("sdxl", ("clip_l", "clip_g")),
}
#: the text encoders' roles, in the order of FORMATS' encoders
ENCODER_ROLES = ("text_encoder", "text_encoder_2")


pytestmark = pytest.mark.usefixtures("one_torch_thread")


def targets_for(
    base: str, encoders: tuple[str, ...] = ("clip_l",), device: str = "cpu"
) -> dict[str, torch.nn.Module]:
    found: dict[str, torch.nn.Module] = {"unet": make_unet(base).to(device)}  # type: ignore[arg-type]
    for role, kind in zip(ENCODER_ROLES, encoders, strict=False):
        found[role] = make_text_encoder(kind).to(device)  # type: ignore[arg-type]
    return found


def snapshot(targets: dict[str, torch.nn.Module]) -> dict[str, dict[str, torch.Tensor]]:
    return {role: {k: v.clone() for k, v in m.state_dict().items()} for role, m in targets.items()}


def assert_equal_to(targets: dict[str, torch.nn.Module], saved: dict[str, dict[str, torch.Tensor]]) -> None:
    for role, module in targets.items():
        for key, tensor in module.state_dict().items():
            assert torch.equal(tensor, saved[role][key]), f"{role}.{key}"


def changed(targets: dict[str, torch.nn.Module], saved: dict[str, dict[str, torch.Tensor]]) -> int:
    return sum(
        not torch.equal(t, saved[role][k]) for role, m in targets.items() for k, t in m.state_dict().items()
    )


@pytest.mark.parametrize("entry", list(FORMATS))
def test_apply_strength_remove(
    demo: DemoManifest, entry: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, worker_device: str
) -> None:
    """Apply; change the strength with no file read and no rebuild; remove: bitwise the original."""
    base, encoders = FORMATS[entry]
    targets = targets_for(base, encoders, worker_device)
    unet = targets["unet"]
    params = {name: (p, p.data_ptr()) for name, p in unet.named_parameters()}
    saved = snapshot(targets)
    prints = {role: fingerprint(m) for role, m in targets.items()}
    copy = shutil.copy(demo.path(entry), tmp_path / "lora.safetensors")
    manager = LoraManager(worker_device)
    report = manager.load("style", copy, targets)
    assert report.unmatched_keys == 0 and report.skipped_roles == []
    assert report.matched_keys == demo[entry].tensor_count
    assert report.params_patched == changed(targets, saved) > 0
    assert set(report.roles) == {"unet", *ENCODER_ROLES[: len(encoders)]}
    assert report.format == demo[entry].layout
    assert manager.memory()["backup_device_bytes"] > 0
    full = snapshot(targets)
    Path(copy).unlink()  # nothing may read the file again

    def no_read(*args: Any, **kwargs: Any) -> Any:
        raise AssertionError("the LoRA file was read again")

    monkeypatch.setattr(lora_manager, "read_lora_file", no_read)
    result = manager.set_strength("style", 0.5)
    assert result["previous"] == 1.0 and result["strength"] == 0.5
    assert targets["unet"] is unet
    for name, p in unet.named_parameters():
        assert params[name][0] is p and p.data_ptr() == params[name][1], name  # patched in place
    for role, module in targets.items():
        for key, tensor in module.state_dict().items():
            if not torch.equal(full[role][key], saved[role][key]):
                expected = saved[role][key] + 0.5 * (full[role][key] - saved[role][key])
                assert torch.allclose(tensor, expected, rtol=0, atol=1e-6), key
    manager.set_strength("style", 1.0)
    assert_equal_to(targets, full)  # re-derived from the originals: bitwise the same as first applied
    manager.set_strength("style", 0.0)
    assert_equal_to(targets, saved)
    removed = manager.remove("style")
    assert removed["params_restored"] == report.params_patched
    assert_equal_to(targets, saved)
    assert {role: fingerprint(m) for role, m in targets.items()} == prints
    assert manager.names() == [] and manager.memory()["backup_device_bytes"] == 0


@pytest.mark.parametrize(("entry", "pipeline"), [("sd15-lora-kohya", "sd1"), ("sdxl-lora-kohya", "sdxl"),
                                                 ("sdxl-lora-peft", "sdxl")])  # fmt: skip
def test_matches_diffusers_fused_lora(demo: DemoManifest, entry: str, pipeline: str) -> None:
    """diffusers' own loader (key conversion, alphas, PEFT layers, fuse) gives the same weights."""
    from diffusers.pipelines.stable_diffusion.pipeline_stable_diffusion import StableDiffusionPipeline
    from diffusers.pipelines.stable_diffusion_xl.pipeline_stable_diffusion_xl import (
        StableDiffusionXLPipeline,
    )

    ours, reference = make_unet(pipeline), make_unet(pipeline)  # type: ignore[arg-type]
    LoraManager().load("style", demo.path(entry), {"unet": ours}, strength=0.7)
    path = str(demo.path(entry))
    if pipeline == "sdxl":
        state, alphas = StableDiffusionXLPipeline.lora_state_dict(path, unet_config=reference.config)
    else:
        state, alphas = StableDiffusionPipeline.lora_state_dict(path)
    reference.load_lora_adapter(state, prefix="unet", network_alphas=alphas, adapter_name="ref")
    reference.fuse_lora(lora_scale=0.7)
    reference.unload_lora()
    want = reference.state_dict()
    for key, tensor in ours.state_dict().items():
        torch.testing.assert_close(tensor, want[key], rtol=0, atol=1e-6)


def test_lycoris_deltas_follow_their_formulas(demo: DemoManifest) -> None:
    key = "lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn1_to_k"
    module = "down_blocks.0.attentions.0.transformer_blocks.0.attn1.to_k.weight"
    for entry in ("sd15-loha", "sd15-lokr"):
        targets = targets_for("sd1", ())
        before = targets["unet"].state_dict()[module].clone()
        LoraManager().load("x", demo.path(entry), targets, strength=0.5)
        f = {
            k.removeprefix(key + "."): v.float()
            for k, v in load_file(demo.path(entry)).items()
            if k.startswith(key)
        }
        if entry == "sd15-loha":
            rank = f["hada_w1_b"].shape[0]
            delta = (f["hada_w1_a"] @ f["hada_w1_b"]) * (f["hada_w2_a"] @ f["hada_w2_b"]) * f["alpha"] / rank
        else:
            delta = torch.kron(f["lokr_w1"], f["lokr_w2"])  # full factors: alpha is not used
        after = targets["unet"].state_dict()[module]
        torch.testing.assert_close(after - before, 0.5 * delta, rtol=0, atol=1e-6)


def test_text_encoder_delta_and_role_strength(demo: DemoManifest) -> None:
    targets = targets_for("sd1")
    saved = snapshot(targets)
    manager = LoraManager()
    manager.load("style", demo.path("sd15-lora-kohya"), targets, strength=0.8, role_strength={"unet": 0.0})
    assert_equal_to({"unet": targets["unet"]}, {"unet": saved["unet"]})
    state = load_file(demo.path("sd15-lora-kohya"))
    key = "lora_te_text_model_encoder_layers_0_self_attn_q_proj"
    down, up = state[f"{key}.lora_down.weight"].float(), state[f"{key}.lora_up.weight"].float()
    scale = state[f"{key}.alpha"].item() / down.shape[0]
    encoder = targets["text_encoder"]
    name = next(n for n in encoder.state_dict() if n.endswith("layers.0.self_attn.q_proj.weight"))
    delta = encoder.state_dict()[name] - saved["text_encoder"][name]
    torch.testing.assert_close(delta, 0.8 * scale * (up @ down), rtol=0, atol=1e-6)
    manager.set_strength("style", 0.8, role_strength={})
    assert changed({"unet": targets["unet"]}, {"unet": saved["unet"]}) > 0


def test_several_loras_are_order_independent(demo: DemoManifest) -> None:
    targets = targets_for("sd1")
    saved = snapshot(targets)
    manager = LoraManager()
    manager.load("a", demo.path("sd15-lora-kohya"), targets, strength=0.6)
    manager.load("b", demo.path("sd15-lora-peft"), targets, strength=0.9)
    assert manager.names() == ["a", "b"]
    removed = manager.remove("a")
    assert removed["params_rederived"] > 0  # weights both patch
    only_b = targets_for("sd1")
    LoraManager().load("b", demo.path("sd15-lora-peft"), only_b, strength=0.9)
    assert_equal_to(targets, snapshot(only_b))
    manager.remove("b")
    assert_equal_to(targets, saved)
    with pytest.raises(WorkerNotLoaded):
        manager.remove("b")


def test_wrong_base_is_refused_and_nothing_changes(demo: DemoManifest, worker_device: str) -> None:
    for entry, base in (("sdxl-lora-kohya", "sd1"), ("sdxl-lora-peft", "sd1"), ("sd15-lora-kohya", "sdxl")):
        targets = targets_for(base, device=worker_device)
        prints = {role: fingerprint(m) for role, m in targets.items()}
        manager = LoraManager(worker_device)
        with pytest.raises(LoraIncompatible) as caught:
            manager.load("style", demo.path(entry), targets)
        assert caught.value.code is ErrorCode.INVALID_REQUEST
        assert "another base" in caught.value.message or "matches" in caught.value.message
        assert {role: fingerprint(m) for role, m in targets.items()} == prints, entry
        assert manager.names() == [] and manager.memory()["backup_device_bytes"] == 0


def test_no_matching_keys_is_refused(demo: DemoManifest) -> None:
    t5 = make_text_encoder("t5")
    before = fingerprint(t5)
    with pytest.raises(LoraIncompatible, match="none of its"):
        LoraManager().load("style", demo.path("sd15-loha"), {"unet": t5})
    assert fingerprint(t5) == before
    with pytest.raises(LoraIncompatible, match="none of its"):  # the LoHa patches only a UNet
        LoraManager().load("style", demo.path("sd15-loha"), {"text_encoder": make_text_encoder("clip_l")})


def test_skipped_roles_strict_and_duplicates(demo: DemoManifest) -> None:
    unet = make_unet("sdxl")
    manager = LoraManager()
    report = manager.load("style", demo.path("sdxl-lora-kohya"), {"unet": unet})
    assert report.skipped_roles == ["text_encoder", "text_encoder_2"] and report.unmatched_keys == 0
    with pytest.raises(AlreadyLoaded):
        manager.load("style", demo.path("sdxl-lora-kohya"), {"unet": unet})
    state = load_file(demo.path("sd15-lora-peft"))
    state["unet.not_a_layer.lora_A.weight"] = torch.zeros(4, 8)
    state["unet.not_a_layer.lora_B.weight"] = torch.zeros(8, 4)
    targets = targets_for("sd1")
    report = LoraManager().load("loose", state, targets)
    assert report.unmatched == ["unet.not_a_layer.lora_A.weight", "unet.not_a_layer.lora_B.weight"]
    fresh = targets_for("sd1")
    before = fingerprint(fresh["unet"])
    with pytest.raises(LoraIncompatible, match="only 72 of 74 keys"):
        LoraManager().load("strict", state, fresh, strict=True)
    few = {k: v for k, v in state.items() if "attn1.to_q" in k or "not_a_layer" in k}  # 8 of 10 keys match
    with pytest.raises(LoraIncompatible, match="only 8 of 10 keys"):
        LoraManager().load("few", few, fresh, min_match=0.9)
    assert LoraManager().load("few", few, fresh).matched_keys == 8
    assert fingerprint(fresh["unet"]) != before


def test_old_diffusers_names_use_diffusers_converters(demo: DemoManifest) -> None:
    from diffusers.utils.state_dict_utils import convert_state_dict_to_diffusers

    peft = load_file(demo.path("sd15-lora-peft"))
    old = convert_state_dict_to_diffusers(
        peft
    )  # unet ... to_q.lora.down.weight, text_encoder ... lora_linear_layer
    assert any(".lora.down." in k for k in old)
    a, b = targets_for("sd1"), targets_for("sd1")
    report = LoraManager().load("old", old, a)
    LoraManager().load("new", demo.path("sd15-lora-peft"), b)
    assert report.format == "diffusers-old" and report.unmatched_keys == 0
    assert_equal_to(a, snapshot(b))


def test_unsupported_and_broken_files(demo: DemoManifest, tmp_path: Path) -> None:
    state = load_file(demo.path("sd15-lora-kohya"))
    dora = dict(state)
    dora["lora_unet_down_blocks_0_attentions_0_proj_in.dora_scale"] = torch.ones(32)
    with pytest.raises(UnsupportedFormat, match="DoRA"):
        LoraManager().load("dora", dora, targets_for("sd1"))
    with pytest.raises(UnsupportedFormat, match="no LoRA keys"):
        LoraManager().load("none", {"some.weight": torch.zeros(2)}, targets_for("sd1"))
    broken = tmp_path / "broken.safetensors"
    broken.write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00{not json")
    with pytest.raises(Exception, match=r"broken\.safetensors: header is not valid JSON") as caught:
        LoraManager().load("broken", broken, targets_for("sd1"))
    assert caught.value.code is ErrorCode.INVALID_MODEL_FILE  # type: ignore[attr-defined]
    with pytest.raises(Exception, match="no such LoRA file"):
        LoraManager().load("gone", tmp_path / "gone.safetensors", targets_for("sd1"))


def locon_state(unet: torch.nn.Module) -> dict[str, torch.Tensor]:
    """A kohya LoCon for the 3x3 convolutions of the resnets: down [r, in, 3, 3], up [out, r, 1, 1]."""
    generator = torch.Generator().manual_seed(1)
    state: dict[str, torch.Tensor] = {}
    for name, conv in unet.named_modules():
        if isinstance(conv, torch.nn.Conv2d) and conv.kernel_size == (3, 3) and ".resnets." in name:
            key = "lora_unet_" + name.replace(".", "_")
            state[f"{key}.lora_down.weight"] = (
                torch.randn(4, conv.in_channels, 3, 3, generator=generator) * 0.05
            )
            state[f"{key}.lora_up.weight"] = (
                torch.randn(conv.out_channels, 4, 1, 1, generator=generator) * 0.05
            )
            state[f"{key}.alpha"] = torch.tensor(2.0)
    return state


def test_locon_conv_layers(tmp_path: Path) -> None:
    unet = make_unet("sd1")
    state = locon_state(unet)
    path = tmp_path / "locon.safetensors"
    save_file(state, str(path))
    saved = snapshot({"unet": unet})
    manager = LoraManager()
    report = manager.load("locon", path, {"unet": unet})
    assert report.params_patched == len(state) // 3 == 16 and report.unmatched_keys == 0
    name = "up_blocks.1.resnets.1.conv2"
    key = "lora_unet_" + name.replace(".", "_")
    up, down = state[f"{key}.lora_up.weight"].flatten(1), state[f"{key}.lora_down.weight"].flatten(1)
    weight = f"{name}.weight"
    delta = (up @ down).reshape(saved["unet"][weight].shape) * 2.0 / 4
    torch.testing.assert_close(unet.state_dict()[weight] - saved["unet"][weight], delta, rtol=0, atol=1e-6)
    manager.remove("locon")
    assert_equal_to({"unet": unet}, saved)


def test_channels_last_and_float16_weights(demo: DemoManifest, worker_device: str) -> None:
    """Weights in another memory format (optimize's channels_last) or dtype are patched and restored."""
    from modelkeeper.worker.optimize import optimize

    targets = targets_for("sd1", device=worker_device)
    optimize(targets["unet"], {"channels_last": True, "dtype": "float16"}, measure=False)
    conv = targets["unet"].get_submodule("down_blocks.0.resnets.0.conv1").weight
    assert conv.is_contiguous(memory_format=torch.channels_last) and not conv.is_contiguous()
    saved = snapshot(targets)
    manager = LoraManager(worker_device)
    manager.load("style", demo.path("sd15-lora-kohya"), targets, strength=0.5)
    report = manager.load("locon", locon_state(targets["unet"]), {"unet": targets["unet"]})
    assert report.params_patched == 16 and not torch.equal(
        conv, saved["unet"]["down_blocks.0.resnets.0.conv1.weight"]
    )
    assert conv.is_contiguous(memory_format=torch.channels_last)  # the layout is kept
    optimize(targets["unet"], {"dtype": "float32"}, measure=False)  # new storage and dtype under the LoRAs
    manager.set_strength("locon", 0.5)
    manager.remove_all()
    saved["unet"] = {k: v.float() for k, v in saved["unet"].items()}  # float16 -> float32 is exact
    assert_equal_to(targets, saved)


def test_failure_midway_rolls_back(demo: DemoManifest, monkeypatch: pytest.MonkeyPatch) -> None:
    targets = targets_for("sd1")
    saved = snapshot(targets)
    manager = LoraManager()
    manager.load("first", demo.path("sd15-lora-peft"), targets, strength=0.5)
    patched = snapshot(targets)
    calls = {"n": 0}
    original = lora_manager._Patched.rederive

    def flaky(state: Any) -> None:
        calls["n"] += 1
        if calls["n"] == 10:
            raise RuntimeError("device lost")
        original(state)

    monkeypatch.setattr(lora_manager._Patched, "rederive", flaky)
    with pytest.raises(RuntimeError, match="device lost"):
        manager.load("second", demo.path("sd15-lora-kohya"), targets)
    monkeypatch.undo()
    assert manager.names() == ["first"]
    assert_equal_to(targets, patched)
    manager.remove("first")
    assert_equal_to(targets, saved)
    with pytest.raises(RuntimeError, match="cancelled"):
        manager.load("third", demo.path("sd15-lora-kohya"), targets, check=_cancel)
    assert_equal_to(targets, saved) if not manager.names() else pytest.fail("cancelled load kept")


def _cancel() -> None:
    raise RuntimeError("cancelled")


def test_on_models_the_worker_loaded(inproc: InProcessWorker, demo: DemoManifest) -> None:
    """The worker's modules (float16, their tensors views of the mapped file on a CPU worker) are
    patched in place and restored; the file on disk is never written."""
    file_hash = hashlib.sha256(demo.path("sdxl-unet").read_bytes()).hexdigest()
    inproc.call(CommandType.LOAD_UNET, load_data(demo["sdxl-unet"], demo.root))
    inproc.call(CommandType.LOAD_ENCODER, load_data(demo["clip-g"], demo.root))
    targets = {"unet": inproc.module("sdxl-unet"), "text_encoder_2": inproc.module("clip-g")}
    saved = snapshot(targets)
    prints = {role: fingerprint(m) for role, m in targets.items()}
    manager = LoraManager(inproc.service.device)
    report = manager.load("style", demo.path("sdxl-lora-kohya"), targets, strength=0.75)
    assert (
        report.skipped_roles == ["text_encoder"]
        and report.params_patched == changed(targets, saved) == 48 + 6
    )
    manager.set_strength("style", 0.25)
    manager.remove("style")
    assert_equal_to(targets, saved)
    assert {role: fingerprint(m) for role, m in targets.items()} == prints
    assert hashlib.sha256(demo.path("sdxl-unet").read_bytes()).hexdigest() == file_hash


def test_fingerprint_sees_values_dtypes_and_names() -> None:
    a, b = make_unet("sd1"), make_unet("sd1")
    assert fingerprint(a) == fingerprint(b) and fingerprint(a).startswith("blake3:")
    before = tensor_fingerprints(a)
    with torch.no_grad():
        a.conv_in.weight[0, 0, 0, 0] += 2**-10
    assert fingerprint(a) != fingerprint(b)
    assert differing(before, tensor_fingerprints(a)) == ["conv_in.weight"]
    assert fingerprint(b.to(torch.bfloat16)) != fingerprint(make_unet("sd1"))
    odd = torch.nn.Module()
    odd.register_buffer("scalar", torch.tensor(1.5))
    odd.register_buffer("strided", torch.arange(12.0).reshape(3, 4).t())
    same = torch.nn.Module()
    same.register_buffer("scalar", torch.tensor(1.5))
    same.register_buffer("strided", torch.arange(12.0).reshape(3, 4).t().contiguous())
    assert fingerprint(odd) == fingerprint(same)  # values and layout-free bytes, not strides
    same.register_buffer("scalar_", torch.tensor(1.5))
    assert fingerprint(odd) != fingerprint(same)


def test_detach_forgets_an_unloaded_module(demo: DemoManifest) -> None:
    targets = targets_for("sd1")
    manager = LoraManager()
    manager.load("style", demo.path("sd15-lora-kohya"), targets)
    assert manager.detach(targets["text_encoder"]) == ["style"]
    assert manager.loaded()[0]["params_patched"] == 48  # the UNet's layers only
    assert manager.detach(targets["unet"]) == ["style"]
    assert manager.names() == []


# ----------------------------------------------------------------------------- Flux


@pytest.fixture(scope="module")
def flux_factory() -> Any:
    from diffusers.models.transformers.transformer_flux import FluxTransformer2DModel

    def build() -> torch.nn.Module:
        torch.manual_seed(0)
        return FluxTransformer2DModel(
            patch_size=1, in_channels=16, num_layers=1, num_single_layers=1, attention_head_dim=16,
            num_attention_heads=2, joint_attention_dim=32, pooled_projection_dim=32, guidance_embeds=True,
            axes_dims_rope=(4, 6, 6),
        ).eval()  # fmt: skip

    return build


FLUX_KOHYA = {  # sd-scripts name -> (out rows, in features) of the tiny model
    "double_blocks_0_img_attn_qkv": (96, 32), "double_blocks_0_img_attn_proj": (32, 32),
    "double_blocks_0_img_mlp_0": (128, 32), "double_blocks_0_img_mlp_2": (32, 128),
    "double_blocks_0_img_mod_lin": (192, 32), "double_blocks_0_txt_attn_qkv": (96, 32),
    "double_blocks_0_txt_attn_proj": (32, 32), "double_blocks_0_txt_mlp_0": (128, 32),
    "double_blocks_0_txt_mlp_2": (32, 128), "double_blocks_0_txt_mod_lin": (192, 32),
    "single_blocks_0_linear1": (224, 32), "single_blocks_0_linear2": (32, 160),
    "single_blocks_0_modulation_lin": (96, 32), "img_in": (32, 16), "txt_in": (32, 32),
    "time_in_in_layer": (32, 256), "time_in_out_layer": (32, 32), "vector_in_in_layer": (32, 32),
    "guidance_in_in_layer": (32, 256), "final_layer_linear": (16, 32), "final_layer_adaLN_modulation_1": (64, 32),
}  # fmt: skip


def flux_kohya_lora(rank: int = 4) -> dict[str, torch.Tensor]:
    generator = torch.Generator().manual_seed(2)
    state: dict[str, torch.Tensor] = {}
    for name, (rows, cols) in FLUX_KOHYA.items():
        state[f"lora_unet_{name}.lora_down.weight"] = torch.randn(rank, cols, generator=generator) * 0.1
        state[f"lora_unet_{name}.lora_up.weight"] = torch.randn(rows, rank, generator=generator) * 0.1
        state[f"lora_unet_{name}.alpha"] = torch.tensor(float(rank) / 2)
    return state


def test_flux_kohya_names_and_splits(flux_factory: Any) -> None:
    from diffusers.loaders.lora_conversion_utils import _convert_kohya_flux_lora_to_diffusers

    flux = flux_factory()
    saved = snapshot({"transformer": flux})
    state = flux_kohya_lora()
    manager = LoraManager()
    report = manager.load("flux", state, {"transformer": flux})
    assert report.unmatched_keys == 0 and report.matched_keys == len(state)
    after = flux.state_dict()
    # diffusers' converter (double blocks: its single-block split sizes are those of the full model)
    double = {k: v for k, v in state.items() if "double_blocks" in k}
    converted = _convert_kohya_flux_lora_to_diffusers(dict(double))
    for key, lora_a in converted.items():
        if not key.endswith("lora_A.weight"):
            continue
        module = key.removeprefix("transformer.").removesuffix(".lora_A.weight")
        delta = converted[key.replace("lora_A", "lora_B")] @ lora_a
        got = after[f"{module}.weight"] - saved["transformer"][f"{module}.weight"]
        torch.testing.assert_close(got, delta, rtol=0, atol=1e-6)
    # single block linear1 -> q, k, v, proj_mlp by rows; adaLN (shift, scale) -> (scale, shift)
    down, up = (
        state["lora_unet_single_blocks_0_linear1.lora_down.weight"],
        state["lora_unet_single_blocks_0_linear1.lora_up.weight"],
    )
    full = 0.5 * up @ down
    got = (
        after["single_transformer_blocks.0.proj_mlp.weight"]
        - saved["transformer"]["single_transformer_blocks.0.proj_mlp.weight"]
    )
    torch.testing.assert_close(got, full[96:], rtol=0, atol=1e-6)
    down, up = (
        state["lora_unet_final_layer_adaLN_modulation_1.lora_down.weight"],
        state["lora_unet_final_layer_adaLN_modulation_1.lora_up.weight"],
    )
    ada = 0.5 * up @ down
    got = after["norm_out.linear.weight"] - saved["transformer"]["norm_out.linear.weight"]
    torch.testing.assert_close(got, torch.cat([ada[32:], ada[:32]]), rtol=0, atol=1e-6)
    manager.set_strength("flux", 0.25)
    manager.remove("flux")
    assert_equal_to({"transformer": flux}, saved)


def test_flux_bfl_names_and_wrong_model(flux_factory: Any) -> None:
    state = {k.replace("lora_unet_", "diffusion_model.").replace(".lora_down.", ".lora_A.").replace(".lora_up.", ".lora_B."): v
             for k, v in flux_kohya_lora().items() if not k.endswith(".alpha")}  # fmt: skip
    state = {(k.split(".", 1)[0] + "." + _bfl(k.split(".", 1)[1])): v for k, v in state.items()}
    flux = flux_factory()
    saved = snapshot({"transformer": flux})
    report = LoraManager().load("bfl", state, {"transformer": flux})
    kohya = LoraManager().load("kohya", flux_kohya_lora(), {"transformer": flux_factory()})
    assert report.unmatched_keys == 0 and report.params_patched == kohya.params_patched == 28
    assert not math.isnan(float(flux.proj_out.weight.detach().sum()))
    fresh = flux_factory()
    assert changed({"transformer": fresh}, saved) == 0
    with pytest.raises(LoraIncompatible):
        LoraManager().load("bfl", state, {"unet": make_unet("sd1")})


def _bfl(name: str) -> str:
    """``double_blocks_0_img_attn_qkv.lora_A.weight`` -> ``double_blocks.0.img_attn.qkv.lora_A.weight``."""
    module, _, suffix = name.partition(".")
    for flat, dotted in (("double_blocks_0_", "double_blocks.0."), ("single_blocks_0_", "single_blocks.0."),
                         ("_attn_qkv", "_attn.qkv"), ("_attn_proj", "_attn.proj"), ("_mlp_", "_mlp."),
                         ("_mod_lin", "_mod.lin"), ("modulation_lin", "modulation.lin"),
                         ("final_layer_adaLN_modulation_1", "final_layer.adaLN_modulation.1"),
                         ("final_layer_linear", "final_layer.linear"), ("_in_layer", ".in_layer"),
                         ("_out_layer", ".out_layer")):  # fmt: skip
        module = module.replace(flat, dotted)
    return f"{module}.{suffix}"
