"""Loading every kind from every source form, through the real worker subprocess and in-process."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from modelkeeper.protocol import CommandType, ErrorCode, ProtocolError, WorkerProcess
from modelkeeper.testing import DemoManifest
from modelkeeper.worker import InProcessWorker

from .conftest import assert_same_weights, load_data, reference, unique_bytes

COMMAND = {
    "unet": CommandType.LOAD_UNET,
    "vae": CommandType.LOAD_VAE,
    "text_encoder": CommandType.LOAD_ENCODER,
}

#: (manifest entry, kind to load, extra request fields)
CASES = [
    ("sd15-unet", "unet", {}),
    ("sd15-inpaint-unet", "unet", {}),
    ("sd2-unet", "unet", {}),
    ("sdxl-unet", "unet", {}),
    ("sdxl-refiner-unet", "unet", {}),
    ("sd15-unet-folder", "unet", {}),
    ("sd15-vae", "vae", {}),
    ("sdxl-vae", "vae", {}),
    ("flux-vae", "vae", {}),
    ("flux-vae-folder", "vae", {}),
    ("clip-l", "text_encoder", {}),
    ("clip-g", "text_encoder", {}),
    ("t5", "text_encoder", {}),
    ("t5-folder", "text_encoder", {}),
]


def test_handshake(worker: WorkerProcess, worker_device: str) -> None:
    hello = worker.hello
    assert hello["protocol_version"] == "1.0"
    assert hello["device"]["kind"] == worker_device.split(":", maxsplit=1)[0]
    assert hello["memory"]["total_bytes"] > hello["memory"]["budget_bytes"] > 0
    assert hello["torch_version"] == torch.__version__
    assert hello["diffusers_version"] and hello["transformers_version"]
    assert "model.load_unet" in hello["capabilities"]
    assert hello["pid"] == worker.pid


@pytest.mark.parametrize(("name", "kind", "extra"), CASES, ids=[c[0] for c in CASES])
def test_load_report_and_unload(
    worker: WorkerProcess, demo: DemoManifest, name: str, kind: str, extra: dict[str, object]
) -> None:
    entry = demo[name]
    result = worker.call(COMMAND[kind], load_data(entry, demo.root, **extra))
    stored = getattr(torch, entry.dtype or "float16")
    expected = unique_bytes(reference(entry, kind), stored)
    assert result["bytes"] == expected
    assert result["type"] == kind
    assert result["dtype"] == str(stored).removeprefix("torch.")
    assert result["source"]["layout"] == ("original" if entry.layout == "original" else "diffusers")
    info = worker.call(CommandType.GET_MODEL_INFO, {"name": name})
    assert info["models"][0]["bytes"] == expected
    assert info["memory"]["models_bytes"] == expected
    unloaded = worker.call(CommandType.UNLOAD_MODEL, {"name": name})
    assert unloaded["freed_bytes"] == expected
    assert unloaded["memory_before"]["models_bytes"] - unloaded["memory_after"]["models_bytes"] == expected
    assert worker.call(CommandType.GET_MODEL_INFO)["model_count"] == 0


@pytest.mark.parametrize(("name", "kind", "extra"), CASES, ids=[c[0] for c in CASES])
def test_loaded_weights_are_bitwise_the_models(
    inproc: InProcessWorker, demo: DemoManifest, name: str, kind: str, extra: dict[str, object]
) -> None:
    entry = demo[name]
    inproc.call(COMMAND[kind], load_data(entry, demo.root, **extra))
    module = inproc.module(name)
    assert isinstance(module, torch.nn.Module)
    assert not module.training
    assert all(not p.requires_grad for p in module.parameters())
    assert all(p.device.type == inproc.service.device.type for p in module.parameters())
    assert_same_weights(module, reference(entry, kind))


def test_single_file_without_config_loads_with_the_config_its_shapes_imply(
    inproc: InProcessWorker, demo: DemoManifest, tmp_path: Path
) -> None:
    from modelkeeper.testing import save_single_file

    entry = demo["sdxl-unet"]
    ref = reference(entry, "unet")
    path = save_single_file(ref, tmp_path / "bare.safetensors", layout="original", with_config_metadata=False)
    for config in (None, "sdxl/unet"):  # none at all; the full-size known config of its base
        data = {"name": "bare", "path": str(path)} | ({"config": config} if config else {})
        result = inproc.call(CommandType.LOAD_UNET, data)
        assert "the file's shapes" in result["source"]["config_origin"]
        assert_same_weights(inproc.module("bare"), ref)
        inproc.call(CommandType.UNLOAD_MODEL, {"name": "bare"})
    # a config the caller gives is used as it is
    result = inproc.call(CommandType.LOAD_UNET, {"name": "bare", "path": str(path), "config": entry.config})
    assert result["source"]["config_origin"] == "request"
    assert_same_weights(inproc.module("bare"), ref)


def test_single_files_without_config_beyond_unets(inproc: InProcessWorker, tmp_path: Path) -> None:
    """A Flux transformer's config comes from its shapes too; a ControlNet's does not (no reader):
    without one, the error names the field and the file."""
    from diffusers.models.controlnets.controlnet import ControlNetModel

    from modelkeeper.testing import make_transformer, make_unet, state_dict_for_save
    from modelkeeper.testing.files import write_safetensors

    flux = write_safetensors(
        state_dict_for_save(make_transformer("flux")), tmp_path / "bare-flux.safetensors"
    )
    result = inproc.call(CommandType.LOAD_MODEL, {"name": "flux", "path": str(flux), "type": "transformer"})
    assert result["class_name"] == "FluxTransformer2DModel"
    assert result["source"]["config_origin"] == "the file's shapes"
    controlnet = ControlNetModel.from_unet(make_unet("sd1"), conditioning_channels=3)
    path = write_safetensors(controlnet.state_dict(), tmp_path / "bare-controlnet.safetensors")
    with pytest.raises(ProtocolError) as info:
        inproc.call(CommandType.LOAD_MODEL, {"name": "cn", "path": str(path), "type": "controlnet"})
    assert info.value.code is ErrorCode.INVALID_REQUEST
    assert "data.config" in info.value.message and str(path) in info.value.message


@pytest.mark.parametrize("component", ["unet", "vae", "clip_l", "clip_g"])
def test_components_out_of_a_full_sdxl_checkpoint(
    inproc: InProcessWorker, demo: DemoManifest, component: str
) -> None:
    entry = demo["sdxl-checkpoint"]
    assert entry.config is not None
    configs = {"unet": entry.config["unet"], "vae": entry.config["vae"], "clip_l": entry.config["text_encoder"],
               "clip_g": entry.config["text_encoder_2"]}  # fmt: skip
    kind = component if component in ("unet", "vae") else "text_encoder"
    inproc.call(
        COMMAND[kind],
        {
            "name": component,
            "path": str(demo.path(entry.name)),
            "config": configs[component],
            "layout": "original",
        },
    )
    module = inproc.module(component)
    ref_entry = (
        demo["sdxl-unet"]
        if kind == "unet"
        else demo["sdxl-vae"]
        if kind == "vae"
        else demo[component.replace("_", "-")]
    )
    assert_same_weights(module, reference(ref_entry, kind))


def test_pipeline_folder_components_and_fp16_variant(inproc: InProcessWorker, demo: DemoManifest) -> None:
    entry = demo["sd15-pipeline"]
    root = str(demo.path(entry.name))
    for kind in ("unet", "vae", "text_encoder", "tokenizer"):
        result = inproc.call(CommandType.LOAD_MODEL, {"name": f"p-{kind}", "path": root, "type": kind})
        assert result["type"] == kind
    assert inproc.module("p-tokenizer")("a cat").input_ids[0] == inproc.module("p-tokenizer").bos_token_id
    variants = demo.select(weights_variants=("fp16",))
    assert variants, "the demo set has a folder with an fp16 variant"
    folder = demo.path(variants[0].name)
    kind = "unet" if variants[0].type in ("unet", "main") else variants[0].type
    res = inproc.call(
        CommandType.LOAD_MODEL, {"name": "fp16", "path": str(folder), "type": kind, "variant": "fp16"}
    )
    assert res["dtype"] == "float16"
    assert res["source"]["files"][0].endswith(".fp16.safetensors")


def test_dtype_cast_on_load_halves_bytes(inproc: InProcessWorker, demo: DemoManifest) -> None:
    path = str(demo.path("sd15-unet-folder"))
    a = inproc.call(CommandType.LOAD_UNET, {"name": "f32", "path": path, "dtype": "float32"})
    b = inproc.call(CommandType.LOAD_UNET, {"name": "f16", "path": path, "dtype": "float16"})
    assert a["dtype"] == "float32"
    assert b["dtype"] == "float16"
    assert a["bytes"] == 2 * b["bytes"]


def test_tokenizers(inproc: InProcessWorker, demo: DemoManifest) -> None:
    for name in ("clip-tokenizer", "t5-tokenizer"):
        result = inproc.call(CommandType.LOAD_TOKENIZER, load_data(demo[name], demo.root))
        assert result["vocab_size"] > 0
        assert result["bytes"] == 0
        ids = inproc.module(name)("a photo of a cat").input_ids
        assert len(ids) > 2


def test_a_dtype_cast_leaves_no_tensor_tied_to_the_file_buffer(
    inproc: InProcessWorker, demo: DemoManifest
) -> None:
    """Uncast tensors are copied out too, so the file-sized buffer is freed after a cast."""
    inproc.call(
        CommandType.LOAD_ENCODER, {"name": "t", "path": str(demo.path("t5-folder")), "dtype": "bfloat16"}
    )
    module = inproc.module("t")
    for tensor in [*module.parameters(), *module.buffers()]:
        assert tensor.untyped_storage().nbytes() == tensor.numel() * tensor.element_size()


def test_folder_text_encoder_with_legacy_position_ids(
    inproc: InProcessWorker, demo: DemoManifest, tmp_path: object
) -> None:
    import shutil

    from safetensors.torch import load_file, save_file

    folder = tmp_path / "te"  # type: ignore[operator]
    shutil.copytree(demo.path("sd15-pipeline") / "text_encoder", folder)
    weights = folder / "model.safetensors"
    state = load_file(str(weights))
    state["text_model.embeddings.position_ids"] = torch.arange(77).unsqueeze(0)
    save_file(state, str(weights))
    result = inproc.call(CommandType.LOAD_ENCODER, {"name": "te", "path": str(folder)})
    assert result["class_name"] == "CLIPTextModel"
