"""fp8 weights kept packed on the device: fp8 files, ComfyUI's scaled fp8 files, storage_dtype casts."""

from __future__ import annotations

import copy
import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import torch
from safetensors.torch import save_file

from modelkeeper.protocol import ErrorCode, ProtocolError
from modelkeeper.testing import component_config, make_transformer, make_unet, to_original_layout
from modelkeeper.testing.fp8_files import fp8_state, scaled_fp8_state
from modelkeeper.worker import InProcessWorker
from modelkeeper.worker.storage import plan_of

from .conftest import output_cosine

pytestmark = pytest.mark.usefixtures("one_torch_thread")

REFERENCES = {
    "flux": lambda: make_transformer("flux"),
    "sd3": lambda: make_transformer("sd3"),
    "sdxl": lambda: make_unet("sdxl"),
}
KIND = {"flux": "transformer", "sd3": "transformer", "sdxl": "unet"}
#: Least cosine of an fp8 model's outputs against full precision. The tiny SDXL UNet (random weights,
#: 32 channels under GroupNorm) loses more to fp8 rounding itself: the same rounding done in float32
#: gives 0.9965; the loaded model must then match that rounding exactly (``rounded``).
FULL_PRECISION_COSINE = {"flux": 0.999, "sd3": 0.999, "sdxl": 0.995}


@pytest.fixture(scope="module")
def refs() -> dict[str, torch.nn.Module]:
    return {name: make() for name, make in REFERENCES.items()}


@pytest.fixture
def worker() -> Iterator[InProcessWorker]:
    with InProcessWorker("cpu") as w:
        yield w


def write(path: Path, ref: torch.nn.Module, state: dict[str, torch.Tensor]) -> Path:
    save_file(state, str(path), metadata={"modelkeeper.config": json.dumps(component_config(ref))})
    return path


def rounded(ref: torch.nn.Module, dtype: torch.dtype) -> torch.nn.Module:
    """``ref`` with the values of :func:`fp8_state`'s file (through ``dtype`` and bfloat16), in float32."""
    out = copy.deepcopy(ref)
    with torch.no_grad():
        for tensor in out.state_dict().values():  # views of the parameters and buffers
            tensor.copy_(tensor.to(dtype if tensor.ndim >= 2 else torch.bfloat16).float())
    return out


def load(worker: InProcessWorker, path: Path, kind: str, **extra: Any) -> dict[str, Any]:
    data = {"name": "m", "path": str(path), "type": kind, "replace": True, **extra}
    return worker.call("model.load_model", data)


def fp16_bytes(ref: torch.nn.Module) -> int:
    return sum(t.numel() * 2 for t in ref.state_dict().values())


@pytest.mark.parametrize("base", ["flux", "sd3", "sdxl"])
def test_fp8_file_loads_packed_runs_and_validates(
    worker: InProcessWorker, refs: dict[str, torch.nn.Module], tmp_path: Path, base: str
) -> None:
    ref = refs[base]
    path = write(tmp_path / f"{base}-fp8.safetensors", ref, fp8_state(ref.state_dict(), torch.float8_e4m3fn))
    result = load(worker, path, KIND[base], dtype="float32")
    assert result["storage"] == "float8_e4m3fn" and result["dtype"] == "float32"
    assert result["bytes"] <= 0.55 * fp16_bytes(ref)
    assert result["parameters"] == sum(t.numel() for t in ref.parameters())
    report = worker.call("model.validate_model", {"name": "m", "level": "functional"})
    assert report["passed"], [c for c in report["checks"] if not c["passed"]]
    assert output_cosine(worker.module("m"), rounded(ref, torch.float8_e4m3fn)) >= 0.99999
    assert output_cosine(worker.module("m"), ref) >= FULL_PRECISION_COSINE[base]


