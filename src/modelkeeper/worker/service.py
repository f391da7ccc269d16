"""The worker's model interface: what one device holds and the operations on it.

This is the seed's ModelInterface. It owns the loaded modules of one device; the protocol
server (:mod:`modelkeeper.worker.server`) routes requests to it. Device work (loads, unloads,
memory optimisation) is called from one thread at a time; read-only queries (info, status) may
come from another thread at any moment and only take the short state lock. A part that several
placements load in one form is one module under several names, counted and freed once
(:mod:`.sharing`). A load is the load path's (:mod:`.loading`); the service keeps the table it
fills, the unloads, and the operations on what is loaded (LoRAs, validation, benchmarks,
optimisations).
"""

from __future__ import annotations

import gc
import sys
import threading
import time
from importlib import metadata
from pathlib import Path
from typing import Any

import torch

from modelkeeper.protocol.commands import CommandType
from modelkeeper.protocol.messages import (
    PROTOCOL_VERSION,
    BenchmarkModelRequest,
    CleanupResult,
    EventType,
    HelloResult,
    LoadLoraRequest,
    LoadRequest,
    LoadResult,
    MemoryInfo,
    ModelInfoResult,
    ModelKind,
    OptimizeMemoryRequest,
    OptimizeMemoryResult,
    OptimizeModelRequest,
    ReleaseSegmentsResult,
    UnloadResult,
    ValidateModelRequest,
)
from modelkeeper.worker import assemble, loading, sharing, storage
from modelkeeper.worker.device import DeviceMemory, MiB
from modelkeeper.worker.errors import InvalidRequest, WorkerModelNotFound, WorkerNotLoaded
from modelkeeper.worker.lora import LoraManager
from modelkeeper.worker.mapping import MappingTable
from modelkeeper.worker.records import EventSink, LoadedModel, Operation

#: The bytes a load that casts as it reads reads at a time (:data:`.loading.CAST_GROUP_BYTES`),
#: passed to each load from here: tests make it small on this module.
CAST_GROUP_BYTES = loading.CAST_GROUP_BYTES


