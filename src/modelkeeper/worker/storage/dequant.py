"""GGUF blocks decoded straight into the compute dtype, on the device that holds them, without
stopping the host.

diffusers' GGUF functions (city96's torch port; :func:`reference`) are the reference and still
decode the rarer types (Q2_K, Q3_K, the IQ types). For the types users download for diffusion
models (Q8_0, Q6_K, Q5_K, Q4_K, Q5_0, Q5_1, Q4_0, Q4_1) this module does the same arithmetic
with three differences. On an H100 (2026-12-06) one Flux-size weight decodes 1.24-1.77x faster
(``benchmarks/dequant.py``), and Flux-dev's step at Q4_K takes 315 ms against diffusers' 432 ms,
at Q8_0 235 ms against 251 ms (``benchmarks/formats.py``):

- **No host sync.** Those functions build their shift constants with ``torch.tensor([0, 4],
  device=...)`` on every call: a host-to-device copy that waits for the stream. Every packed layer
  of a running model then stops the host until the GPU has drained, and the GPU idles while the
  host launches the next layer. Here the constants are made once per device (:func:`_const`).
- **Fewer passes.** The last step writes the compute dtype directly (``addcmul``/``mul`` with
  ``out=``), where the reference produces float16 and casts it (two more passes over the weight),
  and the masks run in place.
- **One rounding.** Scales are float32 and the value is rounded once, to the compute dtype; the
  reference rounds to float16 on the way, so it is the less exact of the two (both are checked
  against ``gguf``'s numpy dequantisation in ``tests/worker/test_dequant.py``).

Each function takes the blocks as ``(n, type_size)`` uint8 (a view of the stored bytes; nothing is
written to it) and returns ``(n, block_size)`` in ``dtype``.
"""

from __future__ import annotations

import threading
from collections.abc import Callable
from typing import Any

import torch

QK_K = 256

_consts: dict[tuple[str, tuple[int, ...], tuple[int, ...]], torch.Tensor] = {}
_consts_lock = threading.Lock()


def _const(device: torch.device, values: tuple[int, ...], shape: tuple[int, ...]) -> torch.Tensor:
    """A uint8 constant on ``device``, made once (its first use copies it there and waits)."""
    key = (str(device), values, shape)
    found = _consts.get(key)
    if found is None:
        with _consts_lock:
            found = _consts.get(key)
            if found is None:
                found = torch.tensor(values, dtype=torch.uint8).reshape(shape).to(device)
                _consts[key] = found
    return found


def _f16(blocks: torch.Tensor, at: int) -> torch.Tensor:
    """The float16 stored at byte ``at`` of each block, as float32 ``(n, 1)``."""
    return blocks[:, at : at + 2].view(torch.float16).float()


def _nibbles(qs: torch.Tensor, groups: int, width: int) -> torch.Tensor:
    """``(n, groups * width)`` bytes as ``(n, groups * 2 * width)`` 4-bit values: per group, the
    low nibbles of its ``width`` bytes, then their high nibbles."""
    n = qs.shape[0]
    shifts = _const(qs.device, (0, 4), (1, 1, 2, 1))
    q = (qs.reshape(n, groups, 1, width) >> shifts).reshape(n, groups * 2 * width)
    return q.bitwise_and_(0x0F)


def _bits(qh: torch.Tensor, count: int) -> torch.Tensor:
    """Bit ``k`` (little-endian over the bytes) of each row of ``qh``, moved to bit 4: ``(n, count)``."""
    n = qh.shape[0]
    shifts = _const(qh.device, tuple(range(8)), (1, 1, 8))
    bits = (qh.reshape(n, -1, 1) >> shifts).reshape(n, count)
    return bits.bitwise_and_(1).bitwise_left_shift_(4)


