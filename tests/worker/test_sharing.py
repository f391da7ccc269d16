"""A part loaded for two placements on one device is one module there (``worker/sharing.py``): the
parts of two tiny Flux transformers (Q8_0 and fp8) share their CLIP-L, T5 and VAE, their bytes
count once, the module stays while one name holds it and goes with the last; a different form is
loaded apart; a LoRA that patches a shared part gives that name its own copy first (copy on write)
and leaves the other name's weights as they were. In-process, and once through a worker subprocess;
on the device of ``--worker-device`` (the CPU by default; ``cuda:0`` adds the test of the VRAM)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import torch
from safetensors.torch import save_file

from modelkeeper.protocol import CommandType, ErrorCode, ProtocolError, WorkerProcess
from modelkeeper.testing import DemoManifest
from modelkeeper.testing.demo import write_demo_models
from modelkeeper.testing.loras import kohya_lora_state_dict
from modelkeeper.worker import InProcessWorker
from modelkeeper.worker.fingerprint import fingerprint

from .conftest import src
from .test_vram_release import TOLERANCE, big_unet, free_bytes

PARTS = {"text_encoder": "clip-l", "text_encoder_2": "t5", "vae": "flux-vae"}
TRANSFORMERS = {"a": "flux-transformer-q8_0", "b": "flux-transformer-fp8-e4m3fn"}
TYPES = {"text_encoder": "text_encoder", "text_encoder_2": "text_encoder", "vae": "vae"}

pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.fixture(scope="module")
def flux_demo(tmp_path_factory: pytest.TempPathFactory) -> DemoManifest:
    return write_demo_models(
        tmp_path_factory.mktemp("sharing"), only=[*PARTS.values(), *TRANSFORMERS.values()]
    )


@pytest.fixture
def clip_lora(tmp_path: Path) -> Path:
    """A kohya LoRA of the CLIP-L text encoder only (its ``lora_te_`` keys)."""
    state = {k: v for k, v in kohya_lora_state_dict("sd1").items() if k.startswith("lora_te_")}
    path = tmp_path / "clip-only.safetensors"
    save_file(state, str(path))
    return path


def load_part(w: Any, demo: DemoManifest, model: str, role: str, **extra: Any) -> dict[str, Any]:
    """``role`` of placement ``model``, loaded as the orchestrator asks for a part: with a share token."""
    data = {"name": f"{model}/{role}", "type": TYPES[role], "share": f"part:{PARTS[role]}",
            **src(demo, PARTS[role]), **extra}  # fmt: skip
    result: dict[str, Any] = w.call(CommandType.LOAD_MODEL, data)
    return result


def load_placement(w: Any, demo: DemoManifest, model: str) -> dict[str, dict[str, Any]]:
    out = {"transformer": w.call(CommandType.LOAD_MODEL, {
        "name": f"{model}/transformer", "type": "transformer", **src(demo, TRANSFORMERS[model])})}  # fmt: skip
    for role in PARTS:
        out[role] = load_part(w, demo, model, role)
    return out


def models_bytes(w: Any) -> int:
    info = w.call(CommandType.GET_MODEL_INFO, {})
    return int(info["memory"]["models_bytes"])


def test_two_placements_share_their_parts_and_count_them_once(
    inproc: InProcessWorker, flux_demo: DemoManifest
) -> None:
    w = inproc
    a = load_placement(w, flux_demo, "a")
    b = load_placement(w, flux_demo, "b")
    for role in PARTS:
        assert w.module(f"a/{role}") is w.module(f"b/{role}")
        assert a[role]["shared_with"] == [] and b[role]["shared_with"] == [f"a/{role}"]
        assert a[role]["share"] == b[role]["share"] is not None
        assert b[role]["bytes"] == a[role]["bytes"] > 0
    assert w.module("a/transformer") is not w.module("b/transformer")
    parts = sum(a[role]["bytes"] for role in PARTS)
    transformers = a["transformer"]["bytes"] + b["transformer"]["bytes"]
    assert models_bytes(w) == transformers + parts == b["vae"]["memory"]["models_bytes"]
    listed = {m["name"]: m for m in w.call(CommandType.GET_MODEL_INFO, {})["models"]}
    assert listed["a/text_encoder_2"]["shared_with"] == ["b/text_encoder_2"]
    assert listed["a/transformer"]["shared_with"] == []

    for role in ("transformer", *PARTS):  # the first placement goes: its parts stay for the second
        freed = w.call(CommandType.UNLOAD_MODEL, {"name": f"a/{role}"})["freed_bytes"]
        assert freed == (a["transformer"]["bytes"] if role == "transformer" else 0)
    assert models_bytes(w) == b["transformer"]["bytes"] + parts
    for role in ("transformer", *PARTS):
        checked = w.call(CommandType.VALIDATE_MODEL, {"name": f"b/{role}", "level": "functional"})
        assert checked["passed"], checked
    assert w.call(CommandType.GET_MODEL_INFO, {"name": "b/vae"})["models"][0]["shared_with"] == []

    freed = sum(w.call(CommandType.UNLOAD_MODEL, {"name": f"b/{role}"})["freed_bytes"] for role in PARTS)
    assert freed == parts
    w.call(CommandType.UNLOAD_MODEL, {"name": "b/transformer"})
    assert models_bytes(w) == 0 and w.service.model_count() == 0


def test_another_form_or_a_streamed_load_is_loaded_apart(
    inproc: InProcessWorker, flux_demo: DemoManifest
) -> None:
    w = inproc
    first = load_part(w, flux_demo, "a", "text_encoder_2")
    cast = load_part(w, flux_demo, "b", "text_encoder_2", dtype="float16")
    streamed = load_part(w, flux_demo, "c", "text_encoder_2", offload="auto")
    plain = w.call(CommandType.LOAD_MODEL, {"name": "d", "type": "text_encoder", **src(flux_demo, "t5")})
    modules = {id(w.module(n)) for n in ("a/text_encoder_2", "b/text_encoder_2", "c/text_encoder_2", "d")}
    assert len(modules) == 4
    assert first["share"] != cast["share"] and streamed["share"] is None and plain["share"] is None
    assert all(r["shared_with"] == [] for r in (first, cast, streamed, plain))
    again = load_part(w, flux_demo, "e", "text_encoder_2", dtype="float16")
    assert again["shared_with"] == ["b/text_encoder_2"] and w.module("e/text_encoder_2") is w.module(
        "b/text_encoder_2"
    )
    w.call(CommandType.CLEANUP)
    assert models_bytes(w) == 0


def test_a_lora_on_a_shared_part_gives_that_placement_its_own_copy(
    inproc: InProcessWorker, flux_demo: DemoManifest, clip_lora: Path
) -> None:
    w = inproc
    for model in ("a", "b"):
        for role in ("text_encoder", "text_encoder_2"):
            load_part(w, flux_demo, model, role)
    shared = models_bytes(w)
    clip = w.module("a/text_encoder")
    original = fingerprint(clip)
    report = w.call(CommandType.LOAD_LORA, {
        "name": "l", "path": str(clip_lora),
        "targets": {"text_encoder": "a/text_encoder", "text_encoder_2": "a/text_encoder_2"}})  # fmt: skip
    assert report["unshared"] == ["a/text_encoder"]  # the T5 has no key of it: it stays shared
    assert w.module("a/text_encoder_2") is w.module("b/text_encoder_2")
    own = w.module("a/text_encoder")
    assert own is not clip and w.module("b/text_encoder") is clip
    assert fingerprint(clip) == original != fingerprint(own)  # the other placement's CLIP is untouched
    clip_bytes = w.call(CommandType.GET_MODEL_INFO, {"name": "a/text_encoder"})["models"][0]["bytes"]
    assert models_bytes(w) == shared + clip_bytes
    info = {m["name"]: m for m in w.call(CommandType.GET_MODEL_INFO, {})["models"]}
    assert info["a/text_encoder"]["share"] is None and info["b/text_encoder"]["shared_with"] == []
    w.call(CommandType.SET_LORA_STRENGTH, {"name": "l", "strength": 0.5})
    w.call(CommandType.UNLOAD_LORA, {"name": "l"})
    assert fingerprint(own) == original
    # a patched module is shared no more: a third placement loads its own
    w.call(
        CommandType.LOAD_LORA,
        {"name": "l2", "path": str(clip_lora), "targets": {"text_encoder": "b/text_encoder"}},
    )
    assert w.call(CommandType.UNLOAD_MODEL, {"name": "a/text_encoder"})["freed_bytes"] == clip_bytes
    third = load_part(w, flux_demo, "c", "text_encoder")
    assert third["shared_with"] == [] and w.module("c/text_encoder") is not clip
    w.call(CommandType.CLEANUP)


def test_a_worker_process_shares_a_part(worker_device: str, flux_demo: DemoManifest) -> None:
    proc = WorkerProcess(worker_device)
    try:
        first = load_part(proc, flux_demo, "a", "text_encoder_2")
        second = load_part(proc, flux_demo, "b", "text_encoder_2")
        assert second["shared_with"] == ["a/text_encoder_2"]
        assert models_bytes(proc) == first["bytes"] == second["memory"]["models_bytes"]
        assert proc.call(CommandType.UNLOAD_MODEL, {"name": "a/text_encoder_2"})["freed_bytes"] == 0
        checked = proc.call(CommandType.VALIDATE_MODEL, {"name": "b/text_encoder_2", "level": "functional"})
        assert checked["passed"]
        assert (
            proc.call(CommandType.UNLOAD_MODEL, {"name": "b/text_encoder_2"})["freed_bytes"] == first["bytes"]
        )
        assert models_bytes(proc) == 0
    finally:
        assert proc.stop() == 0


def test_a_copy_that_does_not_fit_is_refused_naming_both_names(
    worker_device: str, flux_demo: DemoManifest, clip_lora: Path
) -> None:
    """The budget holds one CLIP-L: the copy a LoRA needs cannot be loaded, and nothing changes."""
    with InProcessWorker(worker_device) as probe:
        size = load_part(probe, flux_demo, "a", "text_encoder")["bytes"]
    with InProcessWorker(worker_device, budget_mb=size * 1.5 / 2**20) as w:
        load_part(w, flux_demo, "a", "text_encoder")
        load_part(w, flux_demo, "b", "text_encoder")
        clip = w.module("a/text_encoder")
        before = fingerprint(clip)
        with pytest.raises(ProtocolError) as err:
            w.call(CommandType.LOAD_LORA, {"name": "l", "path": str(clip_lora), "targets": {"text_encoder": "a/text_encoder"}})  # fmt: skip
        assert err.value.code is ErrorCode.INSUFFICIENT_MEMORY
        assert "'a/text_encoder' shares its module with b/text_encoder" in err.value.message
        assert "before LoRA 'l' patches it" in err.value.message
        assert (
            w.module("a/text_encoder") is clip is w.module("b/text_encoder") and fingerprint(clip) == before
        )
        assert models_bytes(w) == size and w.service.loras.names() == []


def test_an_optimisation_of_a_shared_part_changes_its_own_copy(
    inproc: InProcessWorker, flux_demo: DemoManifest
) -> None:
    w = inproc
    load_part(w, flux_demo, "a", "vae")
    load_part(w, flux_demo, "b", "vae")
    vae = w.module("b/vae")
    before = fingerprint(vae)
    answer = w.call(
        CommandType.OPTIMIZE_MODEL, {"name": "a/vae", "options": {"dtype": "float32"}, "measure": False}
    )
    assert answer["unshared"] == ["a/vae"]
    assert w.module("a/vae") is not vae and fingerprint(vae) == before
    assert next(p for p in vae.parameters()).dtype != next(p for p in w.module("a/vae").parameters()).dtype
    w.call(CommandType.CLEANUP)


def test_a_shared_module_takes_vram_once_and_the_last_unload_hands_it_back(
    worker_device: str, flux_demo: DemoManifest, tmp_path: Path
) -> None:
    """``pytest tests/worker/test_sharing.py --worker-device cuda:0``: a 320 MB UNet loaded under
    two names with one share token takes the GPU's memory once; the first unload frees nothing,
    the last gives it all back to the device (as another process sees it)."""
    if not worker_device.startswith("cuda"):
        pytest.skip("needs a GPU: --worker-device cuda:0")
    device = torch.device(worker_device)
    path = str(big_unet(tmp_path / "unet.safetensors"))
    with WorkerProcess(worker_device) as worker:
        warm = {"name": "warm", "type": "text_encoder", **src(flux_demo, "clip-l")}
        worker.call(CommandType.LOAD_MODEL, warm)  # the context and one-time allocations first
        worker.call(CommandType.UNLOAD_MODEL, {"name": "warm"})
        before = free_bytes(device)
        first = worker.call(CommandType.LOAD_UNET, {"name": "a/unet", "path": path, "share": "big"})
        once = free_bytes(device)
        assert before - once >= first["bytes"] - TOLERANCE
        second = worker.call(CommandType.LOAD_UNET, {"name": "b/unet", "path": path, "share": "big"})
        assert second["shared_with"] == ["a/unet"] and abs(free_bytes(device) - once) < TOLERANCE
        assert second["memory"]["models_bytes"] == first["bytes"]
        assert worker.call(CommandType.UNLOAD_MODEL, {"name": "a/unet"})["freed_bytes"] == 0
        assert abs(free_bytes(device) - once) < TOLERANCE
        assert worker.call(CommandType.UNLOAD_MODEL, {"name": "b/unet"})["freed_bytes"] == first["bytes"]
        assert before - free_bytes(device) < TOLERANCE
