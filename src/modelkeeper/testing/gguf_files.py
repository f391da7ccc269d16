"""Real GGUF files of tiny models, written with the ``gguf`` package, in the quant types users download.

``gguf.quants.quantize`` covers BF16, Q8_0, Q4_0 and the other legacy types; the K types (Q6_K,
Q5_K, Q4_K) have only decoders there, so their encoders are here: the simple per-block min/max
scaling of ggml's reference quantizer, in the block layouts ggml reads (checked against
``gguf.quants.dequantize``). Tensors that cannot hold the type keep a plain one, as city96's
converter does: 1-D tensors (biases, norms) F32, rows that are not whole blocks F16.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np
import torch

from modelkeeper.formats.conventions import CONFIG_METADATA_KEY

#: The quant types of the demo set and the tests (user-facing names: Q5_K_S is mostly Q5_K).
GGUF_TYPES = ("F16", "BF16", "Q8_0", "Q6_K", "Q5_K", "Q4_K", "Q4_0")
QK_K = 256


def _f16(values: np.ndarray) -> np.ndarray:
    return values.astype(np.float16).view(np.uint8).reshape(*values.shape, 2)


def _min_max_scales(x: np.ndarray, nmax: int) -> tuple[np.ndarray, ...]:
    """Per 32-element sub-block: 6-bit scales and mins against two fp16 super-scales (Q4_K, Q5_K)."""
    sub = x.reshape(-1, 8, 32)
    low = np.minimum(sub.min(axis=-1), 0.0)
    scale = (sub.max(axis=-1) - low) / nmax
    mins = -low
    d = scale.max(axis=-1, keepdims=True) / 63
    dmin = mins.max(axis=-1, keepdims=True) / 63
    d16, dmin16 = d.astype(np.float16).astype(np.float32), dmin.astype(np.float16).astype(np.float32)
    sc = np.clip(np.round(np.divide(scale, d16, out=np.zeros_like(scale), where=d16 > 0)), 0, 63)
    mn = np.clip(np.round(np.divide(mins, dmin16, out=np.zeros_like(mins), where=dmin16 > 0)), 0, 63)
    step = (d16 * sc)[..., None]
    q = np.divide(sub + (dmin16 * mn)[..., None], step, out=np.zeros_like(sub), where=step > 0)
    q = np.clip(np.round(q), 0, nmax).astype(np.uint8)
    return d16, dmin16, sc.astype(np.uint8), mn.astype(np.uint8), q


def _pack_scales(sc: np.ndarray, mn: np.ndarray) -> np.ndarray:
    """The 12 bytes of eight 6-bit scales and mins, in ggml's order (see gguf's ``get_scale_min``)."""
    low = sc[:, :4] | ((sc[:, 4:] >> 4) << 6)
    mid = mn[:, :4] | ((mn[:, 4:] >> 4) << 6)
    high = (sc[:, 4:] & 0x0F) | ((mn[:, 4:] & 0x0F) << 4)
    return np.concatenate([low, mid, high], axis=-1).astype(np.uint8)


def _q4_k(x: np.ndarray) -> np.ndarray:
    d, dmin, sc, mn, q = _min_max_scales(x, 15)
    pairs = q.reshape(-1, 4, 2, 32)
    qs = (pairs[:, :, 0] | (pairs[:, :, 1] << 4)).reshape(-1, 128)
    return np.concatenate([_f16(d).reshape(-1, 2), _f16(dmin).reshape(-1, 2), _pack_scales(sc, mn), qs], -1)


def _q5_k(x: np.ndarray) -> np.ndarray:
    d, dmin, sc, mn, q = _min_max_scales(x, 31)
    low, high = q & 0x0F, q >> 4
    pairs = low.reshape(-1, 4, 2, 32)
    qs = (pairs[:, :, 0] | (pairs[:, :, 1] << 4)).reshape(-1, 128)
    qh = np.zeros((q.shape[0], 32), dtype=np.uint8)
    for j in range(8):
        qh |= (high[:, j] << j).astype(np.uint8)
    return np.concatenate(
        [_f16(d).reshape(-1, 2), _f16(dmin).reshape(-1, 2), _pack_scales(sc, mn), qh, qs], -1
    )


def _q6_k(x: np.ndarray) -> np.ndarray:
    sub = x.reshape(-1, 16, 16)
    scale = np.abs(sub).max(axis=-1) / 31
    d = (scale.max(axis=-1, keepdims=True) / 127).astype(np.float16).astype(np.float32)
    sc = np.clip(np.round(np.divide(scale, d, out=np.zeros_like(scale), where=d > 0)), -128, 127)
    step = (d * sc)[..., None]
    q = np.divide(sub, step, out=np.zeros_like(sub), where=step > 0)
    q = (np.clip(np.round(q), -32, 31) + 32).astype(np.uint8).reshape(-1, QK_K)
    low, high = q & 0x0F, q >> 4
    halves = low.reshape(-1, 2, 2, 64)
    ql = (halves[:, :, 0] | (halves[:, :, 1] << 4)).reshape(-1, 128)
    hi = high.reshape(-1, 2, 4, 32)
    qh = (hi[:, :, 0] | (hi[:, :, 1] << 2) | (hi[:, :, 2] << 4) | (hi[:, :, 3] << 6)).reshape(-1, 64)
    return np.concatenate([ql, qh, sc.astype(np.int8).view(np.uint8), _f16(d).reshape(-1, 2)], -1)


_K_ENCODERS = {"Q4_K": _q4_k, "Q5_K": _q5_k, "Q6_K": _q6_k}


def quantize(values: np.ndarray, qtype: str) -> np.ndarray:
    """``values`` (float32, rows of whole blocks) as the bytes of ``qtype``, rows kept: shape
    ``(*values.shape[:-1], bytes per row)``."""
    import gguf

    kind = gguf.GGMLQuantizationType[qtype]
    if qtype not in _K_ENCODERS:
        return np.asarray(gguf.quants.quantize(values.astype(np.float32), kind))
    rows = values.reshape(-1, values.shape[-1]).astype(np.float32)
    blocks = _K_ENCODERS[qtype](rows.reshape(-1, QK_K))
    return blocks.reshape(*values.shape[:-1], -1)


def stored_type(qtype: str, name: str, shape: tuple[int, ...]) -> str:
    """The type a tensor is written in for a file of ``qtype`` (city96's fallbacks): 1-D tensors F32,
    tables that are not layer weights (SD3's ``pos_embed``) and rows of partial blocks F16."""
    from modelkeeper.formats.gguf_header import BLOCK_SIZES

    if len(shape) < 2:
        return "F32"
    if qtype in ("F16", "BF16"):
        return qtype
    if name.endswith((".weight", ".bias")) and shape[-1] % BLOCK_SIZES[qtype][0] == 0:
        return qtype
    return "F16"


def write_gguf(
    path: Path,
    state: dict[str, torch.Tensor],
    qtype: str,
    *,
    arch: str,
    config: dict[str, Any] | None = None,
    metadata: dict[str, int | float] | None = None,
) -> dict[str, str]:
    """Write ``state`` as a GGUF file of ``qtype``; returns the type each tensor was stored in.
    ``config`` goes into the ``modelkeeper.config`` string, as in the demo safetensors files;
    ``metadata`` are numbers (ints as uint32, floats as float32), as llama.cpp's converter writes them."""
    import gguf

    writer = gguf.GGUFWriter(str(path), arch)
    writer.add_string("general.quantization_type", qtype)
    if config is not None:
        writer.add_string(CONFIG_METADATA_KEY, json.dumps(config))
    for key, value in (metadata or {}).items():
        if isinstance(value, float):
            writer.add_float32(key, value)
        else:
            writer.add_uint32(key, value)
    types: dict[str, str] = {}
    for name, tensor in state.items():
        values = tensor.detach().float().numpy()
        kind = stored_type(qtype, name, tuple(values.shape))
        types[name] = kind
        if kind == "F32":
            writer.add_tensor(name, values.astype(np.float32))
        elif kind == "F16":
            writer.add_tensor(name, values.astype(np.float16))
        else:
            writer.add_tensor(name, quantize(values, kind), raw_dtype=gguf.GGMLQuantizationType[kind])
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return types


def write_llama_t5_gguf(path: Path, module: torch.nn.Module, qtype: str) -> dict[str, str]:
    """A ``T5EncoderModel`` as city96's T5 GGUFs hold one: llama.cpp's tensor names (``token_embd``,
    ``enc.blk.N.attn_q``...), architecture ``t5encoder`` with its ``t5encoder.*`` numbers, and no
    ``modelkeeper.config``. Returns the type each tensor (by its llama.cpp name) was stored in."""
    from transformers import T5Config

    from modelkeeper.formats.llama_t5 import ARCH, llama_names

    config = module.config
    if not isinstance(config, T5Config):
        raise TypeError(f"{path}: {type(module).__name__} is no T5 encoder")
    state = {k: v for k, v in module.state_dict().items() if k != "encoder.embed_tokens.weight"}
    names = llama_names(state)
    unknown = sorted(set(state) - set(names))
    if unknown:
        raise ValueError(f"{path}: no llama.cpp name for {', '.join(unknown[:5])}")
    numbers: dict[str, int | float] = {
        f"{ARCH}.context_length": 512,
        f"{ARCH}.embedding_length": config.d_model,
        f"{ARCH}.feed_forward_length": config.d_ff,
        f"{ARCH}.block_count": config.num_layers,
        f"{ARCH}.attention.head_count": config.num_heads,
        f"{ARCH}.attention.key_length": config.d_kv,
        f"{ARCH}.attention.value_length": config.d_kv,
        f"{ARCH}.attention.relative_buckets_count": config.relative_attention_num_buckets,
        f"{ARCH}.attention.layer_norm_epsilon": float(config.layer_norm_epsilon),
    }
    renamed = {names[k]: v for k, v in state.items()}
    return write_gguf(path, renamed, qtype, arch=ARCH, metadata=numbers)


__all__ = ["GGUF_TYPES", "quantize", "stored_type", "write_gguf", "write_llama_t5_gguf"]
