"""The GGUF decoders of :mod:`modelkeeper.worker.storage.dequant` against ``gguf``'s numpy
dequantisation (the format's reference) and diffusers' torch functions, on random blocks of every
type they handle; on CUDA (``--worker-device cuda:0``), that decoding never waits for the device."""

from __future__ import annotations

import gguf
import numpy as np
import pytest
import torch

from modelkeeper.worker.storage import dequant

TYPES = sorted(dequant.DECODERS)
#: Byte offsets of each type's float16 scale fields (everything else is random bytes).
F16_FIELDS = {"Q8_0": (0,), "Q4_0": (0,), "Q4_1": (0, 2), "Q5_0": (0,), "Q5_1": (0, 2), "Q4_K": (0, 2),
              "Q5_K": (0, 2), "Q6_K": (208,)}  # fmt: skip


def random_blocks(name: str, rows: int, cols: int, seed: int = 0) -> np.ndarray:
    """``rows`` x ``cols`` weights of type ``name`` as GGUF blocks: random quants, random finite
    float16 scales of either sign, as a real file holds them."""
    block, size, _fn = dequant.DECODERS[name]
    rng = np.random.default_rng(seed)
    out = rng.integers(0, 256, (rows, cols // block, size), dtype=np.uint8)
    for at in F16_FIELDS[name]:
        scale = (rng.standard_normal((rows, cols // block, 1)) * 1e-2).astype(np.float16)
        out[:, :, at : at + 2] = scale.view(np.uint8)
    return out.reshape(rows, cols // block * size)


@pytest.mark.parametrize("name", TYPES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_matches_the_gguf_reference(name: str, dtype: torch.dtype) -> None:
    blocks = random_blocks(name, 8, 512)
    quant = gguf.GGMLQuantizationType[name]
    expected = torch.from_numpy(gguf.quants.dequantize(blocks, quant).astype(np.float32))
    stored = torch.from_numpy(blocks.copy())
    got = dequant.fused(stored, quant, (8, 512), dtype)
    assert got.dtype == dtype and got.shape == (8, 512)
    assert torch.equal(stored, torch.from_numpy(blocks)), "the stored bytes were written"
    # float32: exact up to the order of one multiply-add; otherwise one rounding to ``dtype``
    rtol = 1e-5 if dtype == torch.float32 else torch.finfo(dtype).eps
    torch.testing.assert_close(got.float(), expected, rtol=rtol, atol=float(expected.abs().max()) * 1e-6)


@pytest.mark.parametrize("name", TYPES)
def test_agrees_with_diffusers(name: str) -> None:
    """The same values as diffusers' decoder, which rounds through float16 on the way."""
    quant = gguf.GGMLQuantizationType[name]
    stored = torch.from_numpy(random_blocks(name, 4, 1024, seed=1))
    ours = dequant.fused(stored, quant, (4, 1024), torch.float32)
    theirs = dequant.reference(stored, quant, (4, 1024)).float()
    torch.testing.assert_close(ours, theirs, rtol=2e-3, atol=float(ours.abs().max()) * 1e-3)


def test_the_cpu_decodes_by_the_reference() -> None:
    quant = gguf.GGMLQuantizationType.Q4_K
    stored = torch.from_numpy(random_blocks("Q4_K", 2, 256))
    got = dequant.decode(stored, quant, (2, 256), torch.bfloat16)
    assert torch.equal(got, dequant.reference(stored, quant, (2, 256)).to(torch.bfloat16))


def test_other_types_fall_back_to_diffusers() -> None:
    quant = gguf.GGMLQuantizationType.Q2_K
    block, size = gguf.GGML_QUANT_SIZES[quant]
    raw = np.random.default_rng(2).integers(0, 256, (2, size), dtype=np.uint8)
    raw[:, -4:] = np.full((2, 2), 1e-2, dtype=np.float16).view(np.uint8)  # d and dmin sit at the end
    got = dequant.decode(torch.from_numpy(raw), quant, (2, block), torch.bfloat16)
    expected = torch.from_numpy(gguf.quants.dequantize(raw, quant).astype(np.float32))
    assert got.dtype == torch.bfloat16
    torch.testing.assert_close(got.float(), expected, rtol=1e-2, atol=1e-3)


def test_decoding_on_cuda_never_waits_for_the_device(worker_device: str) -> None:
    if not worker_device.startswith("cuda"):
        pytest.skip("a CUDA test: run with --worker-device cuda:0")
    device = torch.device(worker_device)
    cases = [
        (gguf.GGMLQuantizationType[n], torch.from_numpy(random_blocks(n, 64, 1024)).to(device)) for n in TYPES
    ]
    for quant, stored in cases:  # the first call per device makes its constants
        got = dequant.decode(stored, quant, (64, 1024), torch.bfloat16)
        torch.testing.assert_close(got.cpu(), dequant.fused(stored.cpu(), quant, (64, 1024), torch.bfloat16))
    torch.cuda.synchronize(device)
    torch.cuda.set_sync_debug_mode("error")
    try:
        for quant, stored in cases:
            dequant.decode(stored, quant, (64, 1024), torch.bfloat16)
    finally:
        torch.cuda.set_sync_debug_mode("default")
