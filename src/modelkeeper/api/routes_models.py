"""``/api/model``: the seed controller's endpoints, made real.

Static paths come before ``/{model_id}`` so that ``status``, ``available``, ``cache``... are
never taken for model ids. A model id may also be a name or a hash prefix. Every route declares
its answer (:mod:`modelkeeper.api.responses` and its ``responses_*`` siblings); a job route also
its 202.
"""

from __future__ import annotations

from typing import Any

from fastapi import APIRouter, Body, Query, Request
from fastapi.responses import JSONResponse, Response
from starlette.exceptions import HTTPException
from starlette.routing import Match

from modelkeeper.api.deps import Service
from modelkeeper.api.responses import ACCEPTED, ERRORS
from modelkeeper.api.responses_catalog import (
    ClusterModelDetail,
    ComponentEntry,
    ListedModel,
    ModelDetail,
    ModelMetadata,
    ModelPage,
)
from modelkeeper.api.responses_placements import (
    DeviceStatus,
    LoadAnyDone,
    LoadDone,
    LoraApplied,
    LoraChanged,
    OperationDone,
    Reconciled,
    UnloadAllAnswer,
    UnloadAnswer,
)
from modelkeeper.api.responses_service import ServiceStatus
from modelkeeper.api.schemas import (
    BenchmarkBody,
    LoadBody,
    LoraBody,
    OptimizeBody,
    SearchBody,
    StrengthBody,
    UnloadBody,
    ValidateBody,
)
from modelkeeper.orchestrator import LoadOptions, Orchestrator
from modelkeeper.protocol.errors import ErrorCode, ProtocolError
from modelkeeper.protocol.messages import DType

router = APIRouter(prefix="/api/model", tags=["models"], responses=ERRORS)


def _answer(result: dict[str, Any]) -> dict[str, Any] | JSONResponse:
    """A job started without waiting is 202 Accepted."""
    if "result" not in result and "job" in result:
        return JSONResponse(result, status_code=202)
    return result


def _need_model(body: LoadBody | UnloadBody) -> str:
    if not body.model_id:
        raise ProtocolError("model_id: required", ErrorCode.INVALID_REQUEST, field="model_id")
    return body.model_id


def _options(body: LoadBody, require_cache: bool = False) -> LoadOptions:
    return LoadOptions(
        priority=body.priority_value,
        timeout=body.timeout_seconds,
        force=body.force,
        keep_loaded=body.keep_loaded,
        require_cache=require_cache,
        keep_alive=body.keep_alive,
        dtype=DType(body.dtype) if body.dtype else None,
        storage_dtype=DType(body.storage_dtype) if body.storage_dtype else None,
        offload=body.offload,
        reload=body.reload,
    )


async def _operate(
    service: Orchestrator, op: str, model_id: str | None, body: ValidateBody | BenchmarkBody | OptimizeBody
) -> Any:
    """validate / benchmark / optimize one model (``model_id``) or every loaded model (None)."""
    return _answer(
        await service.operations.run(
            op, model_id, body.device_id, body.worker_data(), component=body.component,
            wait=body.wait_for_completion, timeout=body.timeout_seconds, priority=body.priority_value,
        )
    )  # fmt: skip


async def _load(
    service: Orchestrator,
    ref: str,
    device: str | None,
    body: LoadBody,
    *,
    everywhere: bool = False,
    require_cache: bool = False,
) -> Any:
    options = _options(body, require_cache=require_cache)
    return _answer(
        await service.loads.load(ref, device, all_devices=everywhere, options=options, wait=body.wait_for_completion)
    )  # fmt: skip


# ---------------------------------------------------------------------- listing and status


@router.get("", response_model=ModelPage)
async def list_models(
    service: Service,
    type: str | None = Query(None, max_length=64),
    base: str | None = Query(None, max_length=64),
    format: str | None = Query(None, max_length=64),
    tag: str | None = Query(None, max_length=200),
    query: str | None = Query(None, max_length=1000),
    status: str = Query("ok", pattern="^(ok|missing|all)$"),
    sort: str = Query("name", pattern="^(name|type|base|size|created|updated)$"),
    descending: bool = False,
    limit: int = Query(50, ge=1, le=1000),
    offset: int = Query(0, ge=0, le=1_000_000_000),
) -> dict[str, Any]:
    """Registered models, filtered and paginated, each with the devices it is loaded on."""
    return await service.views.list_models(
        type=type, base=base, format=format, tag=tag, query=query, status=None if status == "all" else status,
        sort=sort, descending=descending, limit=limit, offset=offset,
    )  # fmt: skip


