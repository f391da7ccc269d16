"""GGUF transformers kept packed on the device: every quant type users download, against full precision."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest
import torch

from modelkeeper.formats.gguf_header import read_gguf_header
from modelkeeper.testing import component_config, make_transformer
from modelkeeper.testing.gguf_files import GGUF_TYPES, write_gguf
from modelkeeper.worker import InProcessWorker

from .conftest import output_cosine

pytestmark = pytest.mark.usefixtures("one_torch_thread")

#: Least cosine of the outputs against the full-precision model (the issue: 0.999 for Q8_0, 0.98 for 4-bit).
COSINE = {
    "F16": 0.9999,
    "BF16": 0.9999,
    "Q8_0": 0.999,
    "Q6_K": 0.999,
    "Q5_K": 0.995,
    "Q4_K": 0.98,
    "Q4_0": 0.98,
}


@pytest.fixture(scope="module")
def refs() -> dict[str, torch.nn.Module]:
    return {kind: make_transformer(kind) for kind in ("flux", "sd3")}  # type: ignore[arg-type]


@pytest.fixture(scope="module")
def worker() -> Iterator[InProcessWorker]:
    with InProcessWorker("cpu") as w:
        yield w


@pytest.mark.parametrize("qtype", GGUF_TYPES)
@pytest.mark.parametrize("kind", ["flux", "sd3"])
def test_gguf_loads_packed_and_matches_full_precision(
    worker: InProcessWorker, refs: dict[str, torch.nn.Module], tmp_path: Path, kind: str, qtype: str
) -> None:
    ref = refs[kind]
    path = tmp_path / f"{kind}-{qtype}.gguf"
    types = write_gguf(path, ref.state_dict(), qtype, arch=kind, config=component_config(ref))
    data = {"name": f"{kind}-{qtype}", "path": str(path), "type": "transformer"}
    result = worker.call("model.load_model", data)
    quantized = qtype not in ("F16", "BF16")
    assert result["storage"] == (f"gguf:{qtype}" if quantized else None)
    assert result["parameters"] == sum(t.numel() for t in ref.parameters())
    if quantized:
        file_bytes = sum(t.nbytes for t in read_gguf_header(path).tensors.values())
        assert abs(result["bytes"] - file_bytes) <= 0.05 * file_bytes
        module = worker.module(data["name"])
        params = dict(module.named_parameters())
        packed = {n for n, p in params.items() if p.dtype == torch.uint8}
        assert packed == {n for n, t in types.items() if t == qtype and n in params}  # buffers are decoded
    report = worker.call("model.validate_model", {"name": data["name"], "level": "functional"})
    assert report["passed"], [c for c in report["checks"] if not c["passed"]]
    worker.call("model.load_model", data | {"dtype": "float32", "replace": True})
    assert output_cosine(worker.module(data["name"]), ref) >= COSINE[qtype]
    worker.call("model.unload_model", {"name": data["name"]})


def test_unknown_quant_type_is_refused_with_the_tensor(
    tmp_path: Path, refs: dict[str, torch.nn.Module]
) -> None:
    import gguf

    from modelkeeper.formats.errors import UnsupportedFormat
    from modelkeeper.formats.gguf_header import as_safetensors_header

    path = tmp_path / "iq.gguf"
    writer = gguf.GGUFWriter(str(path), "flux")
    writer.add_tensor(
        "w", torch.zeros(4, 66, dtype=torch.uint8).numpy(), raw_dtype=gguf.GGMLQuantizationType.IQ2_XXS
    )
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    with pytest.raises(UnsupportedFormat, match=r"tensor 'w' is of GGML type"):
        as_safetensors_header(path)


def test_gguf_through_the_ram_cache(
    worker: InProcessWorker, refs: dict[str, torch.nn.Module], tmp_path: Path
) -> None:
    """A GGUF file's segment (its blocks repacked as uint8 tensors, the types in the metadata) loads
    packed as the file does, with the same outputs."""
    from modelkeeper.cache import RamCache

    ref = refs["flux"]
    path = tmp_path / "flux-Q4_K.gguf"
    write_gguf(path, ref.state_dict(), "Q4_K", arch="flux", config=component_config(ref))
    cache = RamCache(64 << 20)
    try:
        segment = cache.cache_file(path)
        data = {"type": "transformer", "dtype": "float32", "config": component_config(ref)}
        from_file = worker.call("model.load_model", {"name": "file", "path": str(path), **data})
        cached = worker.call("model.load_model", {"name": "ram", "path": str(segment.path), **data})
        assert cached["storage"] == from_file["storage"] == "gguf:Q4_K"
        assert cached["bytes"] == from_file["bytes"]
        assert output_cosine(worker.module("ram"), worker.module("file")) >= 0.999999
        for name in ("file", "ram"):
            worker.call("model.unload_model", {"name": name})
        worker.call("model.release_segments", {})
    finally:
        cache.close()


def test_original_flux_layout_keeps_blocks_packed_through_conversion() -> None:
    """city96's Flux GGUFs use Black Forest Labs' keys: diffusers' converter splits the fused q/k/v and
    MLP rows of the packed blocks (rows hold whole blocks), the pieces stay views, and every weight of
    a Linear stays packed at its logical shape (full-size Flux, on the meta device)."""
    import gguf
    from diffusers.quantizers.gguf.utils import GGUFParameter

    from modelkeeper.formats.gguf_header import packed_shape
    from modelkeeper.formats.known_configs import load_known_config
    from modelkeeper.protocol.messages import ModelKind
    from modelkeeper.testing.gguf_files import stored_type
    from modelkeeper.worker import assemble, convert, storage
    from modelkeeper.worker.weights import TensorEntry
    from tests.discovery.stripped import flux_bfl

    config = dict(load_known_config("flux_dev", "transformer"))
    shapes = {k: s for k, (_, s) in flux_bfl(guidance=True).items()}
    state: dict[str, torch.Tensor] = {}
    for key, shape in shapes.items():
        kind = stored_type("Q4_K", key, shape)
        if kind == "Q4_K":
            raw = torch.empty(packed_shape(key, kind, shape), dtype=torch.uint8, device="meta")
            state[key] = GGUFParameter(raw, quant_type=gguf.GGMLQuantizationType.Q4_K)
        else:
            state[key] = torch.empty(
                shape, dtype=torch.float16 if kind == "F16" else torch.float32, device="meta"
            )
    entries = {k: TensorEntry(Path("flux.gguf"), k, "U8", tuple(v.shape), 0) for k, v in state.items()}
    plan = convert.plan_component(ModelKind.TRANSFORMER, entries, config)
    assert plan.rule.name == "flux/original"
    converted = convert.to_loadable(plan, state, config)
    q = converted["transformer_blocks.0.attn.to_q.weight"]
    assert isinstance(q, GGUFParameter) and tuple(q.shape) == (3072, 3072 // 256 * 144)
    quantized = {k for k, v in converted.items() if isinstance(v, GGUFParameter)}
    skel = assemble.Skeleton.prepare(assemble.skeleton("FluxTransformer2DModel", config))
    out, plan_ = storage.plan_storage(skel.module, converted, compute=torch.bfloat16, storage=None)
    module = assemble.build_module("FluxTransformer2DModel", config, out, torch.device("meta"), module=skel,
                                   shapes=plan_.logical_shapes())  # fmt: skip
    packed = plan_.logical_shapes()
    assert plan_.form == "gguf:Q4_K" and set(packed) == quantized and len(quantized) > 400
    assert all(module.get_parameter(k).dtype == torch.uint8 for k in packed)
    assert all(packed[k] == skel.expected[k] for k in packed)
