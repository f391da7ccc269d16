"""Python client of the REST API, sync (:class:`Client`) and async (:class:`AsyncClient`), on httpx.

Every endpoint is one method, written once in :class:`_Endpoints`; the two clients differ only in
how a request is sent. An error answer raises :class:`ApiError` carrying the HTTP status and the
protocol error code::

    from modelkeeper.client import Client

    with Client("http://127.0.0.1:8765") as mk:
        model = mk.list_models(type="main")["items"][0]
        mk.load(model["id"])                       # waits; mk.load(id, wait=False)["job"] for a job
        print(mk.status()["devices"][0]["models"])
"""

from __future__ import annotations

import json
import os
import time
from collections.abc import AsyncIterator, Awaitable, Iterator
from typing import Any, Generic, TypeVar
from urllib.parse import quote

import httpx

from modelkeeper.protocol.errors import ErrorCode, ProtocolError

__all__ = ["DEFAULT_URL", "ApiError", "AsyncClient", "Client"]

DEFAULT_URL = "http://127.0.0.1:8765"
R = TypeVar("R")
FINISHED = ("succeeded", "failed", "cancelled")


#: The protocol code behind each HTTP-layer code the service answers with (``api/errors.py``).
PROTOCOL_CODE_OF = {
    "NOT_FOUND": ErrorCode.INVALID_REQUEST,  # no device, job or lease of that id; no such route
    "FORBIDDEN": ErrorCode.INVALID_REQUEST,  # a path outside the model roots
    "NOT_READY": ErrorCode.BUSY,  # the service is starting or stopping
    "MISSING_PART": ErrorCode.INVALID_REQUEST,  # no text encoder or VAE fits a transformer-only model
    "INCOMPATIBLE_PART": ErrorCode.INVALID_REQUEST,  # a part pinned for it does not fit
}


class ApiError(ProtocolError):
    """An error answer: ``status_code`` (HTTP), ``code`` (protocol), ``error_code`` (as sent)."""

    def __init__(self, status_code: int, error_code: str, message: str, details: dict[str, Any]) -> None:
        if error_code in ErrorCode.__members__:
            code = ErrorCode(error_code)
        else:
            code = PROTOCOL_CODE_OF.get(error_code, ErrorCode.INTERNAL)
        super().__init__(message, code, **details)
        self.status_code = status_code
        self.error_code = error_code

    def __str__(self) -> str:
        return f"HTTP {self.status_code} [{self.error_code}] {self.message}"


def _raise_for(response: httpx.Response) -> Any:
    if response.status_code < 400:
        if response.headers.get("content-type", "").startswith("application/json"):
            return response.json()
        return response.text
    try:
        body = response.json()
        raise ApiError(
            response.status_code,
            str(body.get("error_code", "INTERNAL")),
            str(body.get("error")),
            body.get("details") or {},
        )
    except (ValueError, AttributeError):
        raise ApiError(
            response.status_code, f"HTTP_{response.status_code}", response.text[:500], {}
        ) from None


def _headers(token: str | None) -> dict[str, str]:
    token = token or os.environ.get("MODELKEEPER_TOKEN")
    return {"Authorization": f"Bearer {token}"} if token else {}


class _SseParser:
    """Server-Sent Events, line by line: an event ends at an empty line; its data is JSON."""

    def __init__(self) -> None:
        self.lines: list[str] = []

    def feed(self, line: str) -> dict[str, Any] | None:
        if line:
            self.lines.append(line)
            return None
        data = "\n".join(x[5:].lstrip() for x in self.lines if x.startswith("data:"))
        self.lines = []
        if not data:
            return None
        value = json.loads(data)
        return value if isinstance(value, dict) else {"data": value}


def _ref(model_id: str) -> str:
    """A model reference in a URL path: ids, names and paths (slashes kept) all work."""
    return quote(model_id, safe="/")


def _body(**values: Any) -> dict[str, Any]:
    return {k: v for k, v in values.items() if v is not None}


