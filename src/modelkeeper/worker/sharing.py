"""Modules shared by several names on one device: a part (text encoder, VAE) that two placements use.

A load whose request has a share key (:meth:`LoadRequest.share_key`: the orchestrator's token for
the part's weights and config, its type, dtype and storage dtype, ``offload: none``) takes the
module already held under that key, if any, under its own name: one module, several names. It is
counted once in the device's bytes and freed with its last name (:func:`freed_by`). A module
shared is always fully resident and unpatched: a LoRA or an optimisation of one name first gives it
its own copy (:func:`own_copy`), so the change never reaches the other names.

The functions here read the service's name -> model table (pure: :func:`holder`, :func:`others`,
:func:`freed_by`...) or act on it through the service (:func:`join`, :func:`own_copy`, given the
service as :class:`Service`); they hold no state of their own.
"""

from __future__ import annotations

import dataclasses
import threading
import time
from collections.abc import Collection, Iterable, Mapping
from typing import Any, Protocol, TypeVar

import torch

from modelkeeper.protocol.errors import ProtocolError
from modelkeeper.protocol.messages import EventType, LoadRequest, LoadResult, MemoryInfo, ModelKind
from modelkeeper.worker.records import EventSink, LoadedModel, Operation


class Held(Protocol):
    """What these functions read of a loaded model (``records.LoadedModel``)."""

    name: str
    module: Any
    share: str | None

    @property
    def device_bytes(self) -> int: ...


class Service(Protocol):
    """What joining and copying use of the service that holds the device's models
    (``service.ModelService``)."""

    #: name -> loaded model, read and changed under ``lock``
    models: dict[str, LoadedModel]
    lock: threading.Lock
    emit: EventSink

    def drop(self, name: str) -> int: ...

    def get(self, name: str) -> LoadedModel: ...

    def load(self, request: LoadRequest, kind: ModelKind, op: Operation) -> LoadResult: ...

    def memory_info(self) -> MemoryInfo: ...


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


def join(
    service: Service, request: LoadRequest, kind: ModelKind, op: Operation, started: float
) -> LoadResult | None:
    """``request`` loaded as one more name of the module held under its share key, if one is:
    nothing is read or allocated. None when it must be loaded."""
    key = request.share_key()
    if key is None:
        return None
    with service.lock:
        base = holder(service.models, key, besides=request.name)
    if base is None:
        return None
    service.drop(request.name)  # a replaced model goes first (AlreadyLoaded was checked)
    now = time.time()
    joined = dataclasses.replace(
        base, name=request.name, kind=kind, load_seconds=time.perf_counter() - started, loaded_at=now,
        last_used=now, request=request,
    )  # fmt: skip
    with service.lock:
        service.models[request.name] = joined
        shared_with = others(service.models, request.name)
    service.emit(EventType.STATE, op.request_id, {"name": request.name, "state": "loaded"})
    info = joined.info()
    return LoadResult(
        name=request.name, type=kind.value, class_name=joined.class_name, device=joined.device,
        dtype=joined.dtype, bytes=joined.nbytes, parameters=joined.parameters, tensors=joined.tensors,
        load_seconds=round(joined.load_seconds, 6), source=joined.source, memory=service.memory_info(),
        timings={"total": round(joined.load_seconds, 6)}, storage=joined.source.get("storage"),
        resident_bytes=info.resident_bytes, streamed_bytes=info.streamed_bytes, device_bytes=info.device_bytes,
        share=key,
        shared_with=shared_with,
    )  # fmt: skip


def own_copy(service: Service, name: str, op: Operation, why: str) -> bool:
    """Take ``name`` out of sharing before ``why`` changes its module: a module other names
    still hold is loaded again for ``name`` alone (from the request it was loaded by), so the
    change reaches no other name; a module no other name holds just stops being shared. True
    when ``name`` was shared (its module may be a new one now: fetch it again)."""
    with service.lock:
        model = service.models.get(name)
        if model is None or model.share is None:
            return False
        held_by = others(service.models, name)
        if not held_by:
            model.share = None
            return True
    assert model.request is not None
    request = model.request.model_copy(update={"share": None, "replace": True})
    try:
        service.load(request, model.kind, op)
    except ProtocolError as exc:
        exc.message = (
            f"{name!r} shares its module with {', '.join(held_by)}: giving it its own copy before {why} "
            f"failed: {exc.message}"
        )
        exc.args = (exc.message, *exc.args[1:])
        raise
    copy, shared = service.get(name).module, service.get(held_by[0]).module
    if isinstance(copy, torch.nn.Module) and isinstance(shared, torch.nn.Module):
        own_storage(copy, shared)  # on the CPU both may be views of one mapped segment
    return True