@router.get("/status", response_model=ServiceStatus)  # documented; its cached bytes go out unvalidated
async def status(service: Service) -> Response:
    """Every device: its worker, memory and loaded models; the cache; jobs. From memory, no worker
    call; memory figures are at most a quarter second old, everything else as of the last change."""
    return Response(service.views.status_json(), media_type="application/json")


@router.get("/status/{device}", response_model=DeviceStatus)
async def device_status(service: Service, device: str) -> dict[str, Any]:
    """One device as ``GET /api/model/status`` shows it: its worker (state, pid, restarts, last
    error, queue), memory and the models placed on it; ``node/device`` in cluster mode. 404
    NOT_FOUND for an unknown device."""
    return service.views.device(device)


@router.post("/status/{device}/reconcile", response_model=Reconciled)
async def reconcile(service: Service, device: str) -> dict[str, Any]:
    """Compare the view of ``device`` with its worker's full state and correct it."""
    return await service.recovery.reconcile(device)


@router.get("/available", response_model=list[ListedModel])
async def available(service: Service) -> list[dict[str, Any]]:
    """Every model present (a file under a model root) whose type is known, in one list (at most
    10,000), each with the devices holding it (``loaded_on``). Filters and pages: ``GET /api/model``."""
    return await service.views.available()


@router.get("/available/{type}", response_model=list[ListedModel])
async def available_of_type(service: Service, type: str) -> list[dict[str, Any]]:
    """As ``GET /api/model/available``, of one type (``main``, ``unet``, ``transformer``, ``vae``,
    ``text_encoder``, ``lora``, ``controlnet``, ``textual_inversion``; aliases such as ``checkpoint``
    and plurals accepted). An unknown type is 422, naming the valid ones."""
    return await service.views.available(type)


@router.get("/components", response_model=list[ComponentEntry])
async def components(service: Service) -> list[dict[str, Any]]:
    """Components across every model (a VAE inside three checkpoints is one entry once hashed)."""
    return await service.views.components()


@router.get("/components/{type}", response_model=list[ComponentEntry])
async def components_of_type(service: Service, type: str) -> list[dict[str, Any]]:
    """As ``GET /api/model/components``, of one kind, named exactly (``unet``, ``transformer``,
    ``vae``, ``text_encoder``, ``controlnet``); another word lists nothing."""
    return await service.views.components(type)


@router.post("/search", response_model=ModelPage)
async def search(service: Service, body: SearchBody) -> dict[str, Any]:
    """``GET /api/model`` with its filters as a JSON body: the same fields, defaults and answer."""
    return await service.views.list_models(**body.filters())


# ---------------------------------------------------------------------- loading on devices


@router.post("/load", response_model=LoadAnyDone, responses=ACCEPTED)
async def load_all_devices(service: Service, body: LoadBody) -> Any:
    """Load ``model_id`` on every device (``device_id`` given: that one only); placement chooses
    no device here: ``POST /api/model/{model_id}/load`` is the call that lets it."""
    return await _load(service, _need_model(body), body.device_id, body, everywhere=body.device_id is None)


@router.post("/load/{device}", response_model=LoadDone, responses=ACCEPTED)
async def load_on_device(service: Service, device: str, body: LoadBody) -> Any:
    """Load ``model_id`` on the device in the path (the body's ``device_id`` is not used); options,
    answers and errors as for ``POST /api/model/{model_id}/load``."""
    return await _load(service, _need_model(body), device, body)


@router.post("/unload", response_model=UnloadAnswer)
async def unload(service: Service, body: UnloadBody) -> dict[str, Any]:
    """``POST /api/model/{model_id}/unload`` with the model in the body (``model_id``, required)."""
    return await service.loads.unload(
        _need_model(body), body.device_id, force=body.force, timeout=body.timeout_seconds
    )


@router.delete("/unload", response_model=UnloadAllAnswer)
async def unload_everything(service: Service, force: bool = False) -> dict[str, Any]:
    """Unload every model from every device (leased ones are refused unless ``force``)."""
    return await service.loads.unload_all(force=force)


@router.delete("/unload/{device}", response_model=UnloadAllAnswer)
async def unload_device(service: Service, device: str, force: bool = False) -> dict[str, Any]:
    """Unload every model from one device; leased ones and ones still loading are refused (listed
    under ``refused``) unless ``force``. 404 NOT_FOUND for an unknown device."""
    return await service.loads.unload_all(device, force=force)


@router.post("/vram/load", response_model=LoadDone, responses=ACCEPTED)
async def vram_load(service: Service, body: LoadBody) -> Any:
    """Load through the RAM cache (the segment is filled first when missing): the fast path."""
    return await _load(service, _need_model(body), body.device_id, body, require_cache=True)