class ModelService:
    """Loads, keeps and unloads the models of one device."""

    def __init__(
        self,
        memory: DeviceMemory,
        *,
        emit: EventSink | None = None,
        throttle_mb_s: float | None = None,
    ) -> None:
        self.memory = memory
        self.device = memory.device
        self.emit: EventSink = emit or (lambda event, rid, data: None)
        #: name -> loaded model, read and changed under ``lock`` (queries come from other threads)
        self.models: dict[str, LoadedModel] = {}
        self.lock = threading.Lock()
        self.mappings = MappingTable(
            read_only=self.device.type == "cuda", device_index=self.device.index or 0
        )
        self.loras = LoraManager(self.device, reserve_bytes=memory.reserve_bytes)
        self._undo: dict[str, list[Any]] = {}
        self.skeletons = assemble.SkeletonPool()
        self._loader = loading.Loader(
            self, throttle_bytes_per_s=throttle_mb_s * MiB if throttle_mb_s else None
        )
        self.started_at = time.time()

    # ------------------------------------------------------------------ queries (any thread)

    def models_bytes(self) -> int:
        """Bytes the loaded models hold on the device, a module shared by several names once."""
        with self.lock:
            return sharing.unique_bytes(self.models.values())

    def memory_info(self) -> MemoryInfo:
        return self.memory.snapshot(self.models_bytes())

    def model_count(self) -> int:
        with self.lock:
            return len(self.models)

    def hello(self) -> HelloResult:
        from modelkeeper import __version__

        return HelloResult(
            protocol_version=PROTOCOL_VERSION,
            worker_version=__version__,
            pid=_pid(),
            device=self.memory.info(),
            memory=self.memory_info(),
            torch_version=torch.__version__,
            diffusers_version=_version("diffusers"),
            transformers_version=_version("transformers"),
            capabilities=sorted(c.value for c in CAPABILITIES),
            model_kinds=[k.value for k in LOADABLE_KINDS],
        )

    def model_info(self, name: str | None = None) -> ModelInfoResult:
        with self.lock:
            if name is not None and name not in self.models:
                raise WorkerModelNotFound(
                    f"data.name: no model named {name!r} is loaded (loaded: {self._names()})"
                )
            models = [m.info() for m in self.models.values() if name is None or m.name == name]
            for info in models:
                info.shared_with = sharing.others(self.models, info.name)
        return ModelInfoResult(models=models, model_count=len(models), memory=self.memory_info())

    def get(self, name: str) -> LoadedModel:
        """The loaded model (for in-process callers that want the live module)."""
        with self.lock:
            model = self.models.get(name)
            if model is None:
                raise WorkerModelNotFound(f"no model named {name!r} is loaded (loaded: {self._names()})")
            model.last_used = time.time()
            return model

    def _names(self) -> str:
        return ", ".join(sorted(self.models)) or "none"

    # ------------------------------------------------------------------ device work (one thread)

    def load(self, request: LoadRequest, kind: ModelKind, op: Operation) -> LoadResult:
        """Load ``request`` as a component of ``kind`` under its name (:class:`.loading.Loader`)."""
        return self._loader.load(request, kind, op, group_bytes=CAST_GROUP_BYTES)

    def drop(self, name: str) -> int:
        """Unload ``name``; the bytes freed (none while another name shares its module)."""
        with self.lock:
            model = self.models.pop(name, None)
            kept = model is not None and any(m.module is model.module for m in self.models.values())
        if model is None:
            return 0
        if kept:  # a shared part: the module stays for its other names
            return 0
        freed = model.device_bytes
        before = self.memory.allocated()
        patched: list[str] = []
        if isinstance(model.module, torch.nn.Module):
            patched = self.loras.detach(model.module)
            for lora in patched:
                self.emit(
                    EventType.STATE, None, {"name": lora, "state": "unloaded", "reason": f"{name} unloaded"}
                )
        optimized = bool(self._undo.pop(name, None))
        if model.streamer is not None:
            model.streamer.close()  # hooks off, ring and pinned copies given back
        self._recycle(model, clean=not patched and not optimized and model.streamer is None)
        del model
        if before - self.memory.allocated() < freed // 2:
            gc.collect()  # reference cycles held it; the common case frees by refcount alone
        return freed

    def _recycle(self, model: LoadedModel, *, clean: bool) -> None:
        """Give an unloaded module back to the skeleton pool: only one that no LoRA patched and no
        optimisation changed, and that nothing outside this service still holds (a pipeline built
        in-process from ``module()`` keeps its weights)."""
        skel, config, class_name = model.skeleton, model.config, model.class_name
        model.skeleton = None
        if skel is None or config is None or not clean:
            return
        module, model.module = model.module, None
        # References: the skeleton's, this local, and getrefcount's argument.
        if sys.getrefcount(module) > 3:
            return
        storage.detach(module)  # a packed module's decode hooks go with its tensors
        self.skeletons.give_back(class_name, config, skel)

    def close(self) -> None:
        """At the worker's end: drop every model, then unregister and unmap its segments. A
        page-locked range left registered when its memory goes (the mapping collected with the
        worker) stays registered in the process: a later mapping at those addresses fails
        ``cudaHostRegister`` and copies from it fail ("already mapped"), which an in-process worker
        followed by another, or by diffusers, in one process meets."""
        with self.lock:
            names = list(self.models)
        for name in names:
            self.drop(name)
        gc.collect()
        self.mappings.release()
        self.memory.release_caches()

    def unload(self, name: str, op: Operation) -> UnloadResult:
        before = self.memory_info()
        with self.lock:
            known = name in self.models
        if not known:
            raise WorkerNotLoaded(f"data.name: no model named {name!r} is loaded (loaded: {self._names()})")
        self.emit(EventType.STATE, op.request_id, {"name": name, "state": "unloading"})
        freed = self.drop(name)
        # Hand the freed blocks back to the device: kept in the allocator's cache they stay used for
        # every other process on the GPU (an eviction inside a load keeps them: that load reuses them).
        self.memory.release_caches()
        self.emit(EventType.STATE, op.request_id, {"name": name, "state": "unloaded"})
        return UnloadResult(
            name=name, freed_bytes=freed, memory_before=before, memory_after=self.memory_info()
        )

    def optimize_memory(self, request: OptimizeMemoryRequest, op: Operation) -> OptimizeMemoryResult:
        before = self.memory_info()
        unloaded: list[str] = []
        freed = 0
        target = int(request.target_free_mb * MiB) if request.target_free_mb is not None else None
        if target is not None:
            with self.lock:
                lru = sorted(
                    (m for m in self.models.values() if m.name not in request.keep),
                    key=lambda m: m.last_used,
                )
            for model in lru:
                if self._budget_free() >= target:
                    break
                op.check()
                freed += self.drop(model.name)
                unloaded.append(model.name)
                self.emit(
                    EventType.STATE,
                    op.request_id,
                    {"name": model.name, "state": "unloaded", "reason": "optimize_memory"},
                )
        gc.collect()
        self.memory.release_caches()
        after = self.memory_info()
        met = target is None or after.budget_bytes - after.models_bytes >= target
        return OptimizeMemoryResult(
            memory_before=before, memory_after=after, unloaded=unloaded, freed_bytes=freed, target_met=met
        )

    def _budget_free(self) -> int:
        mem = self.memory_info()
        return mem.budget_bytes - mem.models_bytes

    def cleanup(self, op: Operation) -> CleanupResult:
        with self.lock:
            names = list(self.models)
        freed = 0
        for name in names:
            freed += self.drop(name)
            self.emit(
                EventType.STATE, op.request_id, {"name": name, "state": "unloaded", "reason": "cleanup"}
            )
        gc.collect()
        self.memory.release_caches()  # the freed blocks back to the device, as an unload does
        return CleanupResult(unloaded=names, freed_bytes=freed, memory_after=self.memory_info())

    def has_idle_work(self) -> bool:
        return self._loader.has_idle_work()

    def idle_work(self) -> None:
        """Work for a quiet moment: the skeletons the next loads will want
        (:meth:`.loading.Loader.idle_work`)."""
        self._loader.idle_work()

    # ------------------------------------------------------------------ LoRA, validation, benchmarks

    def module(self, name: str, field: str = "data.name") -> torch.nn.Module:
        """The live ``torch.nn.Module`` loaded as ``name`` (tokenizers are not modules)."""
        with self.lock:
            model = self.models.get(name)
            if model is None:
                raise WorkerNotLoaded(f"{field}: no model named {name!r} is loaded (loaded: {self._names()})")
            model.last_used = time.time()
        if not isinstance(model.module, torch.nn.Module):
            raise InvalidRequest(f"{field}: {name!r} is a {model.kind.value}, not a model with weights")
        if model.streamer is not None:
            model.streamer.settle()  # every weight at rest on its host copy (what LoRAs patch)
        return model.module

    def load_lora(self, req: LoadLoraRequest, op: Operation) -> dict[str, Any]:
        """Patch the targets with a LoRA. A target whose module is shared with other names (a part
        of several placements) gets its own copy first, and only when the LoRA patches it (copy on
        write, :func:`.sharing.own_copy`): the other names keep the weights they loaded."""
        names = {role.value: model for role, model in req.targets.items()}
        targets = {role: self.module(name, f"data.targets.{role}") for role, name in names.items()}
        role_strength = {role.value: value for role, value in (req.role_strength or {}).items()}
        unshared: list[str] = []

        def own(roles: set[str]) -> dict[str, torch.nn.Module]:
            swapped: dict[str, torch.nn.Module] = {}
            for role in sorted(roles):
                name = names[role]
                if name not in unshared and sharing.own_copy(self, name, op, f"LoRA {req.name!r} patches it"):
                    unshared.append(name)
                module = self.module(name)
                if module is not targets[role]:
                    swapped[role] = module
            return swapped

        report = self.loras.load(
            req.name, req.path, targets, strength=req.strength, role_strength=role_strength,
            strict=req.strict, min_match=req.min_match, check=op.check, own=own,
        )  # fmt: skip
        return report.as_dict() | {"targets": dict(req.targets), "unshared": unshared}

    def validate_model(self, req: ValidateModelRequest, op: Operation) -> dict[str, Any]:
        from modelkeeper.worker.validate import validate

        report = validate(self.module(req.name), req.level, batch=req.batch, step=op.step)
        return report.as_dict() | {"name": req.name}

    def benchmark_model(self, req: BenchmarkModelRequest, op: Operation) -> dict[str, Any]:
        from modelkeeper.worker.bench import benchmark

        report = benchmark(
            self.module(req.name), resolution=req.resolution, batch=req.batch, steps=req.steps,
            warmup=req.warmup, tokens=req.tokens, step=op.step,
        )  # fmt: skip
        return report.as_dict() | {"name": req.name, "device": str(self.device)}

    def optimize_model(self, req: OptimizeModelRequest, op: Operation) -> dict[str, Any]:
        from modelkeeper.worker.optimize import optimize, revert

        left = not req.revert and sharing.own_copy(self, req.name, op, "an optimisation changes it")
        module = self.module(req.name)
        if self.get(req.name).streamer is not None:
            raise InvalidRequest(
                f"data.name: {req.name!r} is partially resident (offload); optimisations apply to "
                "fully resident models (load it with offload: none)"
            )
        before = self.get(req.name).nbytes
        if req.revert:
            reverted = [r for undo in reversed(self._undo.pop(req.name, [])) for r in revert(module, undo)]
            result: dict[str, Any] = {"reverted": reverted}
        else:
            report = optimize(module, req.options, measure=req.measure, step=op.step)
            self._undo.setdefault(req.name, []).append(report.undo)
            result = report.as_dict() | {"unshared": [req.name] if left else []}
        with self.lock:
            model = self.models[req.name]
            model.nbytes, model.parameters, model.tensors, model.dtype = assemble.module_stats(module)
        return result | {"name": req.name, "bytes_before": before, "bytes_after": model.nbytes}

    def fingerprints(self, name: str | None) -> ModelInfoResult:
        from modelkeeper.worker.fingerprint import fingerprint

        info = self.model_info(name)
        for entry in info.models:
            model = self.get(entry.name)
            if isinstance(model.module, torch.nn.Module):
                started = time.perf_counter()
                entry.fingerprint = fingerprint(model.module)  # type: ignore[attr-defined]
                entry.fingerprint_seconds = round(time.perf_counter() - started, 6)  # type: ignore[attr-defined]
        return info

    def release_segments(self, paths: list[str] | None) -> ReleaseSegmentsResult:
        """Unmap RAM-cache segments (the orchestrator is about to drop them). Models already
        loaded from them keep their device copies; CPU views keep the pages until unloaded."""
        if paths is None:
            return ReleaseSegmentsResult(released=self.mappings.release())
        released = [r for p in paths for r in self.mappings.release(Path(p))]
        return ReleaseSegmentsResult(released=released)


