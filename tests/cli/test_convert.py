"""``modelkeeper convert FILE [-o OUT]``: a real tiny ``.ckpt`` (the demo SD1 checkpoint saved by
``torch.save`` under ``state_dict``, as A1111 checkpoints are) converted through the sandbox."""

from __future__ import annotations

import hashlib
import json
import pickle
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file
from typer.testing import CliRunner

from modelkeeper.cli.app import app
from modelkeeper.testing import write_demo_models


class Thing:
    """Not a tensor nor anything ``torch.save`` writes for a state dict: its global is off the allowlist."""


@pytest.fixture(scope="module")
def state(tmp_path_factory: pytest.TempPathFactory) -> dict[str, torch.Tensor]:
    demo = write_demo_models(tmp_path_factory.mktemp("ckpt-demo"), only=["sd15-checkpoint"])
    return load_file(demo.path("sd15-checkpoint"))


@pytest.fixture
def ckpt(tmp_path: Path, state: dict[str, torch.Tensor], monkeypatch: pytest.MonkeyPatch) -> Path:
    path = tmp_path / "checkpoints" / "tiny-sd15.ckpt"
    path.parent.mkdir()
    torch.save({"state_dict": state, "global_step": 7, "ema": {"step": torch.tensor(7)}}, path)

    def refuse(*args: object, **kwargs: object) -> None:
        raise AssertionError("the pickle was loaded in the calling process")

    monkeypatch.setattr(torch, "load", refuse)  # only the sandboxed child may unpickle it
    monkeypatch.setattr(pickle, "load", refuse)
    return path


def _convert(*args: str) -> tuple[int, str]:
    """Exit code and output, lines joined (the error console wraps long paths)."""
    result = CliRunner().invoke(app, ["convert", *args])
    return result.exit_code, result.output.replace("\n", "")


def test_converts_beside_the_file_with_its_metadata(ckpt: Path, state: dict[str, torch.Tensor]) -> None:
    code, output = _convert(str(ckpt), "--json")
    assert code == 0, output
    done = json.loads(output)
    dest = ckpt.with_suffix(".safetensors")
    assert done["dest"] == str(dest) and done["tensors"] == len(state) and done["dropped"] == 1
    converted = load_file(dest)
    assert converted.keys() == state.keys()  # the "state_dict." wrapper is gone; training state left out
    assert all(torch.equal(converted[k], v) for k, v in state.items())
    with safe_open(str(dest), framework="pt") as handle:
        metadata = handle.metadata()
    assert metadata == done["metadata"]
    assert metadata["modelkeeper.converted_from"] == "tiny-sd15.ckpt"
    assert metadata["modelkeeper.converted_from_sha256"] == hashlib.sha256(ckpt.read_bytes()).hexdigest()
    assert (metadata["modelkeeper.type"], metadata["modelkeeper.base"]) == ("main", "sd1")
    assert sorted(p.name for p in ckpt.parent.iterdir()) == ["tiny-sd15.ckpt", "tiny-sd15.safetensors"]


def test_never_overwrites(ckpt: Path) -> None:
    assert _convert(str(ckpt))[0] == 0
    dest = ckpt.with_suffix(".safetensors")
    before = dest.read_bytes()
    code, output = _convert(str(ckpt))
    assert code == 1 and str(dest) in output and "not overwritten" in output
    assert dest.read_bytes() == before
    other = ckpt.parent / "elsewhere"
    other.mkdir()
    code, output = _convert(str(ckpt), "-o", str(other))
    assert code == 0, output
    assert "wrote " + str(other / "tiny-sd15.safetensors") in output
    assert "main, sd1" in output


def test_errors_name_the_file(tmp_path: Path, ckpt: Path) -> None:
    missing = tmp_path / "nothing.ckpt"
    code, output = _convert(str(missing))
    assert code == 1 and "FILE_NOT_FOUND" in output and str(missing) in output
    already = tmp_path / "model.safetensors"
    already.write_bytes(b"x")
    code, output = _convert(str(already))
    assert code == 1 and "UNSUPPORTED_FORMAT" in output and "safetensors already" in output
    hostile = tmp_path / "hostile.pt"
    torch.save({"state_dict": {"w": torch.zeros(2)}, "thing": Thing()}, hostile)
    code, output = _convert(str(hostile))
    assert code == 1 and "UNSAFE_PICKLE" in output and "hostile.pt" in output
    assert not list(tmp_path.glob("hostile*.safetensors")) and not list(tmp_path.glob(".*"))


def test_a_folder_not_there_yet_is_made_and_a_bare_name_refused(ckpt: Path, tmp_path: Path) -> None:
    """``-o out/`` (no such folder) wrote an extension-less file named ``out``."""
    folder = tmp_path / "new" / "out"
    code, output = _convert(str(ckpt), "-o", f"{folder}/")
    assert code == 0, output
    assert (folder / "tiny-sd15.safetensors").is_file() and "wrote " + str(folder) in output
    bare = tmp_path / "bare"
    code, output = _convert(str(ckpt), "-o", str(bare))
    assert code == 1 and "end it with /" in output and not bare.exists(), output