class _Endpoints(Generic[R]):
    """One method per endpoint; ``_send`` is the client's."""

    def _send(
        self, method: str, path: str, *, json: Any = None, params: dict[str, Any] | None = None
    ) -> R:  # pragma: no cover - implemented by both clients
        raise NotImplementedError

    # ---------------------------------------------------------------- models
    def list_models(self, **filters: Any) -> R:
        """``type``, ``base``, ``format``, ``tag``, ``query``, ``status``, ``sort``, ``descending``, ``limit``, ``offset``."""
        return self._send("GET", "/api/model", params=_body(**filters))

    def model(self, model_id: str) -> R:
        return self._send("GET", f"/api/model/{_ref(model_id)}")

    def search(self, **filters: Any) -> R:
        return self._send("POST", "/api/model/search", json=_body(**filters))

    def available(self, type: str | None = None) -> R:
        return self._send("GET", "/api/model/available" + (f"/{type}" if type else ""))

    def components(self, type: str | None = None) -> R:
        return self._send("GET", "/api/model/components" + (f"/{type}" if type else ""))

    def route(self, model_id: str, *, load: bool = False) -> R:
        """Which node and device serve the model now; ``load``: load it first when loaded nowhere."""
        return self._send(
            "GET", f"/api/model/{_ref(model_id)}/route", params={"load": "true"} if load else None
        )

    def install(
        self,
        source: str,
        *,
        model_type: str | None = None,
        name: str | None = None,
        sha256: str | None = None,
        wait: bool = True,
    ) -> R:
        """Fetch a model (Hub ``org/name[@rev][:path]``, an https URL, ``civitai:ID``) into the first
        model root and register it: a job (``wait=False``: the job at once; follow its events)."""
        body = _body(source=source, model_type=model_type, name=name, sha256=sha256, wait_for_completion=wait)
        return self._send("POST", "/api/model/install", json=body)

    def metadata(self, model_id: str) -> R:
        return self._send("GET", f"/api/model/{_ref(model_id)}/metadata")

    def set_metadata(self, model_id: str, **values: Any) -> R:
        return self._send("PUT", f"/api/model/{_ref(model_id)}/metadata", json=values)

    # ---------------------------------------------------------------- status
    def status(self, device: str | None = None) -> R:
        return self._send("GET", "/api/model/status" + (f"/{device}" if device else ""))

    def reconcile(self, device: str) -> R:
        return self._send("POST", f"/api/model/status/{device}/reconcile")

    # ---------------------------------------------------------------- loading
    def load(
        self,
        model_id: str,
        device: str | None = None,
        *,
        wait: bool = True,
        priority: str | None = None,
        timeout: float | None = None,
        force: bool | None = None,
        keep_loaded: bool | None = None,
        keep_alive: float | None = None,
        dtype: str | None = None,
        storage_dtype: str | None = None,
        offload: str | int | None = None,
        reload: bool | None = None,
    ) -> R:
        """Load where placement puts it, or on ``device``; ``keep_alive``: seconds it stays after its
        last use (0 as soon as nothing holds it, -1 never; default: the service's setting); ``dtype``:
        the compute dtype; ``storage_dtype``: kept on the device in fp8 (float8_e4m3fn, float8_e5m2);
        ``offload``: "auto" or a byte count kept resident, the rest streamed from RAM as it runs.
        Loaded already in another dtype, storage dtype or offload: ApiError 409 ALREADY_LOADED, or
        with ``reload`` it is unloaded and loaded again as asked."""
        body = _body(device_id=device, wait_for_completion=wait, priority=priority, timeout_seconds=timeout,
                     force=force, keep_loaded=keep_loaded, keep_alive=keep_alive, dtype=dtype,
                     storage_dtype=storage_dtype, offload=offload, reload=reload)  # fmt: skip
        return self._send("POST", f"/api/model/{_ref(model_id)}/load", json=body)

    def load_everywhere(self, model_id: str, *, wait: bool = True, timeout: float | None = None) -> R:
        body = _body(model_id=model_id, wait_for_completion=wait, timeout_seconds=timeout)
        return self._send("POST", "/api/model/load", json=body)

    def load_on(self, device: str, model_id: str, *, wait: bool = True, priority: str | None = None) -> R:
        body = _body(model_id=model_id, wait_for_completion=wait, priority=priority)
        return self._send("POST", f"/api/model/load/{device}", json=body)

    def vram_load(self, model_id: str, device: str | None = None, *, wait: bool = True) -> R:
        path = "/api/model/vram/load" + (f"/{device}" if device else "")
        return self._send("POST", path, json=_body(model_id=model_id, wait_for_completion=wait))

    def unload(self, model_id: str, device: str | None = None, *, force: bool | None = None) -> R:
        return self._send(
            "POST", f"/api/model/{_ref(model_id)}/unload", json=_body(device_id=device, force=force)
        )

    def unload_model(self, model_id: str, device: str | None = None, *, force: bool | None = None) -> R:
        """The seed's form: ``POST /api/model/unload`` with the model in the body."""
        return self._send(
            "POST", "/api/model/unload", json=_body(model_id=model_id, device_id=device, force=force)
        )

    def unload_all(self, device: str | None = None, *, force: bool = False) -> R:
        path = "/api/model/unload" + (f"/{device}" if device else "")
        return self._send("DELETE", path, params={"force": force})

    def vram_unload(
        self, device: str | None = None, *, model_id: str | None = None, force: bool = False
    ) -> R:
        path = "/api/model/vram/unload" + (f"/{device}" if device else "")
        return self._send("DELETE", path, params=_body(model_id=model_id, force=force))

    # ---------------------------------------------------------------- validate, benchmark, optimize
    def validate(self, model_id: str | None = None, *, wait: bool = True, **options: Any) -> R:
        """``level`` (header|weights|functional), ``batch``, ``device_id``, ``component``. The job's
        ``result`` (as for ``benchmark`` and ``optimize``) is a list with one entry per placement."""
        path = f"/api/model/{_ref(model_id)}/validate" if model_id else "/api/model/validate"
        return self._send("POST", path, json=_body(wait_for_completion=wait, **options))

    def benchmark(self, model_id: str | None = None, *, wait: bool = True, **options: Any) -> R:
        """``steps``, ``warmup``, ``batch``, ``resolution``, ``tokens``, ``device_id``, ``component``."""
        path = f"/api/model/{_ref(model_id)}/benchmark" if model_id else "/api/model/benchmark"
        return self._send("POST", path, json=_body(wait_for_completion=wait, **options))

    def optimize(self, model_id: str | None = None, *, wait: bool = True, **options: Any) -> R:
        """``options`` (dtype, channels_last, attention...), ``measure``, ``revert``, ``device_id``."""
        path = f"/api/model/{_ref(model_id)}/optimize" if model_id else "/api/model/optimize"
        return self._send("POST", path, json=_body(wait_for_completion=wait, **options))

    def optimize_memory(
        self, device: str, *, target_free_mb: float | None = None, timeout: float | None = None
    ) -> R:
        """Free ``device``'s cached memory; with ``target_free_mb``, unload idle models until that
        much of its budget is free (never leased, kept or busy ones)."""
        body = _body(device_id=device, target_free_mb=target_free_mb, timeout_seconds=timeout)
        return self._send("POST", "/api/model/memory/optimize", json=body)

    # ---------------------------------------------------------------- LoRA on loaded models
    def apply_lora(
        self, model_id: str, lora_id: str, *, strength: float = 1.0, device: str | None = None
    ) -> R:
        body = _body(lora_id=lora_id, strength=strength, device_id=device)
        return self._send("POST", f"/api/model/{_ref(model_id)}/lora", json=body)

    def lora_strength(self, model_id: str, lora_id: str, strength: float, *, device: str | None = None) -> R:
        body = _body(strength=strength, device_id=device)
        return self._send("PUT", f"/api/model/{_ref(model_id)}/lora/{_ref(lora_id)}", json=body)

    def remove_lora(self, model_id: str, lora_id: str, *, device: str | None = None) -> R:
        path = f"/api/model/{_ref(model_id)}/lora/{_ref(lora_id)}"
        return self._send("DELETE", path, params=_body(device_id=device))

    # ---------------------------------------------------------------- cache
    def cache(self) -> R:
        return self._send("GET", "/api/model/cache")

    def cache_model(self, model_id: str, *, wait: bool = True) -> R:
        return self._send(
            "POST", "/api/model/cache", json={"model_id": model_id, "wait_for_completion": wait}
        )

    def cache_component(self, component_id: str, *, wait: bool = True) -> R:
        body = {"component_id": component_id, "wait_for_completion": wait}
        return self._send("POST", "/api/model/cache", json=body)

    def cache_segment(self, component_id: str) -> R:
        return self._send("GET", f"/api/model/cache/{component_id}")

    def cache_drop(self, component_id: str, *, force: bool = False) -> R:
        return self._send("DELETE", f"/api/model/cache/{component_id}", params={"force": force})

    def cache_clear(self, *, force: bool = False) -> R:
        return self._send("DELETE", "/api/model/cache", params={"force": force})

    def refresh(self, *, wait: bool = False, hash: bool = True) -> R:
        """Rescan the model roots (``POST /api/model/cache/refresh``)."""
        return self._send(
            "POST", "/api/model/cache/refresh", params={"wait_for_completion": wait, "hash": hash}
        )

    # ---------------------------------------------------------------- jobs and leases
    def jobs(self, **filters: Any) -> R:
        return self._send("GET", "/api/jobs", params=_body(**filters))

    def job(self, job_id: str) -> R:
        return self._send("GET", f"/api/jobs/{job_id}")

    def cancel_job(self, job_id: str) -> R:
        return self._send("DELETE", f"/api/jobs/{job_id}")

    def leases(self, model_id: str | None = None) -> R:
        return self._send("GET", "/api/leases", params=_body(model_id=model_id))

    def lease(
        self, model_id: str, *, device: str | None = None, holder: str | None = None, ttl: float | None = None
    ) -> R:
        body = _body(model_id=model_id, device_id=device, holder=holder, ttl_seconds=ttl)
        return self._send("POST", "/api/leases", json=body)

    def get_lease(self, lease_id: str) -> R:
        return self._send("GET", f"/api/leases/{lease_id}")

    def renew_lease(self, lease_id: str, ttl: float | None = None) -> R:
        return self._send("POST", f"/api/leases/{lease_id}/renew", json=_body(ttl_seconds=ttl))

    def release_lease(self, lease_id: str) -> R:
        return self._send("DELETE", f"/api/leases/{lease_id}")

    # ---------------------------------------------------------------- health
    def live(self) -> R:
        return self._send("GET", "/health/live")

    def ready(self) -> R:
        return self._send("GET", "/health/ready")

    def metrics(self) -> R:
        return self._send("GET", "/metrics")

    def openapi(self) -> R:
        return self._send("GET", "/openapi.json")


