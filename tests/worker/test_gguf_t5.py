"""A T5 GGUF in llama.cpp's names (as city96's T5-XXL GGUFs are): identified as a loadable T5-XXL with
its quant, loaded packed by the worker with the config its shapes imply, and its outputs against the
full-precision tiny T5 it was written from (the demo's own, same weights)."""

from __future__ import annotations

import math
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch

from modelkeeper.discovery.identify import identify_table
from modelkeeper.discovery.records import ModelFormat
from modelkeeper.discovery.tables import read_gguf_table
from modelkeeper.formats.gguf_header import packed_shape, read_gguf_header
from modelkeeper.testing import DemoManifest, make_text_encoder
from modelkeeper.testing.demo import write_demo_models
from modelkeeper.worker import InProcessWorker

from .conftest import output_cosine

pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.fixture(scope="module")
def demo(tmp_path_factory: pytest.TempPathFactory) -> DemoManifest:
    return write_demo_models(tmp_path_factory.mktemp("t5-gguf"), only=["t5", "t5-q8_0"])


@pytest.fixture(scope="module")
def worker() -> Iterator[InProcessWorker]:
    with InProcessWorker("cpu") as w:
        yield w


def test_the_demo_file_has_llama_cpp_names_and_no_config(demo: DemoManifest) -> None:
    header = read_gguf_header(demo.root / demo["t5-q8_0"].path)
    assert (
        header.metadata["general.architecture"] == "t5encoder" and "modelkeeper.config" not in header.metadata
    )
    assert header.metadata["t5encoder.attention.head_count"] == 4
    assert {"token_embd.weight", "enc.blk.0.attn_q.weight", "enc.blk.0.attn_rel_b.weight",
            "enc.blk.0.ffn_gate.weight", "enc.output_norm.weight"} <= set(header.tensors)  # fmt: skip
    assert header.tensors["enc.blk.0.attn_q.weight"].dtype == "Q8_0"


def test_identified_as_a_loadable_t5_xxl_with_its_quant(demo: DemoManifest) -> None:
    ident = identify_table(read_gguf_table(demo.root / demo["t5-q8_0"].path), ModelFormat.GGUF)
    assert (ident.type.value, ident.encoder and ident.encoder.value) == ("text_encoder", "t5_xxl")
    assert (ident.loadable, ident.quant, ident.evidence["hidden"], ident.rule) == (
        True, "Q8_0", 32, "text_encoder.t5.gguf")  # fmt: skip


def test_loads_packed_and_matches_the_full_precision_t5(worker: InProcessWorker, demo: DemoManifest) -> None:
    """With the known T5-XXL config the registry names for any T5-XXL (the file has no config of its
    own): the shapes and the t5encoder metadata make it the tiny T5 it is."""
    path = demo.root / demo["t5-q8_0"].path
    data = {"name": "gguf", "path": str(path), "type": "text_encoder", "config": "flux_dev/text_encoder_2"}
    result = worker.call("model.load_model", data)
    assert (result["storage"], result["class_name"], result["source"]["rule"]) == (
        "gguf:Q8_0", "T5EncoderModel", "t5/gguf")  # fmt: skip
    ref = make_text_encoder("t5")
    assert result["parameters"] == sum(t.numel() for t in ref.parameters())
    module = worker.module("gguf")
    assert (
        module.config.d_model == 32
        and module.config.num_heads == 4
        and module.config.layer_norm_epsilon == 1e-6
    )
    packed = {n for n, p in module.named_parameters() if p.dtype == torch.uint8}
    assert "shared.weight" in packed and "encoder.block.0.layer.0.SelfAttention.q.weight" in packed
    assert "encoder.block.0.layer.1.DenseReluDense.wo.weight" in packed  # decoded by its parent's hook
    # the packed layers hold the file's blocks, byte for byte; the whole model about 0.6 of fp16
    params = dict(module.named_parameters())
    blocks = [packed_shape(n, t.dtype, t.shape) for n, t in read_gguf_header(path).tensors.items()
              if t.dtype == "Q8_0"]  # fmt: skip
    assert sum(params[n].nbytes for n in packed) == sum(math.prod(shape) for shape in blocks)
    assert result["bytes"] <= 0.65 * 2 * result["parameters"]
    report = worker.call("model.validate_model", {"name": "gguf", "level": "functional"})
    assert report["passed"], [c for c in report["checks"] if not c["passed"]]
    assert output_cosine(module, ref) >= 0.999
    # against the demo's bf16 T5 as the worker loads it, on the same token ids
    worker.call("model.load_model", {"name": "bf16", "path": str(demo.root / demo["t5"].path),
                                     "type": "text_encoder", "dtype": "bfloat16"})  # fmt: skip
    ids = torch.randint(0, module.config.vocab_size, (2, 16), generator=torch.Generator().manual_seed(3))
    with torch.inference_mode():
        got = module(input_ids=ids).last_hidden_state.float().flatten()
        want = worker.module("bf16")(input_ids=ids).last_hidden_state.float().flatten()
    assert float(torch.nn.functional.cosine_similarity(got, want, dim=0)) >= 0.999
    for name in ("gguf", "bf16"):
        worker.call("model.unload_model", {"name": name})


@pytest.mark.parametrize(
    ("qtype", "cosine"), [("F16", 0.9999), ("Q8_0", 0.999), ("Q5_0", 0.995), ("Q4_0", 0.98)]
)
def test_other_quant_types(worker: InProcessWorker, tmp_path: Path, qtype: str, cosine: float) -> None:
    """The other types of city96's T5 GGUFs whose blocks fit the tiny T5's 32-wide rows, in float32."""
    from modelkeeper.testing.gguf_files import write_llama_t5_gguf

    ref = make_text_encoder("t5")
    path = tmp_path / f"t5-{qtype}.gguf"
    types = write_llama_t5_gguf(path, ref, qtype)
    assert types["enc.blk.0.attn_q.weight"] == qtype
    data = {"name": qtype, "path": str(path), "type": "text_encoder", "config": "flux_dev/text_encoder_2"}
    result = worker.call("model.load_model", data | {"dtype": "float32"})
    assert result["storage"] == (None if qtype == "F16" else f"gguf:{qtype}")
    assert output_cosine(worker.module(qtype), ref) >= cosine
    worker.call("model.unload_model", {"name": qtype})
