"""Partial residency (``offload``): models kept partly on the device, the rest of their blocks streamed
from host memory. Outputs are bit-identical to the resident model at every budget; the budget counts
only resident weights and the ring; LoRAs patch streamed blocks exactly; unloading frees it all."""

from __future__ import annotations

import gc
import json
import math
import weakref
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import torch

from modelkeeper.protocol import CommandType, ErrorCode, ProtocolError
from modelkeeper.protocol.messages import LoadRequest
from modelkeeper.testing import DemoManifest, make_text_encoder, make_vae
from modelkeeper.worker import InProcessWorker
from modelkeeper.worker.device import MiB
from modelkeeper.worker.streaming import Streamer, choose_resident, find_units, resident_limit
from modelkeeper.worker.streaming.plan import CYCLE

from .conftest import load_data as demo_load


def load_data(*args: Any, **extra: Any) -> dict[str, Any]:
    """A load request in float32 (the demo files are fp16; the CPU computes float32)."""
    return demo_load(*args, **{"dtype": "float32", **extra})


pytestmark = pytest.mark.usefixtures("one_torch_thread")

FRACTIONS = (1.0, 0.5, 0.25, 0.0)


def unet_inputs(module: torch.nn.Module, device: str) -> tuple[tuple[Any, ...], dict[str, Any]]:
    cfg = module.config  # type: ignore[attr-defined]
    g = torch.Generator().manual_seed(3)
    x = torch.randn(2, cfg.in_channels, 8, 8, generator=g)
    enc = torch.randn(2, 5, cfg.cross_attention_dim, generator=g)
    kwargs: dict[str, Any] = {}
    if cfg.addition_embed_type == "text_time":
        text = cfg.projection_class_embeddings_input_dim - 6 * cfg.addition_time_embed_dim
        kwargs["added_cond_kwargs"] = {
            "text_embeds": torch.randn(2, text, generator=g).to(device),
            "time_ids": torch.randn(2, 6, generator=g).to(device),
        }
    args = (x.to(device), torch.tensor([10, 500], device=device), enc.to(device))
    return args, kwargs


def run_unet(module: torch.nn.Module, device: str) -> torch.Tensor:
    args, kwargs = unet_inputs(module, device)
    with torch.no_grad():
        return module(*args, **kwargs).sample  # type: ignore[no-any-return]


@pytest.fixture
def worker(worker_device: str) -> Iterator[InProcessWorker]:
    with InProcessWorker(worker_device) as w:
        yield w


def info(worker: InProcessWorker, name: str, **extra: Any) -> dict[str, Any]:
    models: list[dict[str, Any]] = worker.call(CommandType.GET_MODEL_INFO, {"name": name, **extra})["models"]
    return models[0]


@pytest.mark.parametrize("fraction", FRACTIONS)
def test_streamed_unet_is_bit_identical_at_every_budget(
    worker: InProcessWorker, demo: DemoManifest, worker_device: str, fraction: float
) -> None:
    entry = demo["sdxl-unet"]
    ref = worker.call(CommandType.LOAD_UNET, load_data(entry, demo.root, name="ref"))
    cap = int(fraction * ref["bytes"])
    got = worker.call(CommandType.LOAD_UNET, load_data(entry, demo.root, name="s", offload=cap))
    assert got["resident_bytes"] + got["streamed_bytes"] == ref["bytes"]
    if fraction == 1.0:
        assert got["streamed_bytes"] == 0
    else:
        assert got["streamed_bytes"] > 0
        assert got["resident_bytes"] <= max(cap, info(worker, "s")["resident_bytes"])
    want = run_unet(worker.module("ref"), worker_device)
    for _ in range(2):  # the first pass learns the order of the blocks, the next prefetches by it
        assert torch.equal(run_unet(worker.module("s"), worker_device), want)
    stats = info(worker, "s")
    if fraction < 1.0:
        assert stats["streaming"]["passes"] == 2
        assert stats["streaming"]["copied_bytes"] >= stats["streamed_bytes"]
        streamed_units = stats["streaming"]["streamed_units"]
        assert stats["streaming"]["misses"] == streamed_units  # all in the first pass, none after
        module = worker.module("s")
        host = [p for p in module.parameters() if p.device.type == "cpu"] if worker_device != "cpu" else []
        assert worker_device == "cpu" or host  # at rest streamed weights live on the host
    for name in ("ref", "s"):
        worker.call(CommandType.UNLOAD_MODEL, {"name": name})


