"""T5's feed-forward output layer (``DenseReluDense.wo``) stays packed like every other linear of an
fp8, scaled fp8 or GGUF T5: its decode hooks sit on the feed-forward module, whose forward casts the
hidden states to ``wo.weight.dtype`` before calling ``wo`` (transformers' T5DenseGatedActDense), so
that cast sees the compute dtype. Device bytes are the packed bytes plus the small unpacked tensors;
outputs are those of the same file with ``wo`` decoded at load (as before), bit for bit.

The bar against the bf16 T5 is 0.999 for Q8_0; fp8 rounding costs the tiny random T5 more (0.996 on
these inputs, with ``wo`` decoded at load or not)."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import torch

from modelkeeper.testing import DemoManifest
from modelkeeper.testing.demo import write_demo_models
from modelkeeper.worker import InProcessWorker
from modelkeeper.worker.storage import hook_site, plan_of

pytestmark = pytest.mark.usefixtures("one_torch_thread")

FORMS = {"t5-fp8-e4m3fn": "float8_e4m3fn", "t5-fp8-scaled": "scaled_float8_e4m3fn", "t5-q8_0": "gguf:Q8_0"}
COSINE = {"t5-fp8-e4m3fn": 0.99, "t5-fp8-scaled": 0.99, "t5-q8_0": 0.999}
WO = "encoder.block.0.layer.1.DenseReluDense.wo"


@pytest.fixture(scope="module")
def demo(tmp_path_factory: pytest.TempPathFactory) -> DemoManifest:
    return write_demo_models(tmp_path_factory.mktemp("t5-wo"), only=["t5", *FORMS])


@pytest.fixture(scope="module")
def worker(demo: DemoManifest, worker_device: str) -> Iterator[InProcessWorker]:
    with InProcessWorker(worker_device) as w:
        w.call("model.load_model", {"name": "bf16", "path": str(demo.root / demo["t5"].path),
                                    "type": "text_encoder", "dtype": "bfloat16"})  # fmt: skip
        yield w


def load(worker: InProcessWorker, demo: DemoManifest, entry: str, name: str | None = None) -> dict[str, Any]:
    data = {"name": name or entry, "path": str(demo.root / demo[entry].path), "type": "text_encoder"}
    if entry.endswith("q8_0"):
        data["config"] = "flux_dev/text_encoder_2"  # a llama.cpp-named GGUF carries no config
    result: dict[str, Any] = worker.call("model.load_model", data)
    return result


def decode_wo_at_load(module: torch.nn.Module) -> None:
    """``module`` as loads kept it before: each ``wo`` decoded once, out of the storage plan."""
    plan = plan_of(module)
    assert plan is not None
    for owner, attrs in plan.packed.items():
        if owner.endswith(".wo"):
            layer = module.get_submodule(owner)
            layer.weight = torch.nn.Parameter(attrs.pop("weight").decode(layer.weight, plan.compute), False)


def outputs(module: torch.nn.Module, ids: torch.Tensor) -> torch.Tensor:
    with torch.inference_mode():
        out: torch.Tensor = module(input_ids=ids.to(module.device)).last_hidden_state.float().flatten()
    return out.cpu()


def unique_bytes(module: torch.nn.Module) -> int:
    tensors = [*module.parameters(), *module.buffers()]
    return sum({t.data_ptr(): t.numel() * t.element_size() for t in tensors}.values())


@pytest.mark.parametrize("entry", list(FORMS))
def test_wo_stays_packed_and_the_outputs_match_bf16(
    worker: InProcessWorker, demo: DemoManifest, entry: str
) -> None:
    result = load(worker, demo, entry)
    assert result["storage"] == FORMS[entry]
    module = worker.module(entry)
    plan = plan_of(module)
    assert plan is not None and plan.compute == torch.bfloat16
    wo = module.get_submodule(WO)
    assert wo.weight.dtype in (torch.float8_e4m3fn, torch.uint8)  # at rest: the stored form
    assert hook_site(module, WO) == WO.rpartition(".")[0]
    # every linear of the encoder is packed; what is not is small (norms, the relative position table)
    linears = {n for n, m in module.named_modules() if isinstance(m, torch.nn.Linear | torch.nn.Embedding)}
    unpacked = linears - set(plan.packed) - {"encoder.embed_tokens"}  # tied to ``shared``
    assert unpacked <= {"encoder.block.0.layer.0.SelfAttention.relative_attention_bias"}  # F32 in GGUF
    packed = {id(getattr(module.get_submodule(o), a)) for o, attrs in plan.packed.items() for a in attrs}
    packed_bytes = sum(p.nbytes for p in module.parameters() if id(p) in packed)
    rest = sum(p.nbytes for p in module.parameters() if id(p) not in packed)
    assert result["bytes"] == unique_bytes(module) == packed_bytes + rest
    assert rest <= 0.05 * packed_bytes
    # T5's cast of the hidden states before ``wo`` sees the compute dtype, not fp8 or GGUF bytes
    seen: list[tuple[torch.dtype, torch.dtype]] = []
    handle = wo.register_forward_pre_hook(lambda m, args: seen.append((args[0].dtype, m.weight.dtype)))
    ids = torch.randint(0, module.config.vocab_size, (2, 16), generator=torch.Generator().manual_seed(5))
    try:
        got = outputs(module, ids)
    finally:
        handle.remove()
    assert seen and set(seen) == {(torch.bfloat16, torch.bfloat16)}
    assert wo.weight.dtype in (torch.float8_e4m3fn, torch.uint8)  # put back after the forward
    load(worker, demo, entry, "before")
    decode_wo_at_load(worker.module("before"))
    assert torch.equal(got, outputs(worker.module("before"), ids))
    want = outputs(worker.module("bf16"), ids)
    assert float(torch.nn.functional.cosine_similarity(got, want, dim=0)) >= COSINE[entry]
    for name in (entry, "before"):
        worker.call("model.unload_model", {"name": name})


def test_a_storage_cast_packs_wo_too(worker: InProcessWorker, demo: DemoManifest) -> None:
    data = {"name": "cast", "path": str(demo.root / demo["t5"].path), "type": "text_encoder",
            "dtype": "bfloat16", "storage_dtype": "float8_e4m3fn"}  # fmt: skip
    assert worker.call("model.load_model", data)["storage"] == "float8_e4m3fn"
    module = worker.module("cast")
    assert module.get_submodule(WO).weight.dtype == torch.float8_e4m3fn
    ids = torch.arange(16).reshape(1, 16)
    got, want = outputs(module, ids), outputs(worker.module("bf16"), ids)
    assert float(torch.nn.functional.cosine_similarity(got, want, dim=0)) >= 0.99
    worker.call("model.unload_model", {"name": "cast"})


def test_a_streamed_packed_t5_decodes_wo_from_the_ring(worker: InProcessWorker, tmp_path: Path) -> None:
    """A six-block T5 at Q8_0 with offload 0 streams its blocks: the block's pre-hook points ``wo`` at
    its ring view before the feed-forward's hook decodes it; outputs bit-identical to the resident load."""
    from modelkeeper.testing import make_text_encoder
    from modelkeeper.testing.gguf_files import write_llama_t5_gguf

    config = make_text_encoder("t5").config
    config.num_layers = 6
    torch.manual_seed(7)
    path = tmp_path / "t5-6-Q8_0.gguf"
    write_llama_t5_gguf(path, type(make_text_encoder("t5"))(config).eval(), "Q8_0")
    data = {"path": str(path), "type": "text_encoder", "config": "flux_dev/text_encoder_2"}
    ids = torch.arange(16).reshape(1, 16)
    worker.call("model.load_model", {"name": "r", **data})
    want = outputs(worker.module("r"), ids)
    assert worker.call("model.load_model", {"name": "s", "offload": 0, **data})["streamed_bytes"] > 0
    stream = worker.service.get("s").streamer
    assert stream is not None
    assert any(w.host.dtype == torch.uint8 for u in stream.units if not u.resident for w in u.weights)
    for _ in range(2):
        assert torch.equal(outputs(worker.module("s"), ids), want)
    for name in ("s", "r"):
        worker.call("model.unload_model", {"name": name})


def test_an_adjustment_on_wo_applies_and_comes_off_exactly(
    worker: InProcessWorker, demo: DemoManifest
) -> None:
    """A LoRA's seam (:func:`set_adjust`) on ``wo``: read from the layer by the hook on its parent."""
    from modelkeeper.worker.storage import set_adjust

    load(worker, demo, "t5-q8_0")
    module = worker.module("t5-q8_0")
    ids = torch.arange(16).reshape(1, 16)
    before = outputs(module, ids)
    stored = module.get_submodule(WO).weight.clone()
    set_adjust(module, f"{WO}.weight", lambda w: w.mul_(0.0))
    changed = outputs(module, ids)
    assert not torch.equal(changed, before)
    set_adjust(module, f"{WO}.weight", None)
    assert torch.equal(outputs(module, ids), before)
    assert torch.equal(module.get_submodule(WO).weight, stored)  # the stored bytes never written
    worker.call("model.unload_model", {"name": "t5-q8_0"})