@router.post("/vram/load/{device}", response_model=LoadDone, responses=ACCEPTED)
async def vram_load_device(service: Service, device: str, body: LoadBody) -> Any:
    """As ``POST /api/model/vram/load``, on the device in the path (the body's ``device_id`` is not
    used): through the RAM cache, the segment filled first when missing."""
    return await _load(service, _need_model(body), device, body, require_cache=True)


@router.delete("/vram/unload", response_model=UnloadAnswer | UnloadAllAnswer)
async def vram_unload(service: Service, model_id: str | None = None, force: bool = False) -> dict[str, Any]:
    """Free VRAM: one model (``model_id``) or every model, on every device."""
    if model_id:
        return await service.loads.unload(model_id, force=force)
    return await service.loads.unload_all(force=force)


@router.delete("/vram/unload/{device}", response_model=UnloadAnswer | UnloadAllAnswer)
async def vram_unload_device(
    service: Service, device: str, model_id: str | None = None, force: bool = False
) -> dict[str, Any]:
    """Free one device: unload ``model_id`` from it (leased or loading: 409 BUSY unless ``force``), or
    every model on it (leased and loading ones listed under ``refused`` unless ``force``)."""
    if model_id:
        return await service.loads.unload(model_id, device, force=force)
    return await service.loads.unload_all(device, force=force)


# ---------------------------------------------------------------------- operations on every loaded model


@router.post("/validate", response_model=OperationDone, responses=ACCEPTED)
async def validate_all(service: Service, body: ValidateBody) -> Any:
    """Validate every loaded model (on ``device_id`` only, when given) at ``level``. A job; its
    result has one entry per placement."""
    return await _operate(service, "validate", None, body)


@router.post("/benchmark", response_model=OperationDone, responses=ACCEPTED)
async def benchmark_all(service: Service, body: BenchmarkBody) -> Any:
    """Time forward passes of every loaded model (on ``device_id`` only, when given): ``steps`` after
    ``warmup``, at ``resolution``, ``batch`` and ``tokens``. A job; one entry per placement."""
    return await _operate(service, "benchmark", None, body)


@router.post("/optimize", response_model=OperationDone, responses=ACCEPTED)
async def optimize_all(service: Service, body: OptimizeBody) -> Any:
    """Apply ``options`` to every loaded model (on ``device_id`` only, when given), or with
    ``revert`` undo earlier ones; neither, or an option no worker takes: 422 before any job. A job;
    one entry per placement."""
    return await _operate(service, "optimize", None, body)


# ---------------------------------------------------------------------- one model


@router.post("/{model_id:path}/lora", response_model=LoraApplied)
async def apply_lora(service: Service, model_id: str, body: LoraBody) -> dict[str, Any]:
    """Patch a loaded model with a registered LoRA (every device holding it, or ``device_id``)."""
    return await service.loras.apply(
        model_id, body.lora_id, device=body.device_id, strength=body.strength,
        timeout=body.timeout_seconds, priority=body.priority_value,
    )  # fmt: skip


@router.put("/{model_id:path}/lora/{lora_id:path}", response_model=LoraChanged)
async def lora_strength(service: Service, model_id: str, lora_id: str, body: StrengthBody) -> dict[str, Any]:
    """Change an applied LoRA's strength (no reload)."""
    return await service.loras.strength(model_id, lora_id, body.strength, body.device_id)


@router.delete("/{model_id:path}/lora/{lora_id:path}", response_model=LoraChanged)
async def remove_lora(
    service: Service, model_id: str, lora_id: str, device_id: str | None = None
) -> dict[str, Any]:
    """Take an applied LoRA off (the weights are restored exactly)."""
    return await service.loras.remove(model_id, lora_id, device_id)


@router.get("/{model_id:path}/metadata", response_model=ModelMetadata)
async def get_metadata(service: Service, model_id: str) -> dict[str, Any]:
    """A model's user metadata, as ``PUT`` sets it: name, description, tags, trigger_words,
    source_url, license, default_settings."""
    return await service.catalog.metadata(model_id)


@router.put("/{model_id:path}/metadata", response_model=ModelMetadata)
async def put_metadata(
    service: Service,
    model_id: str,
    values: dict[str, Any] = Body(
        ...,
        description="The keys to set (name, description, tags, trigger_words, source_url, license, "
        "default_settings); keys left out keep their values.",
    ),
) -> dict[str, Any]:
    """Set user metadata: name, description, tags, trigger_words, source_url, license, default_settings."""
    return await service.catalog.set_metadata(model_id, values)