@pytest.mark.parametrize(
    ("fraction", "ring"),
    [(0.5, 1.0), (0.0, 1.0), (0.0, 5 / 3)],
    ids=["50%", "0%", "0%, ring of five of the largest"],  # at 50% such a ring would hold every block
)
def test_passes_repeat_their_placements_with_no_host_work_after_the_first(
    worker: InProcessWorker,
    demo: DemoManifest,
    worker_device: str,
    monkeypatch: pytest.MonkeyPatch,
    fraction: float,
    ring: float,
) -> None:
    """Once the first pass has recorded the order, each unit has its place in the ring in each pass
    of a cycle: every unit arrives ahead of its use (no miss) at a place it held before (no new
    parameter views), with
    the default ring (three of the largest units) as with a larger one (``MODELKEEPER_STREAM_POOL_MB``:
    five of the largest, two thirds of the streamed bytes, cut to two laps), and the outputs stay
    exact."""
    entry = demo["sdxl-unet"]
    cap = int(fraction * 2 * entry.size_bytes)  # the file is fp16, the load float32
    worker.call(CommandType.LOAD_UNET, load_data(entry, demo.root, name="ref"))
    want = run_unet(worker.module("ref"), worker_device)
    if ring > 1:  # the default ring is three of the largest units: ask for more
        worker.call(CommandType.LOAD_UNET, load_data(entry, demo.root, name="s", offload=cap))
        default = info(worker, "s")["streaming"]["pool_bytes"]
        worker.call(CommandType.UNLOAD_MODEL, {"name": "s"})
        monkeypatch.setattr("modelkeeper.worker.streaming.streamer.POOL_TARGET", int(ring * default))
    worker.call(CommandType.LOAD_UNET, load_data(entry, demo.root, name="s", offload=cap))
    module = worker.module("s")
    for _ in range(1 + CYCLE):  # the first pass records the order, a cycle of passes places every unit
        assert torch.equal(run_unet(module, worker_device), want)
    before = info(worker, "s")["streaming"]
    cycles = math.lcm(*range(1, CYCLE + 1))  # whole cycles: a unit is copied once a pass on average
    for _ in range(cycles):
        assert torch.equal(run_unet(module, worker_device), want)
    after = info(worker, "s")["streaming"]
    assert after["passes"] == before["passes"] + cycles
    assert (after["misses"], after["views"]) == (before["misses"], before["views"])
    copied = after["copied_bytes"] - before["copied_bytes"]
    assert copied <= cycles * 1.01 * info(worker, "s")["streamed_bytes"]
    assert info(worker, "s")["streamed_bytes"] > after["pool_bytes"]
    if ring > 1:
        assert after["pool_bytes"] > default
    for name in ("ref", "s"):
        worker.call(CommandType.UNLOAD_MODEL, {"name": name})


def test_budget_counts_resident_weights_and_ring(worker: InProcessWorker, demo: DemoManifest) -> None:
    entry = demo["sdxl-unet"]
    got = worker.call(CommandType.LOAD_UNET, load_data(entry, demo.root, name="s", offload=0))
    stats = info(worker, "s")
    ring = stats["streaming"]["pool_bytes"]
    assert ring > 0
    assert got["resident_bytes"] < got["bytes"] // 4  # only the parts outside the blocks
    assert got["memory"]["models_bytes"] == got["resident_bytes"] + ring
    worker.call(CommandType.UNLOAD_MODEL, {"name": "s"})
    assert worker.call(CommandType.GET_MODEL_INFO)["memory"]["models_bytes"] == 0


