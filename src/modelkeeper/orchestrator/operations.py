"""Operations on loaded models: validate, benchmark and optimize, on every loaded component of a
model (or of every loaded model), queued on each device like loads, recorded in the history."""

from __future__ import annotations

import functools
from collections.abc import Awaitable
from typing import Any

from pydantic import BaseModel, ValidationError

from modelkeeper.orchestrator.catalog import Catalog
from modelkeeper.orchestrator.errors import NotLoaded
from modelkeeper.orchestrator.forms import shown_offload
from modelkeeper.orchestrator.jobs import Job, JobManager
from modelkeeper.orchestrator.loads import Loads
from modelkeeper.orchestrator.pool import WorkerPool
from modelkeeper.orchestrator.settings import Settings
from modelkeeper.orchestrator.state import Placement, PlacementState, StateView, held_bytes
from modelkeeper.orchestrator.wording import in_users_words
from modelkeeper.orchestrator.workers import Priority, WorkerSlot
from modelkeeper.protocol.commands import CommandType
from modelkeeper.protocol.errors import ErrorCode, ProtocolError
from modelkeeper.protocol.messages import (
    COMMAND_MODELS,
    OPTIMIZE_OPTIONS,
    BenchmarkModelRequest,
    ModelInfoRequest,
    ModelInfoResult,
    OptimizeModelRequest,
    ValidateModelRequest,
)
from modelkeeper.sizes import format_size

COMMANDS: dict[str, tuple[CommandType, type[BaseModel]]] = {
    "validate": (CommandType.VALIDATE_MODEL, ValidateModelRequest),
    "benchmark": (CommandType.BENCHMARK_MODEL, BenchmarkModelRequest),
    "optimize": (CommandType.OPTIMIZE_MODEL, OptimizeModelRequest),
}
# What the history keeps of an operation's result: the figures, not the payload.
SUMMARY_FIELDS = {
    "validate": ("passed", "level", "seconds"),
    "benchmark": ("figures", "class_name", "seconds"),
    "optimize": ("applied", "latency_before_s", "latency_after_s", "speedup"),
}


class Operations:
    def __init__(
        self,
        settings: Settings,
        catalog: Catalog,
        loads: Loads,
        pool: WorkerPool,
        view: StateView,
        jobs: JobManager,
    ) -> None:
        self.settings = settings
        self.catalog = catalog
        self.loads = loads
        self.pool = pool
        self.view = view
        self.jobs = jobs

    async def run(
        self,
        op: str,
        ref: str | None,
        device: str | None,
        data: dict[str, Any],
        *,
        component: str | None = None,
        wait: bool = True,
        timeout: float | None = None,
        priority: int = Priority.NORMAL,
    ) -> dict[str, Any]:
        """``op`` on every loaded component of a model (``ref``) or of every loaded model (``ref``
        None): a job whose result is a list, one entry (``model_id``, ``handle``, ``device``, ``components``)
        per placement, whether one model on one device or many."""
        check_request(op, data)  # a bad option is the caller's to fix: refused before any job
        if ref is not None:
            record = await self.catalog.resolve(ref)
            placements = self.loads.loaded(record, device)
        else:
            placements = [
                p
                for p in self.view.placements.values()
                if p.state is PlacementState.LOADED and device in (None, p.device)
            ]
        if op == "optimize" and not data.get("revert"):
            for p in placements:
                check_optimizable(p, component, data.get("options") or {})
        params = {"model_id": None if ref is None else placements[0].model_id, "device": device, **data}

        async def body(job: Job) -> Any:
            out: list[dict[str, Any]] = []
            for i, p in enumerate(placements):
                slot = self.pool.slot(p.device)
                job.progress(done=i, total=len(placements), model_id=p.model_id, device=p.device, force=True)

                def run(p: Placement = p, slot: WorkerSlot = slot) -> Awaitable[dict[str, Any]]:
                    return self._on_components(op, slot, p, data, component, job)

                out.append(
                    await slot.run(
                        run,
                        priority=priority,
                        deadline=self.loads.deadline(timeout),
                        label=f"{op} {p.model_id}",
                    )
                )
            job.progress(done=len(placements), total=len(placements), force=True)
            return out

        return await self.jobs.run(op, params, body, wait=wait, timeout=timeout, queued=True)

    async def _on_components(
        self, op: str, slot: WorkerSlot, p: Placement, data: dict[str, Any], component: str | None, job: Job
    ) -> dict[str, Any]:
        command, request = COMMANDS[op]
        result_type = COMMAND_MODELS[command][1]
        job.start()  # queued until now: its device's queue runs it
        results: dict[str, Any] = {}
        with p.in_use():
            for label, name in p.components.items():
                if component is not None and component != label:
                    continue
                try:
                    answer = await slot.call(
                        command,
                        _request(request, {**data, "name": name}),
                        result_type,
                        timeout=self.settings.request_timeout,
                        on_progress=functools.partial(_steps, job, label),
                    )
                except ProtocolError as exc:
                    raise in_users_words(exc, p.handle or p.name, {label: name}) from None
                results[label] = answer.model_dump(mode="json", exclude_unset=True)
        if op == "optimize":  # a dtype change changes the bytes the placement holds
            await _refresh_bytes(slot, p)
        if component is not None and not results:
            raise NotLoaded(
                f"{p.handle or p.name} ({p.model_id}) has no loaded component {component!r} "
                f"({', '.join(p.components)})",
                model_id=p.model_id,
                handle=p.handle or p.name,
            )
        summary = {
            name: {k: v for k, v in r.items() if k in SUMMARY_FIELDS[op]} for name, r in results.items()
        }
        await self.catalog.record(p.model_id, op, {"device": p.device, "components": summary})
        return {
            "model_id": p.model_id,
            "handle": p.handle or p.name,
            "device": p.device,
            "components": results,
        }