def test_fp8_file_defaults_to_its_own_compute_dtype(
    worker: InProcessWorker, refs: dict[str, torch.nn.Module], tmp_path: Path
) -> None:
    ref = refs["flux"]
    path = write(tmp_path / "flux-fp8.safetensors", ref, fp8_state(ref.state_dict(), torch.float8_e4m3fn))
    result = load(worker, path, "transformer")
    assert result["dtype"] == "bfloat16"  # the dtype of its norms and biases
    module = worker.module("m")
    stored = module.transformer_blocks[0].attn.to_q.weight
    assert stored.dtype == torch.float8_e4m3fn  # kept packed, decoded only while the layer runs
    assert worker.call("model.validate_model", {"name": "m", "level": "functional"})["passed"]
    assert module.transformer_blocks[0].attn.to_q.weight is stored


def test_e5m2_file(worker: InProcessWorker, refs: dict[str, torch.nn.Module], tmp_path: Path) -> None:
    ref = refs["sd3"]
    path = write(tmp_path / "sd3-e5m2.safetensors", ref, fp8_state(ref.state_dict(), torch.float8_e5m2))
    result = load(worker, path, "transformer", dtype="float32")
    assert result["storage"] == "float8_e5m2"
    assert worker.call("model.validate_model", {"name": "m", "level": "functional"})["passed"]
    assert output_cosine(worker.module("m"), ref) >= 0.995  # two mantissa bits: coarser than e4m3


@pytest.mark.parametrize("base", ["flux", "sdxl"])
def test_scaled_fp8_file(
    worker: InProcessWorker, refs: dict[str, torch.nn.Module], tmp_path: Path, base: str
) -> None:
    ref = refs[base]
    path = write(tmp_path / f"{base}-scaled.safetensors", ref, scaled_fp8_state(ref.state_dict()))
    result = load(worker, path, KIND[base], dtype="float32")
    assert result["storage"] == "scaled_float8_e4m3fn"
    assert result["bytes"] <= 0.55 * fp16_bytes(ref)
    report = worker.call("model.validate_model", {"name": "m", "level": "functional"})
    assert report["passed"], [c for c in report["checks"] if not c["passed"]]
    assert output_cosine(worker.module("m"), ref) >= FULL_PRECISION_COSINE[base]


def test_storage_dtype_casts_a_full_precision_file(
    worker: InProcessWorker, refs: dict[str, torch.nn.Module], tmp_path: Path
) -> None:
    ref = refs["flux"]
    path = write(tmp_path / "flux.safetensors", ref, dict(ref.state_dict()))
    result = load(worker, path, "transformer", dtype="bfloat16", storage_dtype="float8_e4m3fn")
    assert result["storage"] == "float8_e4m3fn" and result["dtype"] == "bfloat16"
    assert result["bytes"] <= 0.55 * fp16_bytes(ref)
    load(worker, path, "transformer", dtype="float32", storage_dtype="float8_e4m3fn")
    module = worker.module("m")
    assert module.proj_out.weight.dtype == torch.float32  # skipped: the last projection stays exact
    assert output_cosine(module, ref) >= 0.999
    assert worker.call("model.validate_model", {"name": "m", "level": "functional"})["passed"]


def test_unload_detaches_and_a_plain_load_reuses_the_skeleton(
    worker: InProcessWorker, refs: dict[str, torch.nn.Module], tmp_path: Path
) -> None:
    ref = refs["flux"]
    packed = write(tmp_path / "flux-fp8.safetensors", ref, fp8_state(ref.state_dict(), torch.float8_e4m3fn))
    plain = write(tmp_path / "flux.safetensors", ref, dict(ref.state_dict()))
    load(worker, packed, "transformer")
    worker.call("model.unload_model", {"name": "m"})
    load(worker, plain, "transformer")
    module = worker.module("m")
    assert plan_of(module) is None
    assert not any(m._forward_pre_hooks for m in module.modules())
    assert output_cosine(module, ref) >= 0.99999


