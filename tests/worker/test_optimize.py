"""Optimisations of live modules: applied, measured, refused when unknown, and reverted."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from diffusers.models.attention_processor import AttnProcessor, AttnProcessor2_0

from modelkeeper.protocol import CommandType, ErrorCode, ProtocolError
from modelkeeper.testing import DemoManifest, make_text_encoder, make_unet, make_vae, write_demo_models
from modelkeeper.worker import InProcessWorker
from modelkeeper.worker.errors import InvalidRequest
from modelkeeper.worker.fingerprint import fingerprint
from modelkeeper.worker.optimize import module_bytes, optimize, revert

from .conftest import load_data

pytestmark = pytest.mark.usefixtures("one_torch_thread")


def test_fp16_halves_the_bytes_and_reverts_bitwise(worker_device: str) -> None:
    for module in (make_unet("sd1").to(worker_device), make_vae("sd1").to(worker_device)):
        before = fingerprint(module)
        report = optimize(module, {"dtype": "float16"}, measure=False)
        assert report.bytes_before == module_bytes(module) * 2 == report.bytes_after * 2
        assert report.applied == [
            {"option": "dtype", "before": "float32", "after": "float16", "lossless": True}
        ]
        assert {p.dtype for p in module.parameters()} == {torch.float16}
        assert revert(module, report.undo) == ["dtype"]
        assert fingerprint(module) == before  # the demo weights are exact in float16


def test_loaded_model_bfloat16_is_lossy_and_measured(inproc: InProcessWorker, demo: DemoManifest) -> None:
    inproc.call(CommandType.LOAD_ENCODER, load_data(demo["clip-l"], demo.root, dtype="float32"))
    encoder = inproc.module("clip-l")
    report = optimize(encoder, {"dtype": "bfloat16", "attention": "default"})
    applied = {a["option"]: a for a in report.applied}
    assert applied["dtype"]["lossless"] is False  # float16-exact values need 11 bits of mantissa
    assert applied["attention"] == {"option": "attention", "before": "sdpa", "after": "eager"}
    assert report.latency_before_s and report.latency_after_s and report.speedup
    assert report.speedup == pytest.approx(report.latency_before_s / report.latency_after_s)
    assert report.memory_before > 0 and report.memory_after > 0
    revert(encoder, report.undo)
    assert encoder.config._attn_implementation == "sdpa"
    assert {p.dtype for p in encoder.parameters()} == {torch.float32}


def test_vae_flags_channels_last_attention_and_revert(worker_device: str) -> None:
    vae = make_vae("sd1").to(worker_device)
    before = fingerprint(vae)
    options = {"vae_slicing": True, "vae_tiling": True, "channels_last": True, "attention": "default"}
    report = optimize(vae, options, measure=False)
    assert [a["option"] for a in report.applied] == [
        "channels_last",
        "attention",
        "vae_slicing",
        "vae_tiling",
    ]
    assert vae.use_slicing and vae.use_tiling
    assert vae.decoder.conv_in.weight.is_contiguous(memory_format=torch.channels_last)
    assert {type(p) for p in vae.attn_processors.values()} == {AttnProcessor}
    assert report.bytes_before == report.bytes_after
    again = optimize(vae, {"vae_slicing": True}, measure=False)
    assert again.applied == [] and again.skipped == [{"option": "vae_slicing", "reason": "already on"}]
    revert(vae, report.undo)
    assert not vae.use_slicing and not vae.use_tiling
    assert vae.decoder.conv_in.weight.is_contiguous()
    assert {type(p) for p in vae.attn_processors.values()} == {AttnProcessor2_0}
    assert fingerprint(vae) == before


def test_unknown_or_bad_options_change_nothing() -> None:
    unet = make_unet("sd1")
    before = fingerprint(unet)
    for options, field in (({"dtype": "float16", "turbo": True}, "data.options.turbo"),
                           ({"dtype": "float8"}, "data.options.dtype"),
                           ({"channels_last": "yes"}, "data.options.channels_last"),
                           ({"attention": "flash"}, "data.options.attention")):  # fmt: skip
        with pytest.raises(InvalidRequest, match=field) as caught:
            optimize(unet, options)
        assert caught.value.code is ErrorCode.INVALID_REQUEST
    assert fingerprint(unet) == before and {p.dtype for p in unet.parameters()} == {torch.float32}


@pytest.mark.filterwarnings("ignore:`torch.jit.script_method` is deprecated:DeprecationWarning")
def test_inapplicable_options_are_skipped_and_compile_is_undone() -> None:
    encoder = make_text_encoder("clip_l")
    report = optimize(encoder, {"vae_tiling": True, "channels_last": True, "compile": True}, measure=False)
    assert {s["option"] for s in report.skipped} == {"vae_tiling", "channels_last"}
    assert encoder._compiled_call_impl is not None  # compiled lazily, on the first call
    assert revert(encoder, report.undo) == ["compile"]
    assert encoder._compiled_call_impl is None


def test_nothing_applied_reports_no_speedup() -> None:
    """Options that all are skipped change nothing: the latency before is measured (warm, as an
    after would be), but there is no after and no speedup figure for doing nothing."""
    encoder = make_text_encoder("clip_l")
    report = optimize(encoder, {"dtype": "float32", "vae_tiling": True})
    assert report.applied == [] and {s["option"] for s in report.skipped} == {"dtype", "vae_tiling"}
    assert report.latency_before_s is not None
    assert report.latency_after_s is None and report.speedup is None
    assert optimize(encoder, {}).latency_before_s is None  # no option: nothing measured at all


@pytest.mark.parametrize(
    ("entry", "kind"), [("sd3-transformer-q5_k", "transformer"), ("sdxl-unet-fp8-scaled", "unet")]
)
def test_a_dtype_on_a_packed_model_is_refused_and_changes_nothing(
    inproc: InProcessWorker, tmp_path: Path, entry: str, kind: str
) -> None:
    """A cast would turn packed bytes into numbers the decode hooks no longer read: the command
    refuses it before anything changes (a direct protocol call cannot break the model), and the
    model still runs; the other options still apply."""
    demo = write_demo_models(tmp_path, only=[entry])
    inproc.call(CommandType.LOAD_MODEL, load_data(demo[entry], demo.root, type=kind, dtype="float32"))
    module = inproc.module(entry)
    before = fingerprint(module)
    with pytest.raises(ProtocolError, match=r"data\.options\.dtype: .* is stored packed") as caught:
        inproc.call(CommandType.OPTIMIZE_MODEL, {"name": entry, "options": {"dtype": "bfloat16"}})
    assert caught.value.code is ErrorCode.INVALID_REQUEST
    assert fingerprint(module) == before
    assert inproc.call(CommandType.VALIDATE_MODEL, {"name": entry, "level": "functional"})["passed"]