def test_auto_streams_what_does_not_fit_and_none_still_refuses(
    demo: DemoManifest, worker_device: str
) -> None:
    entry = demo["sdxl-unet"]
    budget = 0.8 * 2 * entry.size_bytes  # the file is fp16, the load float32
    with InProcessWorker(worker_device, budget_mb=budget / MiB) as w:
        with pytest.raises(ProtocolError) as refused:
            w.call(CommandType.LOAD_UNET, load_data(entry, demo.root, name="u"))
        assert refused.value.code is ErrorCode.INSUFFICIENT_MEMORY
        got = w.call(CommandType.LOAD_UNET, load_data(entry, demo.root, name="u", offload="auto"))
        assert got["streamed_bytes"] > 0
        assert got["memory"]["models_bytes"] <= budget
        assert (
            got["memory"]["models_bytes"] == got["resident_bytes"] + info(w, "u")["streaming"]["pool_bytes"]
        )
        w.call(CommandType.UNLOAD_MODEL, {"name": "u"})
    with InProcessWorker(worker_device, budget_mb=0.05 * entry.size_bytes / MiB) as w:  # not even the ring
        with pytest.raises(ProtocolError) as refused:
            w.call(CommandType.LOAD_UNET, load_data(entry, demo.root, name="u", offload="auto"))
        assert refused.value.code is ErrorCode.INSUFFICIENT_MEMORY
        assert "data.offload" in refused.value.message


def test_auto_loads_a_model_that_fits_whole(worker: InProcessWorker, demo: DemoManifest) -> None:
    got = worker.call(
        CommandType.LOAD_UNET, load_data(demo["sd15-unet"], demo.root, name="u", offload="auto")
    )
    assert (got["resident_bytes"], got["streamed_bytes"]) == (got["bytes"], 0)
    assert info(worker, "u")["streaming"] is None
    worker.call(CommandType.UNLOAD_MODEL, {"name": "u"})


@pytest.mark.parametrize("value", ["half", -1, 1.5, True, "1024", None])
def test_bad_offload_values_are_refused_naming_the_field(
    worker: InProcessWorker, demo: DemoManifest, value: object
) -> None:
    with pytest.raises(ProtocolError) as refused:
        worker.call(CommandType.LOAD_UNET, load_data(demo["sd15-unet"], demo.root, name="u", offload=value))
    assert refused.value.code is ErrorCode.INVALID_REQUEST
    assert "offload" in refused.value.message
    assert worker.call(CommandType.GET_MODEL_INFO)["model_count"] == 0


def test_the_request_field_accepts_none_auto_and_byte_counts() -> None:
    for value in ("none", "auto", 0, 5 * MiB):
        assert LoadRequest(name="m", path="/x", offload=value).offload == value
    assert LoadRequest(name="m", path="/x").offload == "none"


def test_lora_on_a_streamed_model_is_exact(
    worker: InProcessWorker, demo: DemoManifest, worker_device: str
) -> None:
    entry = demo["sdxl-unet"]
    worker.call(CommandType.LOAD_UNET, load_data(entry, demo.root, name="ref"))
    worker.call(
        CommandType.LOAD_UNET, load_data(entry, demo.root, name="s", offload=int(0.3 * entry.size_bytes))
    )
    before = info(worker, "s", fingerprint=True)["fingerprint"]
    assert before == info(worker, "ref", fingerprint=True)["fingerprint"]
    lora = str(demo.path("sdxl-lora-kohya"))
    for name, model in (("a", "ref"), ("b", "s")):
        worker.call(CommandType.LOAD_LORA, {"name": name, "path": lora, "targets": {"unet": model}})
    assert torch.equal(
        run_unet(worker.module("s"), worker_device), run_unet(worker.module("ref"), worker_device)
    )
    assert (
        info(worker, "s", fingerprint=True)["fingerprint"]
        == info(worker, "ref", fingerprint=True)["fingerprint"]
    )
    assert info(worker, "s", fingerprint=True)["fingerprint"] != before
    for name in ("a", "b"):
        worker.call(CommandType.SET_LORA_STRENGTH, {"name": name, "strength": 0.5})
    assert torch.equal(
        run_unet(worker.module("s"), worker_device), run_unet(worker.module("ref"), worker_device)
    )
    for name in ("a", "b"):
        worker.call(CommandType.UNLOAD_LORA, {"name": name})
    assert info(worker, "s", fingerprint=True)["fingerprint"] == before
    got, want = run_unet(worker.module("s"), worker_device), run_unet(worker.module("ref"), worker_device)
    assert torch.equal(got, want), float((got - want).abs().max())
    for name in ("ref", "s"):
        worker.call(CommandType.UNLOAD_MODEL, {"name": name})


