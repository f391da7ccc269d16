"""Every bad input gets an error response with the right code and a message naming the file or field;
the worker keeps serving."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest

from modelkeeper.protocol import CommandType, ErrorCode, ProtocolError, WorkerProcess
from modelkeeper.testing import DemoManifest

from .conftest import src


def _expect(
    worker: WorkerProcess, command: str, data: dict[str, object], code: ErrorCode, *needles: str
) -> None:
    with pytest.raises(ProtocolError) as info:
        worker.call(command, data)
    assert info.value.code is code, info.value
    for needle in needles:
        assert needle in info.value.message, info.value.message
    assert worker.call(CommandType.GET_STATUS)["state"] == "idle"


def test_missing_file(worker: WorkerProcess, tmp_path: Path) -> None:
    missing = tmp_path / "nope.safetensors"
    _expect(
        worker,
        CommandType.LOAD_UNET,
        {"name": "m", "path": str(missing)},
        ErrorCode.FILE_NOT_FOUND,
        str(missing),
    )


def test_folder_without_config(worker: WorkerProcess, demo: DemoManifest, tmp_path: Path) -> None:
    folder = tmp_path / "noconfig"
    shutil.copytree(demo.path("sd15-unet-folder"), folder)
    (folder / "config.json").unlink()
    _expect(worker, CommandType.LOAD_UNET, {"name": "m", "path": str(folder)}, ErrorCode.FILE_NOT_FOUND,
            str(folder), "config.json")  # fmt: skip


def test_broken_config_json(worker: WorkerProcess, demo: DemoManifest, tmp_path: Path) -> None:
    folder = tmp_path / "badconfig"
    shutil.copytree(demo.path("sd15-unet-folder"), folder)
    (folder / "config.json").write_text("{not json", encoding="utf-8")
    _expect(worker, CommandType.LOAD_UNET, {"name": "m", "path": str(folder)}, ErrorCode.INVALID_MODEL_FILE,
            "config.json", "not valid JSON")  # fmt: skip


def test_unknown_type(worker: WorkerProcess, demo: DemoManifest) -> None:
    _expect(worker, CommandType.LOAD_MODEL, {"name": "m", **src(demo, "sd15-vae"), "type": "rocket"},
            ErrorCode.INVALID_REQUEST, "data.type")  # fmt: skip


def test_missing_type_for_load_model(worker: WorkerProcess, demo: DemoManifest) -> None:
    _expect(worker, CommandType.LOAD_MODEL, {"name": "m", **src(demo, "sd15-vae")},
            ErrorCode.INVALID_REQUEST, "data.type")  # fmt: skip


def test_wrong_kind_for_the_file(worker: WorkerProcess, demo: DemoManifest) -> None:
    path = str(demo.path("sd15-vae"))
    _expect(worker, CommandType.LOAD_UNET, {"name": "m", "path": path, "config": "sd1/unet"},
            ErrorCode.INVALID_MODEL_FILE, path, "no unet weights")  # fmt: skip


def test_truncated_safetensors(worker: WorkerProcess, demo: DemoManifest, tmp_path: Path) -> None:
    original = demo.path("sd15-vae")
    broken = tmp_path / "truncated.safetensors"
    data = original.read_bytes()
    broken.write_bytes(data[: len(data) // 2])
    _expect(worker, CommandType.LOAD_VAE, {"name": "m", "path": str(broken)}, ErrorCode.INVALID_MODEL_FILE,
            str(broken))  # fmt: skip


def test_not_a_safetensors_file(worker: WorkerProcess, tmp_path: Path) -> None:
    junk = tmp_path / "junk.safetensors"
    junk.write_bytes(b"\x00" * 3)
    _expect(
        worker,
        CommandType.LOAD_VAE,
        {"name": "m", "path": str(junk)},
        ErrorCode.INVALID_MODEL_FILE,
        str(junk),
    )


def test_broken_gguf_is_an_invalid_file(worker: WorkerProcess, tmp_path: Path) -> None:
    """GGUF files load (docs/FORMATS.md); one that is not a GGUF file is named as broken."""
    path = tmp_path / "model.gguf"
    path.write_bytes(b"PK\x03\x04")
    _expect(
        worker,
        CommandType.LOAD_UNET,
        {"name": "m", "path": str(path)},
        ErrorCode.INVALID_MODEL_FILE,
        str(path),
    )


@pytest.mark.parametrize("suffix", [".ckpt", ".onnx"])
def test_unsupported_formats(worker: WorkerProcess, tmp_path: Path, suffix: str) -> None:
    path = tmp_path / f"model{suffix}"
    path.write_bytes(b"PK\x03\x04")
    _expect(
        worker,
        CommandType.LOAD_UNET,
        {"name": "m", "path": str(path)},
        ErrorCode.UNSUPPORTED_FORMAT,
        str(path),
    )


def test_unload_and_info_of_unknown_names(worker: WorkerProcess) -> None:
    _expect(worker, CommandType.UNLOAD_MODEL, {"name": "ghost"}, ErrorCode.NOT_LOADED, "ghost")
    _expect(worker, CommandType.GET_MODEL_INFO, {"name": "ghost"}, ErrorCode.MODEL_NOT_FOUND, "ghost")


def test_unknown_and_unimplemented_commands(worker: WorkerProcess) -> None:
    _expect(worker, "model.fly", {}, ErrorCode.UNKNOWN_COMMAND, "model.fly")
    _expect(worker, CommandType.LOAD_LORA, {"name": "l"}, ErrorCode.INVALID_REQUEST, "data.path")


def test_malformed_lines_get_error_responses(worker: WorkerProcess) -> None:
    worker.send_line(b"this is not json\n")
    err = worker.unmatched.get(timeout=10)
    assert err.success is False
    assert err.error_code is ErrorCode.INVALID_REQUEST
    assert "not valid JSON" in err.error
    worker.send_line(
        json.dumps({"type": "model.load_unet", "request_id": "r-bad", "data": {"path": "/x"}}).encode()
        + b"\n"
    )
    worker.send_line(json.dumps({"type": 7, "request_id": "r-bad2"}).encode() + b"\n")
    got = {worker.unmatched.get(timeout=10).request_id for _ in range(2)}
    assert got == {"r-bad", "r-bad2"}
    assert worker.call(CommandType.GET_STATUS)["state"] == "idle"


def test_field_errors_name_the_field(worker: WorkerProcess) -> None:
    _expect(worker, CommandType.LOAD_UNET, {"path": "/x"}, ErrorCode.INVALID_REQUEST, "data.name")
    _expect(worker, CommandType.LOAD_UNET, {"name": "m", "path": "/x", "dtype": "int3"}, ErrorCode.INVALID_REQUEST,
            "data.dtype")  # fmt: skip
    _expect(worker, CommandType.CONTROL_CANCEL, {}, ErrorCode.INVALID_REQUEST, "data.target_request_id")


def test_bad_config_reference(worker: WorkerProcess, demo: DemoManifest) -> None:
    _expect(worker, CommandType.LOAD_UNET, {"name": "m", **src(demo, "sd15-unet"), "config": "nobase/unet"},
            ErrorCode.INVALID_REQUEST, "data.config", "nobase")  # fmt: skip


def test_shape_mismatch_with_config(worker: WorkerProcess, demo: DemoManifest) -> None:
    entry = demo["sd15-unet"]
    assert entry.config is not None
    config = {**entry.config, "cross_attention_dim": 1024}
    _expect(worker, CommandType.LOAD_UNET, {"name": "m", "path": str(demo.path(entry.name)), "config": config},
            ErrorCode.INVALID_MODEL_FILE, "shapes do not match")  # fmt: skip


def test_worker_refuses_an_old_torch() -> None:
    """torch < 2.10 has weaker weights_only loading: the worker does not start on it."""
    import subprocess
    import sys

    code = (
        "import sys, torch; torch.__version__ = '2.9.1+cu128'; "
        "from modelkeeper.worker.__main__ import main; sys.exit(main(['--device', 'cpu']))"
    )
    run = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, timeout=120, check=False
    )
    assert run.returncode == 2
    assert "torch 2.9.1+cu128 is too old" in run.stderr and "2.10" in run.stderr