class Client(_Endpoints[Any]):
    """Synchronous client; a context manager."""

    def __init__(
        self, url: str | None = None, *, token: str | None = None, timeout: float = 660.0, **kwargs: Any
    ) -> None:
        url = url or os.environ.get("MODELKEEPER_URL", DEFAULT_URL)
        self.http = httpx.Client(base_url=url, headers=_headers(token), timeout=timeout, **kwargs)

    def _send(self, method: str, path: str, *, json: Any = None, params: dict[str, Any] | None = None) -> Any:
        return _raise_for(self.http.request(method, path, json=json, params=params))

    def wait_job(self, job_id: str, timeout: float = 600.0, poll: float = 0.05) -> dict[str, Any]:
        """The job once finished (polled)."""
        end = time.monotonic() + timeout
        while True:
            job: dict[str, Any] = self.job(job_id)
            if job["state"] in FINISHED or time.monotonic() > end:
                return job
            time.sleep(poll)

    def job_events(self, job_id: str) -> Iterator[dict[str, Any]]:
        """The job's state, then its events until it finishes (Server-Sent Events)."""
        yield from self._stream(f"/api/jobs/{job_id}/events")

    def events(self, type: str | None = None) -> Iterator[dict[str, Any]]:
        yield from self._stream("/api/events", params=_body(type=type))

    def _stream(self, path: str, params: dict[str, Any] | None = None) -> Iterator[dict[str, Any]]:
        with self.http.stream("GET", path, params=params, timeout=None) as response:
            if response.status_code >= 400:
                response.read()
                _raise_for(response)
            parser = _SseParser()
            for line in response.iter_lines():
                if (event := parser.feed(line)) is not None:
                    yield event

    def close(self) -> None:
        self.http.close()

    def __enter__(self) -> Client:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


