"""Casting while reading: a storage cast decided before the file is read, so each tensor is cast
as soon as it is read (its group's buffer freed before the next group), not after the whole file.
Which file keys a cast packs is found by converting meta tensors tagged with their keys.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping
from typing import Any

import torch

from modelkeeper.worker.storage.plan import SKIP_PATTERNS, packable_owners, skipped


class _Origin(torch.Tensor):
    """A meta tensor tagged with the file key it comes from; the tag follows it through a key
    conversion (renames, chunks, concatenations), so each converted key knows its source."""

    origin: str

    @staticmethod
    def tag(tensor: torch.Tensor, origin: str) -> _Origin:
        out = tensor.as_subclass(_Origin)
        out.origin = origin
        return out

    @classmethod
    def __torch_function__(
        cls, func: Callable[..., Any], types: Iterable[type], args: tuple[Any, ...] = (), kwargs: Any = None
    ) -> Any:
        origin = _origin_in(args)
        with torch._C.DisableTorchFunctionSubclass():
            result = func(*args, **(kwargs or {}))
        return _retag(result, origin)


def _origin_in(args: Iterable[Any]) -> str | None:
    for arg in args:
        if isinstance(arg, _Origin):
            return arg.origin
        if isinstance(arg, list | tuple):
            found = _origin_in(arg)
            if found is not None:
                return found
    return None


def _retag(result: Any, origin: str | None) -> Any:
    if origin is None:
        return result
    if isinstance(result, torch.Tensor):
        return _Origin.tag(result, origin)
    if type(result) in (list, tuple):
        return type(result)(_retag(r, origin) for r in result)
    return result


def cast_sources(
    module: torch.nn.Module,
    tensors: Mapping[str, tuple[tuple[int, ...], torch.dtype]],
    convert: Callable[[dict[str, torch.Tensor]], dict[str, torch.Tensor]],
    *,
    skip: Iterable[str] = SKIP_PATTERNS,
) -> set[str]:
    """The file keys a storage cast packs: those whose tensors all become weights of layers that keep
    a packed form (see :func:`plan_storage`). Found by converting meta tensors tagged with their
    keys, so a load can cast each tensor as soon as it is read, before the key conversion."""
    meta = {
        k: _Origin.tag(torch.empty(shape, dtype=dtype, device="meta"), k)
        for k, (shape, dtype) in tensors.items()
    }
    converted = convert(dict(meta))
    owners = packable_owners(module)
    skip = tuple(skip)
    castable: set[str] = set()
    kept: set[str] = set()
    for key, tensor in converted.items():
        origin = getattr(tensor, "origin", None)
        if origin is None:
            continue
        owner, _, attr = key.rpartition(".")
        packs = owner in owners and attr in owners[owner]._parameters and not skipped(owner, skip)
        (castable if packs and tensor.is_floating_point() else kept).add(origin)
    return castable - kept


def cast_while_reading(
    keys: set[str], storage: torch.dtype
) -> Callable[[dict[str, torch.Tensor]], dict[str, torch.Tensor]]:
    """A read transform: the tensors of ``keys`` cast to ``storage``, every other one copied out of
    the group's buffer, so each group's buffer is freed before the next group is read."""

    def transform(tensors: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        return {
            k: t.to(storage) if k in keys and t.is_floating_point() else t.clone() for k, t in tensors.items()
        }

    return transform