def _steps(job: Job, part: str, data: dict[str, Any]) -> None:
    """The worker's step of a component (a check, a pass, an option) as the job's progress, beside
    its count of placements (``done`` of ``total``): ``part``, ``stage``, ``steps_done``, ``steps_total``."""
    job.progress(
        part=part, stage=data.get("stage"), steps_done=data.get("done"), steps_total=data.get("total")
    )


def check_request(op: str, data: dict[str, Any]) -> None:
    """INVALID_REQUEST for what no worker would take: an unknown option or a bad value (the
    worker's own request model says; a benchmark resolution not a multiple of 8, as its worker
    checks), or an optimize with nothing to apply (no option, no revert), whose "speedup" would
    measure nothing."""
    _request(COMMANDS[op][1], {**data, "name": "-"})
    resolution = data.get("resolution")
    if op == "benchmark" and isinstance(resolution, int) and resolution % 8:
        near = sorted({max(8, resolution // 8 * 8), resolution // 8 * 8 + 8})
        raise ProtocolError(
            f"resolution: {resolution} is not a multiple of 8 (a latent pixel is 8 image pixels a side); "
            f"try {' or '.join(map(str, near))}",
            ErrorCode.INVALID_REQUEST,
            field="resolution",
        )
    if op == "optimize" and not data.get("options") and not data.get("revert"):
        raise ProtocolError(
            f"options: nothing to apply; give at least one of {', '.join(OPTIMIZE_OPTIONS)} "
            "(or revert to undo earlier ones)",
            ErrorCode.INVALID_REQUEST,
            field="options",
        )


def check_optimizable(p: Placement, component: str | None, options: dict[str, Any]) -> None:
    """INVALID_REQUEST, naming the model by its handle, for an optimize of a model that streams
    part of its weights (offload: optimisations apply to models wholly resident), or with a
    ``dtype`` on a component kept packed (fp8, scaled fp8, GGUF: a cast would break the decoding
    of its packed weights; its compute dtype is the load's)."""
    if p.streamed_bytes and component is None:  # (one component: its worker says whether it streams)
        raise ProtocolError(
            f"{p.handle or p.name} is partially resident on {p.device} (offload "
            f"{shown_offload(p.form.offload)}: {format_size(p.streamed_bytes)} streamed from RAM); "
            "optimisations apply to models wholly resident: load it with offload none (reload)",
            ErrorCode.INVALID_REQUEST,
            field="offload",
            model_id=p.model_id,
            handle=p.handle or p.name,
        )
    packed = {c: f for c, f in p.packed.items() if component in (None, c)}
    if "dtype" in options and packed:
        which = ", ".join(f"{c} ({f})" for c, f in sorted(packed.items()))
        raise ProtocolError(
            f"options.dtype: {p.handle or p.name} is stored packed ({which}) on {p.device}: a cast "
            "would break its decoding; load it with --dtype instead (unload it first, or load with reload)",
            ErrorCode.INVALID_REQUEST,
            field="options.dtype",
            model_id=p.model_id,
            handle=p.handle or p.name,
        )


def _request(model: type[BaseModel], data: dict[str, Any]) -> BaseModel:
    try:
        return model.model_validate(data)
    except ValidationError as exc:
        first = exc.errors()[0]
        field = ".".join(str(x) for x in first["loc"])
        message = str(first["msg"]).removeprefix("Value error, ")
        raise ProtocolError(f"{field}: {message}", ErrorCode.INVALID_REQUEST, field=field) from None


async def _refresh_bytes(slot: WorkerSlot, p: Placement) -> None:
    """Set ``p.bytes`` (and its streamed bytes) from what the worker holds now."""
    info = await slot.call(CommandType.GET_MODEL_INFO, ModelInfoRequest(), ModelInfoResult, timeout=30)
    held = {m.name: m for m in info.models}
    mine = [held[n] for n in p.components.values() if n in held]
    p.bytes = sum(held_bytes(m) for m in mine)
    for label, name in p.components.items():
        m = held.get(name)
        if m is not None:  # an optimisation takes a shared part out of sharing (its own copy)
            p.component_bytes[label] = held_bytes(m)
            if m.share is None:
                p.shares.pop(label, None)
    p.streamed_bytes = sum(m.streamed_bytes or 0 for m in mine)
    slot.memory = info.memory