def _scale_min(scales: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The eight 6-bit scales and mins of a K-quant block's 12 scale bytes, as float32 ``(n, 8)``."""
    n = scales.shape[0]
    s = scales.reshape(n, 3, 4)
    d, m, md = s[:, 0], s[:, 1], s[:, 2]
    sc = torch.cat([d & 0x3F, (md & 0x0F) | ((d >> 2) & 0x30)], dim=-1)
    mn = torch.cat([m & 0x3F, (md >> 4) | ((m >> 2) & 0x30)], dim=-1)
    return sc.float(), mn.float()


def _affine(q: torch.Tensor, scale: torch.Tensor, offset: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """``scale * q + offset`` written once, in ``dtype`` (broadcast over ``q``'s last dimension)."""
    out = torch.empty(q.shape, dtype=dtype, device=q.device)
    return torch.addcmul(offset, scale, q, out=out)


def q8_0(blocks: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    out = torch.empty((blocks.shape[0], 32), dtype=dtype, device=blocks.device)
    return torch.mul(_f16(blocks, 0), blocks[:, 2:].view(torch.int8), out=out)


def q4_0(blocks: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    d = _f16(blocks, 0)
    return _affine(_nibbles(blocks[:, 2:], 1, 16), d, d * -8, dtype)


def q4_1(blocks: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    return _affine(_nibbles(blocks[:, 4:], 1, 16), _f16(blocks, 0), _f16(blocks, 2), dtype)


def q5_0(blocks: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    d = _f16(blocks, 0)
    q = _nibbles(blocks[:, 6:], 1, 16).bitwise_or_(_bits(blocks[:, 2:6], 32))
    return _affine(q, d, d * -16, dtype)


def q5_1(blocks: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    q = _nibbles(blocks[:, 8:], 1, 16).bitwise_or_(_bits(blocks[:, 4:8], 32))
    return _affine(q, _f16(blocks, 0), _f16(blocks, 2), dtype)


def _k_scales(blocks: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Q4_K's and Q5_K's per-sub-block scale and offset, float32 ``(n, 8, 1)``: ``d * sc`` and
    ``-dmin * m`` (the block's float16 ``d`` and ``dmin``, then its 12 bytes of 6-bit scales)."""
    sc, mn = _scale_min(blocks[:, 4:16])
    scale = (_f16(blocks, 0) * sc).unsqueeze(-1)
    return scale, (_f16(blocks, 2) * mn).neg_().unsqueeze(-1)


def q4_k(blocks: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    n = blocks.shape[0]
    q = _nibbles(blocks[:, 16:], 4, 32).reshape(n, 8, 32)
    return _affine(q, *_k_scales(blocks), dtype).reshape(n, QK_K)


def q5_k(blocks: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    n = blocks.shape[0]
    q = _nibbles(blocks[:, 48:], 4, 32).reshape(n, 8, 32)
    high = blocks[:, 16:48].reshape(n, 1, 1, 32) >> _const(blocks.device, tuple(range(8)), (1, 1, 8, 1))
    high = high.reshape(n, 8, 32).bitwise_and_(1).bitwise_left_shift_(4)
    return _affine(q.bitwise_or_(high), *_k_scales(blocks), dtype).reshape(n, QK_K)


def q6_k(blocks: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    n = blocks.shape[0]
    scale = (_f16(blocks, 208) * blocks[:, 192:208].view(torch.int8).float()).unsqueeze(-1)
    q = _nibbles(blocks[:, :128], 2, 64).reshape(n, 8, 32)
    high = blocks[:, 128:192].reshape(n, 2, 1, 32) >> _const(blocks.device, (0, 2, 4, 6), (1, 1, 4, 1))
    high = high.reshape(n, 8, 32).bitwise_and_(3).bitwise_left_shift_(4)
    q = q.bitwise_or_(high).reshape(n, 16, 16)
    return _affine(q, scale, scale * -32, dtype).reshape(n, QK_K)


#: GGUF type name -> (block size, bytes per block, decoder).
DECODERS: dict[str, tuple[int, int, Callable[[torch.Tensor, torch.dtype], torch.Tensor]]] = {
    "Q8_0": (32, 34, q8_0),
    "Q4_0": (32, 18, q4_0),
    "Q4_1": (32, 20, q4_1),
    "Q5_0": (32, 22, q5_0),
    "Q5_1": (32, 24, q5_1),
    "Q4_K": (QK_K, 144, q4_k),
    "Q5_K": (QK_K, 176, q5_k),
    "Q6_K": (QK_K, 210, q6_k),
}


def decode(stored: torch.Tensor, quant: Any, shape: tuple[int, ...], dtype: torch.dtype) -> torch.Tensor:
    """The GGUF blocks of ``stored`` (uint8) as a ``dtype`` tensor of ``shape``; ``quant`` is a
    ``gguf.GGMLQuantizationType``. On an accelerator by :func:`fused` where it has a decoder; on the
    CPU, and for the other types, by :func:`reference`: the CPU's mixed-dtype kernels are not
    vectorised, and the reference was faster there for five of six types (``benchmarks/dequant.py``)."""
    if stored.device.type == "cpu" or quant.name not in DECODERS:
        return reference(stored, quant, shape).to(dtype)
    return fused(stored, quant, shape, dtype)


def fused(stored: torch.Tensor, quant: Any, shape: tuple[int, ...], dtype: torch.dtype) -> torch.Tensor:
    """:func:`decode` by this module's decoders (``quant`` must be one of :data:`DECODERS`)."""
    _block, type_size, fn = DECODERS[quant.name]
    return fn(stored.reshape(-1, type_size), dtype).reshape(shape)


def reference(stored: torch.Tensor, quant: Any, shape: tuple[int, ...]) -> torch.Tensor:
    """The GGUF blocks of ``stored`` as a float tensor of ``shape``, by diffusers' functions."""
    from diffusers.quantizers.gguf.utils import GGML_QUANT_SIZES, dequantize_functions

    _block, type_size = GGML_QUANT_SIZES[quant]
    fn: Callable[..., torch.Tensor] = dequantize_functions[quant]
    return fn(stored.reshape(-1, type_size), _block, type_size).reshape(shape)
