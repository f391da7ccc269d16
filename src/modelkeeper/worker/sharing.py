"""Modules shared by several names on one device: a part (text encoder, VAE) that two placements use.

A load whose request has a share key (:meth:`LoadRequest.share_key`: the orchestrator's token for
the part's weights and config, its type, dtype and storage dtype, ``offload: none``) takes the
module already held under that key, if any, under its own name: one module, several names. It is
counted once in the device's bytes and freed with its last name (:func:`freed_by`). A module
shared is always fully resident and unpatched: a LoRA or an optimisation of one name first gives it
its own copy (``ModelService.own_copy``), so the change never reaches the other names.

The functions here read the service's name -> model table; they hold no state of their own.
"""

from __future__ import annotations

from collections.abc import Collection, Iterable, Mapping
from typing import Any, Protocol, TypeVar

import torch


class Held(Protocol):
    """What these functions read of a loaded model (``records.LoadedModel``)."""

    name: str
    module: Any
    share: str | None

    @property
    def device_bytes(self) -> int: ...


def unique_bytes(models: Iterable[Held]) -> int:
    """The device bytes of ``models``, each module counted once however many names it has."""
    return sum({id(m.module): m.device_bytes for m in models}.values())


def freed_by(models: Mapping[str, Held], names: Collection[str]) -> int:
    """Bytes that unloading ``names`` frees: the modules none of whose other names stays loaded."""
    staying = {id(m.module) for n, m in models.items() if n not in names}
    return unique_bytes(m for n, m in models.items() if n in names and id(m.module) not in staying)


def others(models: Mapping[str, Held], name: str) -> list[str]:
    """The other names of the module loaded as ``name`` (empty: it is not shared)."""
    model = models[name]
    return sorted(n for n, m in models.items() if n != name and m.module is model.module)


M = TypeVar("M", bound=Held)


def holder(models: Mapping[str, M], key: str, *, besides: str) -> M | None:
    """A model loaded under share ``key`` other than ``besides``: the module a new load joins."""
    return next((m for n, m in models.items() if n != besides and m.share == key), None)


def own_storage(module: torch.nn.Module, other: torch.nn.Module) -> int:
    """Give ``module`` its own memory wherever a tensor of it is one of ``other``'s: two loads of
    one RAM-cache segment on the CPU are views of the same mapped pages, so a copy loaded again
    from it would still see a change made to the other. The tensors cloned."""
    theirs = {t.data_ptr() for t in (*other.parameters(), *other.buffers()) if t.numel()}
    cloned = 0
    for tensor in (*module.parameters(), *module.buffers()):
        if tensor.numel() and tensor.data_ptr() in theirs:
            tensor.data = tensor.data.clone()
            cloned += 1
    return cloned