LOADABLE_KINDS = (
    ModelKind.UNET, ModelKind.TRANSFORMER, ModelKind.VAE, ModelKind.TEXT_ENCODER, ModelKind.CONTROLNET,
    ModelKind.TOKENIZER,
)  # fmt: skip

CAPABILITIES = frozenset(
    {
        CommandType.WORKER_HELLO, CommandType.WORKER_SHUTDOWN, CommandType.CONTROL_CANCEL,
        CommandType.LOAD_MODEL, CommandType.LOAD_UNET, CommandType.LOAD_VAE, CommandType.LOAD_ENCODER,
        CommandType.LOAD_TOKENIZER, CommandType.UNLOAD_MODEL, CommandType.GET_MODEL_INFO,
        CommandType.GET_STATUS, CommandType.OPTIMIZE_MEMORY, CommandType.CLEANUP, CommandType.RELEASE_SEGMENTS,
        CommandType.LOAD_LORA, CommandType.UNLOAD_LORA, CommandType.SET_LORA_STRENGTH, CommandType.VALIDATE_MODEL,
        CommandType.BENCHMARK_MODEL, CommandType.OPTIMIZE_MODEL,
    }
)  # fmt: skip


def _version(dist: str) -> str:
    try:
        return metadata.version(dist)
    except metadata.PackageNotFoundError:
        return "not installed"


def _pid() -> int:
    import os

    return os.getpid()