@router.get("/{model_id:path}", response_model=ModelDetail | ClusterModelDetail)
async def model_detail(service: Service, model_id: str, request: Request) -> dict[str, Any]:
    """Everything known of a model: identification, components, metadata, where it is, performance."""
    refuse_action_path(request)
    return await service.views.model_detail(model_id)


def refuse_action_path(request: Request) -> None:
    """Raise 405 (``Allow``: the methods it takes) for a GET on a path that only another method
    takes (``x/load``, ``x/validate``, ``x/lora/y``, ``load``...): the ``{model_id:path}`` route
    would take it for a model named ``x/load`` and answer 404 MODEL_NOT_FOUND, where a DELETE on
    the same path answers 405. Asked of the app's router as a request of each other method would
    be (a fresh scope each). A model whose path ends so is reached by its handle or id."""
    allowed = [method for method in OTHER_METHODS if _taken(request, method)]
    if allowed:
        raise HTTPException(405, "Method Not Allowed", headers={"Allow": ", ".join(allowed)})


#: The methods an action path may take instead of GET.
OTHER_METHODS = ("DELETE", "PATCH", "POST", "PUT")


def _taken(request: Request, method: str) -> bool:
    scope = {"type": "http", "method": method, "path": request.scope["path"],
             "root_path": request.scope.get("root_path", ""), "headers": [], "query_string": b""}  # fmt: skip
    return any(route.matches(scope)[0] is Match.FULL for route in request.app.router.routes)


@router.post("/{model_id:path}/load", response_model=LoadDone, responses=ACCEPTED)
async def load_model(service: Service, model_id: str, body: LoadBody = Body(default_factory=LoadBody)) -> Any:
    """Load a model on ``device_id``, or where placement puts it: the device already holding or
    loading it, else the one with the most free budget that fits, else one where evicting models
    neither leased nor kept loaded (least recently used first) makes room; none: 507
    INSUFFICIENT_MEMORY. Loaded there already: its placement (``already_loaded``; ``keep_alive`` and
    ``keep_loaded`` updated), unless the body asks for another ``dtype``, ``storage_dtype`` or
    ``offload``: 409 ALREADY_LOADED, or with ``reload`` a fresh load. A LoRA or an embedding (422)
    and a file gone (404 FILE_NOT_FOUND) are refused before any job."""
    return await _load(service, model_id, body.device_id, body)


@router.post("/{model_id:path}/unload", response_model=UnloadAnswer)
async def unload_model(
    service: Service, model_id: str, body: UnloadBody = Body(default_factory=UnloadBody)
) -> dict[str, Any]:
    """Unload the model from ``device_id``, or from every device holding it. Leased or still loading:
    409 BUSY unless ``force``; loaded nowhere: 409 NOT_LOADED. Its RAM-cache segments stay, so the
    next load comes from RAM."""
    return await service.loads.unload(
        model_id, body.device_id, force=body.force, timeout=body.timeout_seconds
    )


@router.post("/{model_id:path}/validate", response_model=OperationDone, responses=ACCEPTED)
async def validate_model(
    service: Service, model_id: str, body: ValidateBody = Body(default_factory=ValidateBody)
) -> Any:
    """Validate the model's loaded components (``component`` for one) at ``level``. A job; one
    entry per device holding it (``device_id`` for one); 409 NOT_LOADED when loaded nowhere."""
    return await _operate(service, "validate", model_id, body)


@router.post("/{model_id:path}/benchmark", response_model=OperationDone, responses=ACCEPTED)
async def benchmark_model(
    service: Service, model_id: str, body: BenchmarkBody = Body(default_factory=BenchmarkBody)
) -> Any:
    """Time forward passes of the model's loaded components (``component`` for one): ``steps`` after
    ``warmup``, at ``resolution``, ``batch`` and ``tokens``. A job; one entry per device holding it
    (``device_id`` for one); 409 NOT_LOADED when loaded nowhere."""
    return await _operate(service, "benchmark", model_id, body)


@router.post("/{model_id:path}/optimize", response_model=OperationDone, responses=ACCEPTED)
async def optimize_model(
    service: Service, model_id: str, body: OptimizeBody = Body(default_factory=OptimizeBody)
) -> Any:
    """Apply ``options`` to the model's loaded components (``component`` for one), or with ``revert``
    undo earlier ones; neither, or an option no worker takes: 422 before any job. A job; one entry
    per device holding it (``device_id`` for one); 409 NOT_LOADED when loaded nowhere."""
    return await _operate(service, "optimize", model_id, body)