def test_fp8_is_a_storage_dtype_not_a_compute_dtype(
    worker: InProcessWorker, refs: dict[str, torch.nn.Module], tmp_path: Path
) -> None:
    ref = refs["sd3"]
    path = write(tmp_path / "sd3.safetensors", ref, dict(ref.state_dict()))
    with pytest.raises(ProtocolError, match="storage_dtype") as err:
        load(worker, path, "transformer", dtype="float8_e4m3fn")
    assert err.value.code is ErrorCode.INVALID_REQUEST
    with pytest.raises(ProtocolError, match="conflicts with dtype"):
        load(worker, path, "transformer", dtype="float32", storage_dtype="float16")


@pytest.mark.parametrize("scaled", [False, True], ids=["fp8", "scaled-fp8"])
def test_sdxl_checkpoint_layout_in_fp8(
    worker: InProcessWorker, refs: dict[str, torch.nn.Module], tmp_path: Path, scaled: bool
) -> None:
    """The UNet of an original-layout checkpoint (``model.diffusion_model.`` keys, the marker beside
    them as ComfyUI writes it) goes through diffusers' converter with its scales."""
    ref = refs["sdxl"]
    config = component_config(ref)
    original = to_original_layout("unet", ref.state_dict(), config, prefix="model.diffusion_model.")
    state = (
        scaled_fp8_state(original, prefix="model.diffusion_model.")
        if scaled
        else fp8_state(original, torch.float8_e4m3fn)
    )
    path = tmp_path / "sdxl-checkpoint.safetensors"
    save_file(state, str(path))
    result = load(worker, path, "unet", dtype="float32", config=config)
    assert result["storage"] == ("scaled_float8_e4m3fn" if scaled else "float8_e4m3fn")
    assert result["source"]["rule"] == "unet/original"
    assert worker.call("model.validate_model", {"name": "m", "level": "functional"})["passed"]
    assert output_cosine(worker.module("m"), ref) >= FULL_PRECISION_COSINE["sdxl"]


@pytest.mark.parametrize("kind", ["t5", "clip_l", "clip_g"])
@pytest.mark.parametrize("scaled", [False, True], ids=["fp8", "scaled-fp8"])
def test_text_encoders_in_fp8(worker: InProcessWorker, tmp_path: Path, kind: str, scaled: bool) -> None:
    """T5 (its ``wo`` packed too, decoded by its parent's hook; its tied ``embed_tokens`` decoded with
    ``shared``) and CLIP with transformers' own key prefix (``text_model.``, renamed before packing)."""
    from modelkeeper.testing import make_text_encoder
    from modelkeeper.testing.components import state_dict_for_save

    ref = make_text_encoder(kind)  # type: ignore[arg-type]
    saved = state_dict_for_save(ref)
    state = scaled_fp8_state(saved) if scaled else fp8_state(saved, torch.float8_e4m3fn)
    path = write(tmp_path / f"{kind}.safetensors", ref, state)
    result = load(worker, path, "text_encoder", dtype="float32")
    assert result["storage"] == ("scaled_float8_e4m3fn" if scaled else "float8_e4m3fn")
    assert result["bytes"] <= 0.55 * fp16_bytes(ref)
    report = worker.call("model.validate_model", {"name": "m", "level": "functional"})
    assert report["passed"], [c for c in report["checks"] if not c["passed"]]
    if not scaled:
        assert output_cosine(worker.module("m"), rounded(ref, torch.float8_e4m3fn)) >= 0.99999
    assert output_cosine(worker.module("m"), ref) >= 0.995


