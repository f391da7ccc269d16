"""Formats other than safetensors: GGUF (identified with its quant, loadable), pickles (through the sandbox),
and files whose suffix lies about their format."""

from __future__ import annotations

import shutil
import struct
from pathlib import Path

import pytest
import torch
from stripped import flux_bfl, write_stripped

from conftest import scan
from modelkeeper.discovery.records import ModelFormat
from modelkeeper.formats.errors import InvalidModelFile
from modelkeeper.formats.gguf_header import read_gguf_header
from modelkeeper.registry.store import Registry
from modelkeeper.testing.manifest import DemoManifest

_GGML = {"F32": (0, 1, 4), "F16": (1, 1, 2), "Q8_0": (8, 32, 34), "Q4_K": (12, 256, 144)}


def _gguf_string(s: str) -> bytes:
    b = s.encode()
    return struct.pack("<Q", len(b)) + b


def write_gguf(path: Path, tensors: dict[str, tuple[str, tuple[int, ...]]], metadata: dict[str, str]) -> Path:
    """A GGUF v3 file with these tensor infos (torch-order shapes) and a sparse data section."""
    out = bytearray(b"GGUF" + struct.pack("<IQQ", 3, len(tensors), len(metadata)))
    for key, value in metadata.items():
        out += _gguf_string(key) + struct.pack("<I", 8) + _gguf_string(value)
    offset = 0
    for name, (dtype, shape) in tensors.items():
        type_id, block, block_bytes = _GGML[dtype]
        n = 1
        for d in shape:
            n *= d
        out += _gguf_string(name) + struct.pack("<I", len(shape))
        out += b"".join(struct.pack("<Q", d) for d in reversed(shape))
        out += struct.pack("<IQ", type_id, offset)
        offset += (n // block * block_bytes + 31) // 32 * 32
    out += b"\0" * (-len(out) % 32)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(bytes(out))
    with open(path, "r+b") as f:
        f.truncate(len(out) + offset)
    return path


def _quantized_flux(guidance: bool) -> dict[str, tuple[str, tuple[int, ...]]]:
    return {
        n: ("Q4_K" if len(s) == 2 and s[1] % 256 == 0 else "F32", s)
        for n, (_, s) in flux_bfl(guidance=guidance).items()
    }


def test_gguf_flux_is_identified_with_its_quant_and_loadable(tmp_path: Path, registry: Registry) -> None:
    write_gguf(
        tmp_path / "unet" / "flux1-dev-Q4_K_S.gguf", _quantized_flux(True), {"general.architecture": "flux"}
    )
    write_gguf(
        tmp_path / "unet" / "flux1-schnell-Q4_K_S.gguf",
        _quantized_flux(False),
        {"general.architecture": "flux"},
    )
    by_path = {e.path: e for e in scan(registry, tmp_path).entries}
    dev = by_path["unet/flux1-dev-Q4_K_S.gguf"]
    assert (dev.status, dev.format, dev.type, dev.base, dev.variant) == (
        "ok",
        "gguf",
        "transformer",
        "flux",
        "dev",
    )
    assert by_path["unet/flux1-schnell-Q4_K_S.gguf"].variant == "schnell"
    assert dev.quant == "Q4_K" and dev.to_json()["quant"] == "Q4_K"
    again = {e.path: e for e in scan(registry, tmp_path).entries}["unet/flux1-dev-Q4_K_S.gguf"]
    assert (again.change, again.quant) == ("unchanged", "Q4_K")  # from the registry, not the file
    record = registry.get(dev.model_id or "")
    assert record.identification.loadable is True
    assert record.identification.dtypes.keys() == {"Q4_K", "F32"}
    assert record.identification.quant == "Q4_K"
    assert registry.worker_spec(record.id)["loadable"] is True


def test_gguf_header_shapes_in_torch_order(tmp_path: Path) -> None:
    path = write_gguf(tmp_path / "t.gguf", {"img_in.weight": ("F16", (3072, 64))}, {"general.name": "x"})
    header = read_gguf_header(path)
    assert header.tensors["img_in.weight"].shape == (3072, 64)
    assert header.tensors["img_in.weight"].nbytes == 3072 * 64 * 2
    assert header.metadata["general.name"] == "x"
    path.write_bytes(path.read_bytes()[:40])
    with pytest.raises(InvalidModelFile):
        read_gguf_header(path)


def test_pickled_checkpoint_and_embedding_through_the_sandbox(
    demo: DemoManifest, tmp_path: Path, registry: Registry
) -> None:
    """An A1111-style .ckpt (weights under "state_dict") and a .pt embedding, read only in the sandbox."""
    from safetensors.torch import load_file

    state = load_file(str(demo.path("sd15-checkpoint")))
    torch.save({"state_dict": state, "global_step": 840000}, tmp_path / "model.ckpt")
    embedding = {
        "string_to_token": {"*": torch.tensor(265)},
        "string_to_param": {"*": torch.zeros(3, 768)},
        "name": "bad-hands",
        "step": 1000,
    }
    torch.save(embedding, tmp_path / "bad-hands.pt")
    # The suffix does not decide the format: the first bytes do.
    torch.save({"emb_params": torch.zeros(2, 1024)}, tmp_path / "really_a_pickle.safetensors")
    write_stripped(tmp_path / "really_safetensors.ckpt", {"emb_params": ("F32", (2, 768))})
    by_path = {e.path: e for e in scan(registry, tmp_path).entries}
    assert (by_path["really_a_pickle.safetensors"].format, by_path["really_a_pickle.safetensors"].base) == (
        "pickle",
        "sd2",
    )
    assert by_path["really_safetensors.ckpt"].format == ModelFormat.SAFETENSORS.value
    ckpt = by_path["model.ckpt"]
    assert (ckpt.status, ckpt.format, ckpt.type, ckpt.base) == ("ok", "pickle", "main", "sd1"), ckpt
    assert sorted(ckpt.components) == ["text_encoder", "unet", "vae"]
    emb = by_path["bad-hands.pt"]
    assert (emb.status, emb.type, emb.base, emb.rule) == (
        "ok",
        "textual_inversion",
        "sd1",
        "embedding.a1111",
    ), emb


def test_pipeline_with_only_bin_weights(demo: DemoManifest, tmp_path: Path, registry: Registry) -> None:
    """A diffusers folder whose weights are pytorch .bin files: statistics come from the sandbox."""
    from safetensors.torch import load_file

    src = demo.path("sd15-unet-folder")
    dst = tmp_path / "unet-bin"
    dst.mkdir()
    shutil.copy(src / "config.json", dst / "config.json")
    torch.save(
        load_file(str(src / "diffusion_pytorch_model.safetensors")), dst / "diffusion_pytorch_model.bin"
    )
    (entry,) = scan(registry, tmp_path).entries
    assert (entry.status, entry.format, entry.type, entry.base) == ("ok", "diffusers", "unet", "sd1")
    record = registry.get(entry.model_id or "")
    assert (
        record.components[0].tensor_count == demo["sd15-unet-folder"].tensor_count
        or record.components[0].tensor_count > 50
    )
