"""Unloaded modules become the skeletons of the next loads of their architecture: a switch
between models of one architecture builds nothing, and gives exactly the new model's weights."""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import save_file

from modelkeeper.protocol import CommandType
from modelkeeper.testing import DemoManifest
from modelkeeper.worker import InProcessWorker, assemble, server

from .conftest import assert_same_weights, load_data, reference


def _other_weights(demo: DemoManifest, tmp_path: Path) -> Path:
    """The SD1.5 demo UNet with every tensor changed (same architecture, other weights)."""
    source = demo.root / demo["sd15-unet"].path
    with safe_open(str(source), "pt") as f:
        metadata = f.metadata()
        tensors = {k: f.get_tensor(k) + 1 for k in f.keys()}  # noqa: SIM118 - not a mapping
    path = tmp_path / "other-unet.safetensors"
    save_file(tensors, str(path), metadata=metadata)
    return path


def test_a_switch_reuses_the_unloaded_module_and_loads_the_new_weights(
    inproc: InProcessWorker, demo: DemoManifest, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    entry = demo["sd15-unet"]
    other = _other_weights(demo, tmp_path)
    builds: list[str] = []
    real = assemble.skeleton

    def counting(class_name: str, config: dict[str, Any], *, path: str = "") -> torch.nn.Module:
        builds.append(class_name)
        return real(class_name, config, path=path)

    monkeypatch.setattr(assemble, "skeleton", counting)
    monkeypatch.setattr(server, "IDLE_WORK_AFTER_S", 3600.0)  # no build ahead in this test
    inproc.call(CommandType.LOAD_UNET, load_data(entry, demo.root, name="a"))
    first = inproc.module("a")
    first_id = id(first)
    del first
    assert len(builds) == 1
    inproc.call(CommandType.UNLOAD_MODEL, {"name": "a"})
    pool = inproc.service.skeletons
    assert pool.recycled == 1
    data = load_data(entry, demo.root, name="b")
    data["path"] = str(other)
    inproc.call(CommandType.LOAD_UNET, data)
    second = inproc.module("b")
    assert len(builds) == 1  # no construction: the module of "a" came back
    assert id(second) == first_id
    with safe_open(str(other), "pt") as f:
        for key, tensor in second.state_dict().items():
            assert torch.equal(tensor.cpu(), f.get_tensor(key)), key
    # and back: the original weights, bitwise as the factory made them
    del second, tensor
    inproc.call(CommandType.UNLOAD_MODEL, {"name": "b"})
    assert pool.recycled == 2
    inproc.call(CommandType.LOAD_UNET, load_data(entry, demo.root, name="c"))
    assert_same_weights(inproc.module("c"), reference(entry, "unet"))
    assert len(builds) == 1


def test_a_module_held_elsewhere_is_not_recycled(inproc: InProcessWorker, demo: DemoManifest) -> None:
    entry = demo["sd15-unet"]
    inproc.call(CommandType.LOAD_UNET, load_data(entry, demo.root, name="held"))
    held = inproc.module("held")  # e.g. a pipeline built in-process from the live module
    weights = {k: v.clone() for k, v in held.state_dict().items()}
    inproc.call(CommandType.UNLOAD_MODEL, {"name": "held"})
    assert inproc.service.skeletons.recycled == 0
    inproc.call(CommandType.LOAD_UNET, load_data(entry, demo.root, name="next"))
    assert inproc.module("next") is not held
    assert not any(p.is_meta for p in held.parameters())
    for key, tensor in held.state_dict().items():
        assert torch.equal(tensor, weights[key]), key


def test_a_lora_patched_or_optimized_module_is_not_recycled(
    inproc: InProcessWorker, demo: DemoManifest
) -> None:
    entry = demo["sd15-unet"]
    inproc.call(CommandType.LOAD_UNET, load_data(entry, demo.root, name="u"))
    inproc.call(
        CommandType.LOAD_LORA,
        {"name": "style", "path": str(demo.root / demo["sd15-lora-kohya"].path), "targets": {"unet": "u"}},
    )
    inproc.call(CommandType.UNLOAD_MODEL, {"name": "u"})
    assert inproc.service.skeletons.recycled == 0
    inproc.call(CommandType.LOAD_UNET, load_data(entry, demo.root, name="o"))
    inproc.call(
        CommandType.OPTIMIZE_MODEL, {"name": "o", "options": {"channels_last": True}, "measure": False}
    )
    inproc.call(CommandType.UNLOAD_MODEL, {"name": "o"})
    assert inproc.service.skeletons.recycled == 0


def test_skeletons_are_built_ahead_only_when_the_worker_is_idle(
    inproc: InProcessWorker, demo: DemoManifest
) -> None:
    entry = demo["sd15-unet"]
    inproc.call(CommandType.LOAD_UNET, load_data(entry, demo.root, name="x"))
    pool = inproc.service.skeletons
    config = json.loads(json.dumps(inproc.service.get("x").config))
    assert pool.wants("UNet2DConditionModel", config)  # nothing built next to the answer
    deadline = time.monotonic() + server.IDLE_WORK_AFTER_S + 10
    while pool.wants("UNet2DConditionModel", config) and time.monotonic() < deadline:
        time.sleep(0.05)
    assert not pool.wants("UNet2DConditionModel", config)  # built once the worker was idle
