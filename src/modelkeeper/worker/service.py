"""The worker's model interface: what one device holds and the operations on it.

This is the seed's ModelInterface. It owns the loaded modules of one device; the protocol
server (:mod:`modelkeeper.worker.server`) routes requests to it. Device work (loads, unloads,
memory optimisation) is called from one thread at a time; read-only queries (info, status) may
come from another thread at any moment and only take the short state lock. A part that several
placements load in one form is one module under several names, counted and freed once
(:mod:`.sharing`).
"""

from __future__ import annotations

import gc
import sys
import threading
import time
from collections.abc import Callable
from importlib import metadata
from pathlib import Path
from typing import Any

import torch

from modelkeeper.formats.errors import InvalidModelFile, ModelFileNotFound
from modelkeeper.protocol.commands import CommandType
from modelkeeper.protocol.messages import (
    PROTOCOL_VERSION,
    BenchmarkModelRequest,
    CleanupResult,
    DType,
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
from modelkeeper.worker import assemble, convert, sharing, sources, storage, streaming, weights
from modelkeeper.worker.device import DeviceMemory, MiB
from modelkeeper.worker.errors import (
    AlreadyLoaded,
    InsufficientMemory,
    InvalidRequest,
    WorkerModelNotFound,
    WorkerNotLoaded,
)
from modelkeeper.worker.lora import LoraManager
from modelkeeper.worker.mapping import TORCH_DTYPES as MAPPED_DTYPES
from modelkeeper.worker.mapping import MappingTable
from modelkeeper.worker.records import EventSink, LoadedModel, Operation
from modelkeeper.worker.warm import wait_for_warm_up

TORCH_DTYPES = {
    DType.FLOAT32: torch.float32, DType.FLOAT16: torch.float16, DType.BFLOAT16: torch.bfloat16,
    DType.FLOAT8_E4M3FN: torch.float8_e4m3fn, DType.FLOAT8_E5M2: torch.float8_e5m2,
}  # fmt: skip


#: Bytes read per group when a load casts down as it reads (``storage_dtype``): the device holds the
#: stored model plus about this much of the file at the peak, not the whole file.
CAST_GROUP_BYTES = 512 * MiB


def load_dtypes(request: LoadRequest) -> tuple[torch.dtype | None, torch.dtype | None]:
    """(compute dtype, storage dtype) of a load request; an fp8 dtype is a storage dtype only."""
    dtype = TORCH_DTYPES[request.dtype] if request.dtype else None
    stored = TORCH_DTYPES[request.storage_dtype] if request.storage_dtype else None
    if dtype in storage.FLOAT8:
        raise InvalidRequest(
            f"data.dtype: {request.dtype} is a storage dtype; pass it as storage_dtype (the compute "
            "dtype is float32, float16 or bfloat16)"
        )
    if stored is not None and stored not in storage.FLOAT8:
        if dtype is not None and dtype != stored:
            raise InvalidRequest(
                f"data.storage_dtype: {request.storage_dtype} is not a packed form (float8_e4m3fn, "
                f"float8_e5m2); weights in it are computed in it, which conflicts with dtype {request.dtype}"
            )
        return stored, None
    return dtype, stored


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
        self._throttle = throttle_mb_s * MiB if throttle_mb_s else None
        #: name -> loaded model, read and changed under ``lock`` (queries come from other threads)
        self.models: dict[str, LoadedModel] = {}
        self.lock = threading.Lock()
        self.mappings = MappingTable(
            read_only=self.device.type == "cuda", device_index=self.device.index or 0
        )
        self.loras = LoraManager(self.device, reserve_bytes=memory.reserve_bytes)
        self._undo: dict[str, list[Any]] = {}
        self.skeletons = assemble.SkeletonPool()
        self._wanted_skeletons: list[tuple[str, dict[str, Any]]] = []
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
        wait_for_warm_up()
        started = time.perf_counter()
        with self.lock:
            exists = request.name in self.models
        if exists and not request.replace:
            raise AlreadyLoaded(
                f"data.name: a model named {request.name!r} is already loaded (pass replace: true)"
            )
        joined = sharing.join(self, request, kind, op, started)
        if joined is not None:
            return joined
        source = sources.resolve(request, kind)
        if kind is ModelKind.TOKENIZER:
            return self._load_tokenizer(request, source, op, started)

        dtype, storage_dtype = load_dtypes(request)
        assert source.config is not None
        tensors = weights.list_tensors(source.files)
        if source.format == "single_file":
            source.config = convert.gguf_t5_config(kind, tensors, source.path, source.config)
            plan = convert.plan_component(
                kind, tensors, source.config, declared=source.layout, path=str(source.path)
            )
            sources.fit_to_shapes(source, plan.rule.name, plan.shapes(tensors))
            entries = [tensors[k] for k in plan.keys]
            class_name = assemble.class_name_for(
                kind, source.config, has_projection=convert.has_text_projection(plan)
            )
            source.layout = plan.layout
            rule = plan.rule.name
        else:
            entries = [e for k, e in tensors.items() if not k.endswith(convert.IGNORED_SUFFIXES)]
            plan = None
            class_name = assemble.class_name_for(kind, source.config)
            rule = "diffusers folder"
        # fp8 and GGUF tensors stay packed; a GGUF file's plain tensors (F32 norms beside F16 weights)
        # are put in one compute dtype on the same path
        packing = storage_dtype is not None or any(e.packed or e.file.suffix == ".gguf" for e in entries)
        if packing:
            required = storage.estimate_bytes(
                ((e.shape, e.nbytes, e.dtype in weights.FLOAT_DTYPES) for e in entries), storage_dtype, dtype
            )
        else:
            required = sum(e.nbytes_as(dtype) for e in entries)
        with self.lock:
            old = self.models.get(request.name) if exists else None
            shared = old is not None and bool(sharing.others(self.models, request.name))
            replaced_bytes = old.nbytes if old is not None and not shared else 0
            del old  # the old model stays loaded until the new one is built (an atomic replace)
        # offload: None loads the whole model here; a number streams what does not fit it (host first)
        offload = streaming.resident_limit(request.offload, required, self._free_budget(replaced_bytes))
        evicted = (
            []
            if offload is not None
            else self._make_room(required, request, exclude=request.name, freeing=replaced_bytes)
        )
        target = self.device if offload is None else torch.device("cpu")

        op.name = request.name
        self.emit(EventType.STATE, op.request_id, {"name": request.name, "state": "loading"})
        timings = {"plan": time.perf_counter() - started}
        skeleton = self.skeletons.take(class_name, source.config, path=str(source.path))
        stages: dict[str, float] = {}
        settle: list[Callable[[], None]] = []  # copies still running while the module is built
        try:
            transform = None
            if storage_dtype in storage.FLOAT8 and not any(e.packed for e in entries):
                # cast each group as it is read: the device holds the file's bytes a group at a time
                early = self._cast_sources(entries, plan, source.config, class_name, skeleton.result())
                transform = storage.cast_while_reading(early, storage_dtype)
            t = time.perf_counter()
            state = weights.read_tensors(
                entries,
                target,
                table=self.mappings,
                dtype=None if packing else dtype,
                progress=lambda done, total: self._progress(op, "read", done, total),
                check=op.check,
                throttle_bytes_per_s=self._throttle,
                stages=stages,
                transform=transform,
                group_bytes=CAST_GROUP_BYTES,
                settle=settle,
            )
            timings["read"] = time.perf_counter() - t
            timings.update(stages)
            op.check()
            t = time.perf_counter()
            if packing:
                state, _scaled = storage.split_scales(state)
            if plan is not None:
                state = convert.to_loadable(plan, state, source.config)
            timings["convert"] = time.perf_counter() - t
            t = time.perf_counter()
            skel = skeleton.result()
            stored: storage.StoragePlan | None = None
            if packing:
                if class_name in assemble.TEXT_ENCODER_CLASSES:  # owners are found by the module's own keys
                    state = assemble.rename_for_transformers(skel.module, state, skel.expected)
                state, stored = storage.plan_storage(skel.module, state, compute=dtype, storage=storage_dtype)
            module = assemble.build_module(
                class_name, source.config, state, target, path=str(source.path), module=skel,
                shapes=stored.logical_shapes() if stored is not None else None,
            )  # fmt: skip
            if stored is not None and stored.packed:
                storage.attach(module, stored)
            timings["assemble"] = time.perf_counter() - t
            del state
            stream = None if offload is None else self._stream(module, class_name, offload, source, request)
        except BaseException as exc:
            _settle(settle)
            self.emit(
                EventType.STATE,
                op.request_id,
                {
                    "name": request.name,
                    "state": "failed",
                    "reason": str(exc),
                    "error_code": getattr(exc, "code", None),
                },
            )
            raise
        if exists:
            self.drop(request.name)
        self._wanted_skeletons.append((class_name, source.config))
        nbytes, params, count, dtype_name = assemble.module_stats(module)
        form = stored.form if stored is not None else None
        if stored is not None:
            params, dtype_name = storage.parameter_count(module), str(stored.compute).removeprefix("torch.")
        t = time.perf_counter()
        _settle(settle)  # the model is handed out whole
        timings["settle"] = time.perf_counter() - t
        timings["total"] = time.perf_counter() - started
        source_info = source.describe() | {"rule": rule, "class_name": class_name}
        if form is not None:
            source_info["storage"] = form
        loaded = LoadedModel(
            request.name, kind, class_name, module, str(self.device), dtype_name, nbytes, params, count,
            time.perf_counter() - started, source_info, skeleton=skel, config=source.config,
            streamer=stream, share=request.share_key() if stream is None else None, request=request,
        )  # fmt: skip
        with self.lock:
            self.models[request.name] = loaded
        self.emit(EventType.STATE, op.request_id, {"name": request.name, "state": "loaded"})
        self._check_pressure(op.request_id)
        return LoadResult(
            name=request.name, type=kind.value, class_name=class_name, device=str(self.device), dtype=dtype_name,
            bytes=nbytes, parameters=params, tensors=count, load_seconds=round(loaded.load_seconds, 6),
            source=source_info, evicted=evicted, memory=self.memory_info(),
            timings={k: round(v, 6) for k, v in timings.items()}, storage=form,
            resident_bytes=loaded.info().resident_bytes, streamed_bytes=loaded.info().streamed_bytes,
            device_bytes=loaded.device_bytes, share=loaded.share,
        )  # fmt: skip

    @staticmethod
    def _cast_sources(
        entries: list[weights.TensorEntry],
        plan: convert.ComponentPlan | None,
        config: dict[str, Any],
        class_name: str,
        skel: assemble.Skeleton,
    ) -> set[str]:
        """The file keys a storage cast packs (:func:`storage.cast_sources`), through this load's
        own key conversion."""

        def to_module_keys(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
            if plan is not None:
                state = convert.to_loadable(plan, state, config)
            if class_name in assemble.TEXT_ENCODER_CLASSES:
                state = assemble.rename_for_transformers(skel.module, state, skel.expected)
            return state

        shapes = {e.key: (e.shape, MAPPED_DTYPES[e.dtype]) for e in entries if e.dtype in MAPPED_DTYPES}
        return storage.cast_sources(skel.module, shapes, to_module_keys)

    def _load_tokenizer(
        self, request: LoadRequest, source: sources.ComponentSource, op: Operation, started: float
    ) -> LoadResult:
        from transformers import AutoTokenizer

        if not any((source.path / f).exists() for f in sources.TOKENIZER_FILES):
            raise ModelFileNotFound(
                f"folder {source.path} has no tokenizer files ({', '.join(sources.TOKENIZER_FILES)})",
                path=str(source.path),
            )
        op.check()
        try:
            tokenizer = AutoTokenizer.from_pretrained(str(source.path), local_files_only=True)
        except (OSError, ValueError, KeyError) as exc:
            raise InvalidModelFile(
                f"{source.path}: cannot load tokenizer: {exc}", path=str(source.path)
            ) from None
        class_name = type(tokenizer).__name__
        info = source.describe() | {"rule": "tokenizer folder", "class_name": class_name}
        loaded = LoadedModel(
            request.name, ModelKind.TOKENIZER, class_name, tokenizer, "cpu", None, 0, 0, 0,
            time.perf_counter() - started, info,
        )  # fmt: skip
        self.drop(request.name)  # a replaced model (or tokenizer) goes properly: LoRAs detached, events sent
        with self.lock:
            self.models[request.name] = loaded
        return LoadResult(
            name=request.name, type="tokenizer", class_name=class_name, device="cpu", dtype=None, bytes=0,
            parameters=0, tensors=0, load_seconds=round(loaded.load_seconds, 6), source=info,
            memory=self.memory_info(), vocab_size=len(tokenizer),
        )  # fmt: skip

    def _progress(self, op: Operation, stage: str, done: int, total: int) -> None:
        op.progress = {"stage": stage, "done": done, "total": total, "unit": "bytes"}
        self.emit(EventType.PROGRESS, op.request_id, op.progress)

    def _free_budget(self, freeing: int) -> int:
        """Bytes a new model may take now: the budget's free part (``freeing``: bytes of a model it
        replaces), and on CUDA no more than the device has free."""
        mem = self.memory_info()
        free_budget = mem.budget_bytes - mem.models_bytes + freeing
        if self.device.type == "cuda":
            # a replaced model is still resident while its successor loads: no device credit for it
            device_free = mem.free_bytes + self.memory.cached() - self.memory.reserve_bytes
            free_budget = min(free_budget, device_free)
        return free_budget

    def _stream(
        self,
        module: torch.nn.Module,
        class_name: str,
        limit: int,
        source: sources.ComponentSource,
        request: LoadRequest,
    ) -> streaming.Streamer:
        """Place a host-built module with partial residency (``offload``), or refuse it when not
        even its always-resident part and its ring fit."""
        free = self._free_budget(0)
        pinned = streaming.registered_host(source.files, self.mappings, self.device)
        stream = streaming.Streamer(module, self.device, class_name, limit, device_budget=free, pinned=pinned)
        if stream.device_bytes > free:
            stream.close()
            mem = self.memory_info()
            raise InsufficientMemory(
                f"data.offload: {request.name!r} needs {stream.device_bytes / MiB:.1f} MiB on {self.device} even "
                f"streamed (its parts outside the blocks and a ring for the largest) but "
                f"{max(free, 0) / MiB:.1f} MiB of the {mem.budget_bytes / MiB:.1f} MiB budget is free",
                required_bytes=stream.device_bytes,
                free_budget_bytes=max(free, 0),
                budget_bytes=mem.budget_bytes,
            )
        return stream

    def _make_room(self, required: int, request: LoadRequest, *, exclude: str, freeing: int) -> list[str]:
        """Check the budget; with ``allow_evict`` unload least-recently-used models until it fits."""
        mem = self.memory_info()
        free_budget = self._free_budget(freeing)
        if required <= free_budget:
            return []
        with self.lock:
            models = dict(self.models)
        lru = sorted(
            (m for m in models.values() if m.name != exclude and m.device_bytes > 0),
            key=lambda m: m.last_used,
        )
        plan: list[str] = []
        reclaim = 0
        if request.allow_evict:
            for model in lru:
                if required <= free_budget + reclaim:
                    break
                plan.append(model.name)
                reclaim = sharing.freed_by(models, plan)  # a shared module: once its last name goes
        if required > free_budget + reclaim:
            hint = (
                ""
                if request.allow_evict
                else " (pass allow_evict: true to unload least-recently-used models)"
            )
            raise InsufficientMemory(
                f"{request.name!r} needs {required / MiB:.1f} MiB but {max(free_budget, 0) / MiB:.1f} MiB of the "
                f"{mem.budget_bytes / MiB:.1f} MiB budget on {self.device} is free{hint}",
                required_bytes=required,
                free_budget_bytes=max(free_budget, 0),
                budget_bytes=mem.budget_bytes,
            )
        for name in plan:
            self.drop(name)
            self.emit(EventType.STATE, None, {"name": name, "state": "unloaded", "reason": "evicted"})
        return plan

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
        return bool(self._wanted_skeletons)

    def idle_work(self) -> None:
        """Work for a quiet moment (the device thread calls it once no request came for
        ``IDLE_WORK_AFTER_S``): build the skeletons the next loads of the architectures loaded
        lately will want, unless an unloaded module was given back for them meanwhile. A build
        takes the interpreter for a fifth of a second (an SDXL UNet): never next to a load."""
        while self._wanted_skeletons:
            self.skeletons.prefetch(*self._wanted_skeletons.pop())  # builds none where one is ready

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

        return validate(self.module(req.name), req.level, batch=req.batch).as_dict() | {"name": req.name}

    def benchmark_model(self, req: BenchmarkModelRequest, op: Operation) -> dict[str, Any]:
        from modelkeeper.worker.bench import benchmark

        report = benchmark(
            self.module(req.name), resolution=req.resolution, batch=req.batch, steps=req.steps,
            warmup=req.warmup, tokens=req.tokens, check=op.check,
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
            report = optimize(module, req.options, measure=req.measure)
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

    def _check_pressure(self, request_id: str | None) -> None:
        mem = self.memory_info()
        if mem.budget_bytes and mem.models_bytes > 0.9 * mem.budget_bytes:
            self.emit(EventType.MEMORY_PRESSURE, request_id, mem.model_dump(mode="json"))


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


def _settle(waits: list[Callable[[], None]]) -> None:
    """Wait for the copies a load left running (:func:`~modelkeeper.worker.mapping.load_tensors`)."""
    while waits:
        waits.pop()()