def test_scales_follow_the_pieces_of_an_original_flux_file() -> None:
    """ComfyUI's scaled Flux files use Black Forest Labs' keys: after diffusers' converter splits
    ``img_attn.qkv`` into q, k, v (and swaps the halves of ``final_layer.adaLN_modulation``), each
    piece carries the scale of the tensor it came from (full-size Flux, on the meta device)."""
    from modelkeeper.formats.known_configs import load_known_config
    from modelkeeper.protocol.messages import ModelKind
    from modelkeeper.worker import convert
    from modelkeeper.worker.storage import ScaledFloat8, split_scales
    from modelkeeper.worker.weights import TensorEntry
    from tests.discovery.stripped import flux_bfl

    config = dict(load_known_config("flux_dev", "transformer"))
    state: dict[str, torch.Tensor] = {"scaled_fp8": torch.empty(0, dtype=torch.float8_e4m3fn)}
    for key, (_, shape) in flux_bfl(guidance=True).items():
        fp8 = len(shape) == 2 and key.endswith(".weight")
        state[key] = torch.empty(shape, dtype=torch.float8_e4m3fn if fp8 else torch.bfloat16, device="meta")
        if fp8:
            state[key.removesuffix(".weight") + ".scale_weight"] = torch.empty(1, device="meta")
    entries = {
        k: TensorEntry(Path("f.safetensors"), k, "F8_E4M3", tuple(v.shape), 0) for k, v in state.items()
    }
    plan = convert.plan_component(ModelKind.TRANSFORMER, entries, config)
    unscaled, scaled = split_scales({k: state[k] for k in plan.keys})
    assert scaled and not any(k.endswith("scale_weight") or k == "scaled_fp8" for k in unscaled)
    qkv_scale = unscaled["double_blocks.0.img_attn.qkv.weight"].scale  # type: ignore[attr-defined]
    final_scale = unscaled["final_layer.adaLN_modulation.1.weight"].scale  # type: ignore[attr-defined]
    converted = convert.to_loadable(plan, unscaled, config)
    for piece in ("to_q", "to_k", "to_v"):
        tensor = converted[f"transformer_blocks.0.attn.{piece}.weight"]
        assert isinstance(tensor, ScaledFloat8) and tensor.scale is qkv_scale
    swapped = converted["norm_out.linear.weight"]
    assert isinstance(swapped, ScaledFloat8) and swapped.scale is final_scale
    assert not isinstance(converted["transformer_blocks.0.norm1.linear.bias"], ScaledFloat8)


@pytest.mark.parametrize("base", ["flux", "sdxl"])
def test_storage_dtype_casts_each_group_as_it_is_read(
    worker: InProcessWorker, refs: dict[str, torch.nn.Module], tmp_path: Path, base: str,
    monkeypatch: pytest.MonkeyPatch,
) -> None:  # fmt: skip
    """The file is read a group at a time, each group cast before the next is read (the keys to cast
    are found through the key conversion on the meta device: SDXL in its original layout here)."""
    from modelkeeper.worker import service, weights

    ref = refs[base]
    config = component_config(ref)
    state = dict(ref.state_dict())
    if base == "sdxl":
        state = to_original_layout("unet", state, config, prefix="model.diffusion_model.")
    path = tmp_path / f"{base}.safetensors"
    save_file(state, str(path))
    reads: list[int] = []
    real = weights.load_tensors

    def counting(path: Path, names: list[str], *args: Any, **kwargs: Any) -> dict[str, torch.Tensor]:
        out = real(path, names, *args, **kwargs)
        reads.append(sum(t.numel() * t.element_size() for t in out.values()))
        return out

    monkeypatch.setattr(weights, "load_tensors", counting)
    monkeypatch.setattr(service, "CAST_GROUP_BYTES", 1 << 20)
    result = load(worker, path, KIND[base], dtype="float32", storage_dtype="float8_e4m3fn", config=config)
    file_bytes = sum(t.numel() * t.element_size() for t in state.values())
    assert sum(reads) == file_bytes and len(reads) > 4 and max(reads) < file_bytes / 4
    assert result["storage"] == "float8_e4m3fn" and result["bytes"] < 0.35 * file_bytes
    module = worker.module("m")
    first = module.conv_in if base == "sdxl" else module.x_embedder
    assert first.weight.dtype == (
        torch.float32 if base == "sdxl" else torch.float8_e4m3fn
    )  # conv_in: skipped
    assert worker.call("model.validate_model", {"name": "m", "level": "functional"})["passed"]
    assert output_cosine(module, ref) >= FULL_PRECISION_COSINE[base]