class AsyncClient(_Endpoints[Awaitable[Any]]):
    """Asynchronous client; an async context manager."""

    def __init__(
        self, url: str | None = None, *, token: str | None = None, timeout: float = 660.0, **kwargs: Any
    ) -> None:
        url = url or os.environ.get("MODELKEEPER_URL", DEFAULT_URL)
        self.http = httpx.AsyncClient(base_url=url, headers=_headers(token), timeout=timeout, **kwargs)

    async def _request(self, method: str, path: str, json: Any, params: dict[str, Any] | None) -> Any:
        return _raise_for(await self.http.request(method, path, json=json, params=params))

    def _send(
        self, method: str, path: str, *, json: Any = None, params: dict[str, Any] | None = None
    ) -> Awaitable[Any]:
        return self._request(method, path, json, params)

    async def job_events(self, job_id: str) -> AsyncIterator[dict[str, Any]]:
        """The job's state, then its events until it finishes (Server-Sent Events)."""
        async for event in self._stream(f"/api/jobs/{job_id}/events"):
            yield event

    async def events(self, type: str | None = None) -> AsyncIterator[dict[str, Any]]:
        """Every event of the service from now on; ``type`` filters by prefix (``model.``)."""
        async for event in self._stream("/api/events", _body(type=type)):
            yield event

    async def _stream(self, path: str, params: dict[str, Any] | None = None) -> AsyncIterator[dict[str, Any]]:
        async with self.http.stream("GET", path, params=params, timeout=None) as response:
            if response.status_code >= 400:
                await response.aread()
                _raise_for(response)
            parser = _SseParser()
            async for line in response.aiter_lines():
                if (event := parser.feed(line)) is not None:
                    yield event

    async def aclose(self) -> None:
        await self.http.aclose()

    async def __aenter__(self) -> AsyncClient:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.aclose()
