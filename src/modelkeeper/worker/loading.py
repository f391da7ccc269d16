"""The load path of the worker: one component (a model's weights, or a tokenizer) from its files
onto the device, for the service that holds the device's models.

A load resolves its source (:mod:`.sources`), plans the keys and the bytes it needs (a packed file's
estimate from :mod:`.storage`), makes room under the budget (evicting least-recently-used models
when allowed) or places it partially resident (``offload``, :mod:`.streaming`), reads the tensors
(a RAM-cache segment mapped once, the copy left running while the module is built on the meta
device around them, :mod:`.assemble`), and registers it in the service's table. A request that
shares a part already held takes that module instead (:func:`.sharing.join`). Apart from the
service so that the service reads as the table of what the device holds and the operations on it.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import Any, Protocol

import torch

from modelkeeper.formats.errors import InvalidModelFile, ModelFileNotFound
from modelkeeper.protocol.messages import DType, EventType, LoadRequest, LoadResult, ModelKind
from modelkeeper.worker import assemble, convert, sharing, sources, storage, streaming, weights
from modelkeeper.worker.device import DeviceMemory, MiB
from modelkeeper.worker.errors import AlreadyLoaded, InsufficientMemory, InvalidRequest
from modelkeeper.worker.mapping import TORCH_DTYPES as MAPPED_DTYPES
from modelkeeper.worker.mapping import MappingTable
from modelkeeper.worker.records import LoadedModel, Operation
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


class Service(sharing.Service, Protocol):
    """What the load path uses of the service that holds the device's models
    (``service.ModelService``): its table (:class:`.sharing.Service`), device and pools."""

    device: torch.device
    memory: DeviceMemory
    mappings: MappingTable
    skeletons: assemble.SkeletonPool


class Loader:
    """Loads components for ``service`` (one at a time, on the device thread) and keeps what the
    loads leave for a quiet moment: the skeletons the next loads of their architectures will want."""

    def __init__(self, service: Service, *, throttle_bytes_per_s: float | None = None) -> None:
        self.service = service
        self._throttle = throttle_bytes_per_s
        self._wanted_skeletons: list[tuple[str, dict[str, Any]]] = []

    def load(
        self, request: LoadRequest, kind: ModelKind, op: Operation, *, group_bytes: int = CAST_GROUP_BYTES
    ) -> LoadResult:
        """Load ``request`` as a component of ``kind`` under its name (``group_bytes``: the bytes read
        at a time when the load casts as it reads, :data:`CAST_GROUP_BYTES`)."""
        wait_for_warm_up()
        started = time.perf_counter()
        with self.service.lock:
            exists = request.name in self.service.models
        if exists and not request.replace:
            raise AlreadyLoaded(
                f"data.name: a model named {request.name!r} is already loaded (pass replace: true)"
            )
        joined = sharing.join(self.service, request, kind, op, started)
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
        with self.service.lock:
            old = self.service.models.get(request.name) if exists else None
            shared = old is not None and bool(sharing.others(self.service.models, request.name))
            replaced_bytes = old.nbytes if old is not None and not shared else 0
            del old  # the old model stays loaded until the new one is built (an atomic replace)
        # offload: None loads the whole model here; a number streams what does not fit it (host first)
        offload = streaming.resident_limit(request.offload, required, self._free_budget(replaced_bytes))
        evicted = (
            []
            if offload is not None
            else self._make_room(required, request, exclude=request.name, freeing=replaced_bytes)
        )
        target = self.service.device if offload is None else torch.device("cpu")

        op.name = request.name
        self.service.emit(EventType.STATE, op.request_id, {"name": request.name, "state": "loading"})
        timings = {"plan": time.perf_counter() - started}
        skeleton = self.service.skeletons.take(class_name, source.config, path=str(source.path))
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
                table=self.service.mappings,
                dtype=None if packing else dtype,
                progress=lambda done, total: self._progress(op, "read", done, total),
                check=op.check,
                throttle_bytes_per_s=self._throttle,
                stages=stages,
                transform=transform,
                group_bytes=group_bytes,
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
            self.service.emit(
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
            self.service.drop(request.name)
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
        device = str(self.service.device)
        loaded = LoadedModel(
            request.name, kind, class_name, module, device, dtype_name, nbytes, params, count,
            time.perf_counter() - started, source_info, skeleton=skel, config=source.config,
            streamer=stream, share=request.share_key() if stream is None else None, request=request,
        )  # fmt: skip
        with self.service.lock:
            self.service.models[request.name] = loaded
        self.service.emit(EventType.STATE, op.request_id, {"name": request.name, "state": "loaded"})
        self._check_pressure(op.request_id)
        return LoadResult(
            name=request.name, type=kind.value, class_name=class_name, device=device, dtype=dtype_name,
            bytes=nbytes, parameters=params, tensors=count, load_seconds=round(loaded.load_seconds, 6),
            source=source_info, evicted=evicted, memory=self.service.memory_info(),
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
        # a replaced model (or tokenizer) goes properly: LoRAs detached, events sent
        self.service.drop(request.name)
        with self.service.lock:
            self.service.models[request.name] = loaded
        return LoadResult(
            name=request.name, type="tokenizer", class_name=class_name, device="cpu", dtype=None, bytes=0,
            parameters=0, tensors=0, load_seconds=round(loaded.load_seconds, 6), source=info,
            memory=self.service.memory_info(), vocab_size=len(tokenizer),
        )  # fmt: skip

    def _progress(self, op: Operation, stage: str, done: int, total: int) -> None:
        op.progress = {"stage": stage, "done": done, "total": total, "unit": "bytes"}
        self.service.emit(EventType.PROGRESS, op.request_id, op.progress)

    def _free_budget(self, freeing: int) -> int:
        """Bytes a new model may take now: the budget's free part (``freeing``: bytes of a model it
        replaces), and on CUDA no more than the device has free."""
        mem = self.service.memory_info()
        free_budget = mem.budget_bytes - mem.models_bytes + freeing
        if self.service.device.type == "cuda":
            # a replaced model is still resident while its successor loads: no device credit for it
            device_free = mem.free_bytes + self.service.memory.cached() - self.service.memory.reserve_bytes
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
        pinned = streaming.registered_host(source.files, self.service.mappings, self.service.device)
        stream = streaming.Streamer(
            module, self.service.device, class_name, limit, device_budget=free, pinned=pinned
        )
        if stream.device_bytes > free:
            stream.close()
            mem = self.service.memory_info()
            raise InsufficientMemory(
                f"data.offload: {request.name!r} needs {stream.device_bytes / MiB:.1f} MiB on "
                f"{self.service.device} even streamed (its parts outside the blocks and a ring for the largest) but "
                f"{max(free, 0) / MiB:.1f} MiB of the {mem.budget_bytes / MiB:.1f} MiB budget is free",
                required_bytes=stream.device_bytes,
                free_budget_bytes=max(free, 0),
                budget_bytes=mem.budget_bytes,
            )
        return stream

    def _make_room(self, required: int, request: LoadRequest, *, exclude: str, freeing: int) -> list[str]:
        """Check the budget; with ``allow_evict`` unload least-recently-used models until it fits."""
        mem = self.service.memory_info()
        free_budget = self._free_budget(freeing)
        if required <= free_budget:
            return []
        with self.service.lock:
            models = dict(self.service.models)
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
                f"{mem.budget_bytes / MiB:.1f} MiB budget on {self.service.device} is free{hint}",
                required_bytes=required,
                free_budget_bytes=max(free_budget, 0),
                budget_bytes=mem.budget_bytes,
            )
        for name in plan:
            self.service.drop(name)
            self.service.emit(EventType.STATE, None, {"name": name, "state": "unloaded", "reason": "evicted"})
        return plan

    def _check_pressure(self, request_id: str | None) -> None:
        mem = self.service.memory_info()
        if mem.budget_bytes and mem.models_bytes > 0.9 * mem.budget_bytes:
            self.service.emit(EventType.MEMORY_PRESSURE, request_id, mem.model_dump(mode="json"))

    def has_idle_work(self) -> bool:
        return bool(self._wanted_skeletons)

    def idle_work(self) -> None:
        """Work for a quiet moment (the device thread calls it once no request came for
        ``IDLE_WORK_AFTER_S``): build the skeletons the next loads of the architectures loaded
        lately will want, unless an unloaded module was given back for them meanwhile. A build
        takes the interpreter for a fifth of a second (an SDXL UNet): never next to a load."""
        while self._wanted_skeletons:
            self.service.skeletons.prefetch(*self._wanted_skeletons.pop())  # builds none where one is ready


def _settle(waits: list[Callable[[], None]]) -> None:
    """Wait for the copies a load left running (:func:`~modelkeeper.worker.mapping.load_tensors`)."""
    while waits:
        waits.pop()()