def test_unload_frees_the_module_its_ring_and_hooks(
    worker: InProcessWorker, demo: DemoManifest, worker_device: str
) -> None:
    worker.call(CommandType.LOAD_UNET, load_data(demo["sdxl-unet"], demo.root, name="s", offload=0))
    module = worker.module("s")
    run_unet(module, worker_device)
    gone = weakref.ref(module)
    del module
    worker.call(CommandType.UNLOAD_MODEL, {"name": "s"})
    gc.collect()
    assert gone() is None
    assert worker.call(CommandType.GET_MODEL_INFO)["memory"]["models_bytes"] == 0


def test_optimize_is_refused_on_a_streamed_model(worker: InProcessWorker, demo: DemoManifest) -> None:
    worker.call(CommandType.LOAD_UNET, load_data(demo["sd15-unet"], demo.root, name="s", offload=0))
    with pytest.raises(ProtocolError) as refused:
        worker.call(CommandType.OPTIMIZE_MODEL, {"name": "s", "options": {"channels_last": True}})
    assert "offload" in refused.value.message
    worker.call(CommandType.UNLOAD_MODEL, {"name": "s"})


# ----------------------------------------------------------------------------- the streamer on its own


def streamed(module: torch.nn.Module, class_name: str, fraction: float, device: str) -> Streamer:
    total = sum(p.numel() * p.element_size() for p in module.parameters())
    return Streamer(module, torch.device(device), class_name, int(fraction * total))


def deeper_text_encoder(kind: str, layers: int) -> torch.nn.Module:
    """The demo's text encoder (one layer) with ``layers`` layers, seeded."""
    config = make_text_encoder(kind).config  # type: ignore[arg-type]
    if kind == "t5":
        config.num_layers = layers
    else:
        config.num_hidden_layers = layers
    torch.manual_seed(7)
    return type(make_text_encoder(kind))(config).eval()  # type: ignore[arg-type]


def total_bytes(module: torch.nn.Module) -> int:
    return sum(t.numel() * t.element_size() for t in [*module.parameters(), *module.buffers()])


