"""Content fingerprints of live modules: a blake3 hash of every tensor's name, dtype, shape and bytes.

Why: anyone (a test, the orchestrator, a user) can check that a module holds exactly the weights
it should, e.g. that removing a LoRA restored the model bitwise, or that two workers hold the same
component, without moving the weights anywhere. The hash covers the module's ``state_dict`` (the
parameters and persistent buffers, each under every name it has) in sorted name order, so it does
not depend on construction order, and any change to a value, dtype, shape or name changes it.

Proposed protocol: ``model.get_model_info`` with ``fingerprint: true`` adds
``fingerprint: "blake3:<64 hex>"`` and ``fingerprint_seconds`` to each model it lists.
"""

from __future__ import annotations

import time
from collections.abc import Iterator

import blake3
import torch

PREFIX = "blake3:"
#: Tensors are moved to the host in pieces of at most this many bytes (bounded host memory).
CHUNK_BYTES = 64 * 1024 * 1024


def _tensor_bytes(tensor: torch.Tensor) -> Iterator[memoryview]:
    """The tensor's bytes in C order, as host memory views, in chunks of at most CHUNK_BYTES."""
    if tensor.is_meta:  # never loaded: only its header counts (and says so)
        yield memoryview(b"meta")
        return
    flat = tensor.detach().reshape(-1)
    if flat.numel() == 0:
        return
    per_chunk = max(1, CHUNK_BYTES // flat.element_size())
    for start in range(0, flat.numel(), per_chunk):
        piece = flat[start : start + per_chunk].contiguous().cpu()
        yield piece.view(torch.uint8).numpy().data


def _update(hasher: blake3.blake3, name: str, tensor: torch.Tensor) -> None:
    header = f"{name}\0{str(tensor.dtype).removeprefix('torch.')}\0{tuple(tensor.shape)}\0"
    hasher.update(header.encode())
    for chunk in _tensor_bytes(tensor):
        hasher.update(chunk)


def fingerprint(module: torch.nn.Module) -> str:
    """``blake3:<hex>`` of the module's state dict (name, dtype, shape and bytes of each tensor, in
    sorted name order). Equal fingerprints mean bitwise-equal weights under the same names."""
    hasher = blake3.blake3(max_threads=blake3.blake3.AUTO)
    state = module.state_dict(keep_vars=True)
    for name in sorted(state):
        _update(hasher, name, state[name])
    return PREFIX + hasher.hexdigest()


def tensor_fingerprints(module: torch.nn.Module) -> dict[str, str]:
    """One fingerprint per tensor name, to find *which* tensors differ between two modules."""
    out: dict[str, str] = {}
    for name, tensor in sorted(module.state_dict(keep_vars=True).items()):
        hasher = blake3.blake3()
        _update(hasher, name, tensor)
        out[name] = PREFIX + hasher.hexdigest()
    return out


def timed_fingerprint(module: torch.nn.Module) -> tuple[str, float]:
    """``(fingerprint, seconds)``, for the info result."""
    started = time.perf_counter()
    value = fingerprint(module)
    return value, time.perf_counter() - started


def differing(before: dict[str, str], after: dict[str, str]) -> list[str]:
    """Names whose per-tensor fingerprints differ, or that exist on one side only."""
    return sorted(name for name in before.keys() | after.keys() if before.get(name) != after.get(name))


__all__ = ["PREFIX", "differing", "fingerprint", "tensor_fingerprints", "timed_fingerprint"]