@pytest.mark.parametrize("kind", ["clip_l", "t5"])
def test_text_encoders_stream_by_layer(kind: str) -> None:
    ids = torch.randint(0, 100, (1, 7), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        want = deeper_text_encoder(kind, 6)(ids).last_hidden_state
        module = deeper_text_encoder(kind, 6)
        stream = streamed(module, type(module).__name__, 0.0, "cpu")
        assert all("layers." in u.name or "block." in u.name for u in stream.units)
        assert stream.streamed_bytes > 0
        assert stream.device_bytes < total_bytes(module)  # embeddings resident, layers through the ring
        for _ in range(2):
            assert torch.equal(module(ids).last_hidden_state, want)
    stream.close()


@pytest.mark.parametrize("kind", ["clip_l", "clip_g", "t5"])
@pytest.mark.parametrize("layers", [1, 2, 3, 4])
def test_a_streamed_text_encoder_never_needs_more_than_resident(kind: str, layers: int) -> None:
    """Few layers beside large embeddings: a ring of three of the largest would outgrow the layers it
    streams; the layers stay resident instead, as many as that takes."""
    module = deeper_text_encoder(kind, layers)
    total = total_bytes(module)
    for fraction in (0.0, 0.5):
        stream = streamed(module, type(module).__name__, fraction, "cpu")
        assert stream.device_bytes <= total
        assert stream.resident_bytes + stream.streamed_bytes == total
        assert stream.streamed_bytes == 0 or stream.pool_bytes < stream.streamed_bytes
        stream.close()


def test_a_one_layer_text_encoder_loads_streamed_within_its_resident_bytes(
    worker: InProcessWorker, demo: DemoManifest
) -> None:
    entry = demo["clip-l"]
    ref = worker.call(CommandType.LOAD_MODEL, load_data(entry, demo.root, name="ref", type="text_encoder"))
    worker.call(CommandType.UNLOAD_MODEL, {"name": "ref"})
    got = worker.call(
        CommandType.LOAD_MODEL, load_data(entry, demo.root, name="s", type="text_encoder", offload=0)
    )
    assert got["memory"]["models_bytes"] <= ref["memory"]["models_bytes"]
    worker.call(CommandType.UNLOAD_MODEL, {"name": "s"})


def test_vae_streams_through_encode_and_decode() -> None:
    image = torch.randn(1, 3, 32, 32, generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        ref = make_vae("sdxl")
        want = ref.decode(ref.encode(image).latent_dist.mean).sample
        module = make_vae("sdxl")
        stream = streamed(module, "AutoencoderKL", 0.0, "cpu")
        for _ in range(2):
            assert torch.equal(module.decode(module.encode(image).latent_dist.mean).sample, want)
    assert stream.stats.passes == 4  # the encoder and the decoder, twice
    stream.close()


def tiny_flux() -> torch.nn.Module:
    from diffusers import FluxTransformer2DModel

    torch.manual_seed(0)
    return FluxTransformer2DModel(
        patch_size=1, in_channels=8, num_layers=2, num_single_layers=3, attention_head_dim=8,
        num_attention_heads=2, joint_attention_dim=16, pooled_projection_dim=12, axes_dims_rope=(2, 2, 4),
    ).eval()  # fmt: skip


def test_flux_streams_by_transformer_block() -> None:
    g = torch.Generator().manual_seed(4)
    inputs = {
        "hidden_states": torch.randn(1, 16, 8, generator=g), "encoder_hidden_states": torch.randn(1, 5, 16, generator=g),
        "pooled_projections": torch.randn(1, 12, generator=g), "timestep": torch.tensor([0.5]),
        "img_ids": torch.zeros(16, 3), "txt_ids": torch.zeros(5, 3),
    }  # fmt: skip
    with torch.no_grad():
        want = tiny_flux()(**inputs).sample
        module = tiny_flux()
        stream = streamed(module, "FluxTransformer2DModel", 0.25, "cpu")
        assert (
            sorted(u.name.split(".")[0] for u in stream.units)
            == ["single_transformer_blocks"] * 3 + ["transformer_blocks"] * 2
        )
        for _ in range(2):
            assert torch.equal(module(**inputs).sample, want)
    stream.close()


def test_unknown_architectures_stream_groups_of_leaf_modules(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr("modelkeeper.worker.streaming.units.GROUP_BYTES", 40_000)
    torch.manual_seed(0)
    layers = [torch.nn.Linear(64, 64) for _ in range(16)]
    module = torch.nn.Sequential(*layers)
    x = torch.randn(3, 64)
    with torch.no_grad():
        want = module(x)
        stream = streamed(module, "Sequential", 0.0, "cpu")
        assert [len(u.modules) for u in stream.units] == [2] * 8  # 16.6 kB a layer
        for _ in range(2):
            assert torch.equal(module(x), want)
        assert stream.stats.fetches >= len(stream.units) - 1  # the first group stays resident
    stream.close()


def test_resident_units_are_spread_through_the_order() -> None:
    assert choose_resident([10] * 8, 40) == {1, 3, 5, 7}
    assert choose_resident([10] * 4, 0) == set()
    assert choose_resident([10] * 4, 100) == {0, 1, 2, 3}
    assert choose_resident([10, 30, 10], 15, keep=[0]) == {0}
    assert choose_resident([5, 30, 5], 12) == {0, 2}


def test_resident_limit() -> None:
    assert resident_limit("none", 100, 10) is None
    assert resident_limit("auto", 100, 200) is None
    assert resident_limit("auto", 100, 60) == 60
    assert resident_limit(100, 100, 10) is None
    assert resident_limit(40, 100, 1000) == 40


def test_tied_weights_stay_resident(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr("modelkeeper.worker.streaming.units.GROUP_BYTES", 1)  # one unit per leaf
    module = torch.nn.Sequential(torch.nn.Embedding(10, 8), torch.nn.Linear(8, 10))
    module[1].weight = module[0].weight
    units = find_units(module, "Sequential")
    assert len(units) == 1  # the Linear's bias alone
    assert all(w.host is not module[0].weight for u in units for w in u.weights)


# ----------------------------------------------------------------------------- packed weights streamed


def packed_file(form: str, tmp_path: Path) -> tuple[Path, str, dict[str, Any]]:
    """A tiny file that loads packed: (path, type, extra load fields)."""
    from safetensors.torch import save_file

    from modelkeeper.testing import component_config, make_transformer, make_unet
    from modelkeeper.testing.fp8_files import fp8_state, scaled_fp8_state
    from modelkeeper.testing.gguf_files import write_gguf

    if form in ("cast", "scaled"):
        ref = make_unet("sdxl")
    else:  # more blocks than the demo's two: a ring of three of them would stream nothing
        from diffusers import FluxTransformer2DModel

        torch.manual_seed(0)
        config = {**component_config(make_transformer("flux")), "num_layers": 4, "num_single_layers": 8}
        ref = FluxTransformer2DModel.from_config(config)
    config = component_config(ref)
    path = tmp_path / f"{form}.safetensors"
    if form.startswith("gguf:"):
        path = path.with_suffix(".gguf")
        write_gguf(path, ref.state_dict(), form.removeprefix("gguf:"), arch="flux", config=config)
        return path, "transformer", {"dtype": "float32"}
    state = {
        "cast": dict(ref.state_dict()),
        "fp8": fp8_state(ref.state_dict(), torch.float8_e4m3fn),
        "scaled": scaled_fp8_state(ref.state_dict()),
    }[form]
    save_file(state, str(path), metadata={"modelkeeper.config": json.dumps(config)})
    extra: dict[str, Any] = {"dtype": "float32"}
    if form == "cast":
        extra["storage_dtype"] = "float8_e4m3fn"
    return path, "unet" if form in ("cast", "scaled") else "transformer", extra


def probe_output(module: torch.nn.Module) -> torch.Tensor:
    from modelkeeper.worker.validate import probes

    with torch.no_grad():
        return probes(module, seed=5)[0].run()


@pytest.mark.parametrize("form", ["cast", "fp8", "scaled", "gguf:Q4_K"])
def test_packed_weights_stream_packed_and_bit_identical(
    worker: InProcessWorker, tmp_path: Path, form: str
) -> None:
    path, kind, extra = packed_file(form, tmp_path)
    load = {"path": str(path), "type": kind, **extra}
    ref = worker.call(CommandType.LOAD_MODEL, {"name": "ref", **load})
    assert ref["storage"] is not None
    want = probe_output(worker.module("ref"))
    for fraction in (0.5, 0.0):
        got = worker.call(
            CommandType.LOAD_MODEL, {"name": "s", "offload": int(fraction * ref["bytes"]), **load}
        )
        assert got["storage"] == ref["storage"] and got["bytes"] == ref["bytes"]  # packed bytes, not decoded
        assert got["streamed_bytes"] > 0
        assert got["resident_bytes"] + got["streamed_bytes"] == ref["bytes"]
        stream = worker.service.get("s").streamer
        assert stream is not None
        packed = {p.dtype for u in stream.units if not u.resident for w in u.weights for p in [w.host]}
        assert packed & {torch.float8_e4m3fn, torch.uint8}  # the packed form is what travels
        for _ in range(2):
            assert torch.equal(probe_output(worker.module("s")), want)
        stats = info(worker, "s")
        stored = sum(
            w.host.numel() * w.host.element_size() for u in stream.units if not u.resident for w in u.weights
        )
        assert stats["streamed_bytes"] == stored  # the packed bytes: what crosses the link
        assert stats["streaming"]["copied_bytes"] >= stored
        worker.call(CommandType.UNLOAD_MODEL, {"name": "s"})
    worker.call(CommandType.UNLOAD_MODEL, {"name": "ref"})


def packed_sequential() -> torch.nn.Module:
    """Eight Linear layers whose weights are stored in fp8 (half of them scaled) and decoded by hooks."""
    from modelkeeper.worker.storage import Packed, StoragePlan, attach

    torch.manual_seed(0)
    module = torch.nn.Sequential(*[torch.nn.Linear(64, 64) for _ in range(8)])
    plan = StoragePlan(torch.float32)
    for i, layer in enumerate(module):
        assert isinstance(layer, torch.nn.Linear)
        scale = torch.tensor(0.5) if i % 2 else None
        layer.weight = torch.nn.Parameter(layer.weight.detach().to(torch.float8_e4m3fn), requires_grad=False)
        plan.packed[str(i)] = {"weight": Packed("scaled_float8_e4m3fn" if scale is not None else "float8_e4m3fn",
                                                (64, 64), scale=scale)}  # fmt: skip
    attach(module, plan)
    return module.eval()


def test_a_packed_layer_that_is_a_unit_decodes_from_the_ring(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(
        "modelkeeper.worker.streaming.units.GROUP_BYTES", 1
    )  # one unit per layer: the streamer's hook and the decode hook on one module
    x = torch.randn(3, 64, generator=torch.Generator().manual_seed(6))
    with torch.no_grad():
        want = packed_sequential()(x)
        module = packed_sequential()
        stream = streamed(module, "Sequential", 0.0, "cpu")
        assert len(stream.units) == 8 and sum(not u.resident for u in stream.units) == 7
        assert stream.streamed_bytes == 7 * (64 * 64 + 64 * 4)  # fp8 weights and float32 biases
        for _ in range(2):
            assert torch.equal(module(x), want)
        assert stream.stats.misses == 7  # the first pass only
        assert all(
            p.dtype == torch.float8_e4m3fn for layer in module for p in [layer.weight]
        )  # at rest: packed
    stream.close()


def test_streamed_weights_keep_their_resident_alignment(
    worker: InProcessWorker, demo: DemoManifest, worker_device: str
) -> None:
    """cuDNN and cuBLAS choose kernels by the alignment of the weights' addresses: every streamed weight
    must sit in the ring at the offset modulo ALIGN that it has in the resident model's buffer."""
    from modelkeeper.worker.streaming import ALIGN

    entry = demo["sdxl-unet"]
    worker.call(CommandType.LOAD_UNET, load_data(entry, demo.root, name="ref"))
    worker.call(CommandType.LOAD_UNET, load_data(entry, demo.root, name="s", offload=0))
    ref = dict(worker.module("ref").named_parameters())
    module = worker.module("s")
    names = {id(m): n for n, m in module.named_modules()}
    stream = worker.service.get("s").streamer
    assert stream is not None
    seen: dict[str, tuple[int, int]] = {}

    def check(unit: Any) -> Any:
        def hook(_m: torch.nn.Module, _args: Any) -> None:
            base = stream.ring.buffer.data_ptr()
            for w in unit.weights:
                owner, attr = w.places[0]
                name = f"{names[id(owner)]}.{attr}".lstrip(".")
                want = ref[name]
                got = owner._parameters[attr]
                assert got is not None and got.device.type == want.device.type
                seen[name] = (
                    (got.data_ptr() - base) % ALIGN,
                    (want.data_ptr() - want.untyped_storage().data_ptr()) % ALIGN,
                )

        return hook

    handles = [
        m.register_forward_pre_hook(check(u)) for u in stream.units if not u.resident for m in u.modules
    ]
    for _ in range(3):
        run_unet(module, worker_device)
    for h in handles:
        h.remove()
    assert len(seen) == sum(len(u.weights) for u in stream.units if not u.resident)
    wrong = {n: v for n, v in seen.items() if v[0] != v[1]}
    assert not wrong, wrong
    for name in ("ref", "s"):
        worker.call(CommandType.UNLOAD_MODEL, {"name": name})


def test_lora_on_a_streamed_packed_model_is_exact(
    worker: InProcessWorker, demo: DemoManifest, worker_device: str
) -> None:
    """A LoRA on packed weights adjusts each decoded weight (storage.set_adjust): the streamed bytes
    stay the packed ones, and the outputs equal the same LoRA on the resident packed model."""
    entry = demo["sdxl-unet"]
    packed = {"storage_dtype": "float8_e4m3fn"}
    ref = worker.call(CommandType.LOAD_UNET, load_data(entry, demo.root, name="ref", **packed))
    worker.call(CommandType.LOAD_UNET, load_data(entry, demo.root, name="s", offload=0, **packed))
    assert info(worker, "s")["streamed_bytes"] > 0 and ref["storage"] == "float8_e4m3fn"
    lora = str(demo.path("sdxl-lora-kohya"))
    before = run_unet(worker.module("s"), worker_device)
    for name, model in (("a", "ref"), ("b", "s")):
        worker.call(CommandType.LOAD_LORA, {"name": name, "path": lora, "targets": {"unet": model}})
    got = run_unet(worker.module("s"), worker_device)
    assert torch.equal(got, run_unet(worker.module("ref"), worker_device))
    assert not torch.equal(got, before)
    for name in ("a", "b"):
        worker.call(CommandType.SET_LORA_STRENGTH, {"name": name, "strength": 0.5})
    assert torch.equal(
        run_unet(worker.module("s"), worker_device), run_unet(worker.module("ref"), worker_device)
    )
    for name in ("a", "b"):
        worker.call(CommandType.UNLOAD_LORA, {"name": name})
    assert torch.equal(run_unet(worker.module("s"), worker_device), before)
    for name in ("ref", "s"):
        worker.call(CommandType.UNLOAD_MODEL, {"name": name})
