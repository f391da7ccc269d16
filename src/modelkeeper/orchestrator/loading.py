"""From a registry model to worker load requests, through the RAM cache where it can.

``component_requests`` turns the registry's worker spec into one load request per loadable
component; ``as_part`` makes a text encoder's or VAE's request one more component of a
transformer-only model that it completes. ``through_cache`` fills (or hits) the RAM-cache segment of a component and rewrites its
request to load from the segment: a safetensors single file (a checkpoint's component is repacked
under its own header), a diffusers component folder with one weight file, or a pickle file
(converted once in the sandbox). Sharded folders and tokenizers load from disk as they are.

A content id names tensor data, not key names: the segment of a VAE may have been filled from a
checkpoint (prefixed original keys) and serve a diffusers folder's VAE. Such a hit loads with the
key layout detected by the worker; the config is always the requesting model's.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from modelkeeper.cache import RamCache, Segment
from modelkeeper.cache.segment import Progress
from modelkeeper.formats.conventions import CONFIG_METADATA_KEY, SAFETENSORS_SUFFIXES
from modelkeeper.formats.errors import FormatError
from modelkeeper.formats.folders import find_weight_files
from modelkeeper.formats.gguf_header import read_gguf_header
from modelkeeper.formats.pickle_sandbox import PICKLE_SUFFIXES
from modelkeeper.formats.safetensors_header import read_header
from modelkeeper.protocol.errors import ErrorCode, ProtocolError
from modelkeeper.protocol.messages import KeyLayout, LoadRequest, ModelKind
from modelkeeper.registry.records import ModelRecord


@dataclass
class ComponentLoad:
    """One component to load: its registry spec and the request a worker gets."""

    component: str  # slot name: unet, vae, text_encoder_2, ... ("" for a one-component model)
    spec: dict[str, Any]
    request: LoadRequest
    bytes: int
    segment: Segment | None = None

    @property
    def source(self) -> str:
        return "ram" if self.segment is not None else "disk"


def component_requests(record: ModelRecord, spec: dict[str, Any]) -> list[ComponentLoad]:
    """One ComponentLoad per loadable component of ``spec`` (``Registry.worker_spec``); raises
    UNSUPPORTED_FORMAT when the model cannot be loaded by a worker."""
    if record.type == "lora":
        raise ProtocolError(
            f"model {record.id} ({record.name}) is a LoRA: it is applied to a loaded model, not loaded alone",
            ErrorCode.UNSUPPORTED_FORMAT,
            model_id=record.id,
        )
    specs = spec["components"].values() if "components" in spec else [spec]
    loads: list[ComponentLoad] = []
    for s in specs:
        if not s.get("loadable") or s.get("request") is None:
            continue
        try:
            request = LoadRequest.model_validate({k: v for k, v in s["request"].items() if v is not None})
        except ValueError as exc:
            raise ProtocolError(
                f"model {record.id} ({record.name}): its worker request is not valid: {exc}",
                ErrorCode.INTERNAL,
                model_id=record.id,
            ) from None
        size = next((c.bytes for c in record.components if c.name == s["component"]), 0)
        loads.append(ComponentLoad(s["component"] or "", s, request, size))
    if not loads or not spec.get("loadable", True):
        raise ProtocolError(
            f"model {record.id} ({record.name}, {record.type}, {record.format}) has nothing a worker can load"
            + ("" if record.status == "ok" else f"; its file is {record.status}"),
            ErrorCode.UNSUPPORTED_FORMAT,
            model_id=record.id,
        )
    for load in loads:
        _apply_embedded_config(load)
    return loads


def as_part(record: ModelRecord, role: str, load: ComponentLoad) -> ComponentLoad:
    """``load`` (a standalone text encoder or VAE) as the ``role`` part of ``record``: one more
    component of its placement, named after the role. Its spec, content id and config stay the
    part's own, so the RAM cache serves one segment to every model that uses the part; its share
    token (the part's model and content id) lets a worker hold one module for every placement
    that loads the part in the same form (``worker/sharing.py``). A part that is a component of a
    folder or checkpoint not hashed yet is told apart from the file's other components by name."""
    content = load.spec.get("content_id") or f"file:{load.request.path}"
    if not load.spec.get("content_id") and (load.spec.get("subfolder") or load.spec.get("key_prefix")):
        content += f"#{load.spec.get('component')}"
    token = f"{load.spec.get('model_id') or load.request.path}:{content}"
    request = load.request.model_copy(update={"name": f"{record.id}/{role}", "share": token})
    return ComponentLoad(role, load.spec, request, load.bytes, load.segment)


def _apply_embedded_config(load: ComponentLoad) -> None:
    """A single file (safetensors or GGUF) that carries its own config (``modelkeeper.config``
    metadata, a pipeline config for a checkpoint) is loaded with it rather than with the known config of its base."""
    path = Path(load.request.path)
    gguf = path.suffix.lower() == ".gguf"
    if not (gguf or path.suffix.lower() in SAFETENSORS_SUFFIXES) or not path.is_file():
        return
    try:
        metadata = read_gguf_header(path).metadata if gguf else read_header(path).metadata
        raw = metadata.get(CONFIG_METADATA_KEY)
        config = json.loads(raw) if isinstance(raw, str) and raw else None
    except (ProtocolError, OSError, ValueError):
        return  # the worker reports a broken file with its own error
    if not isinstance(config, dict):
        return
    section = config.get(load.component)
    if isinstance(section, dict):
        load.request.config = section
    elif "_class_name" not in config or not str(config["_class_name"]).endswith("Pipeline"):
        load.request.config = config


def _folder_weight_file(folder: Path, variant: str | None) -> Path | None:
    """The one safetensors weight file of a component folder, as a worker resolves it (None when
    sharded, absent or unreadable: such a folder loads from disk as it is)."""
    try:
        files = find_weight_files(folder, variant)
    except FormatError:
        return None
    return files[0] if len(files) == 1 else None


@dataclass
class CachePlan:
    """What the segment of one component is filled from: a weights file, which of its tensors
    (a checkpoint's component), its content id when known, and the config the request keeps."""

    source: Path
    component_id: str | None
    names: list[str] | None
    config: Any


def cache_plan(load: ComponentLoad) -> CachePlan | None:
    """How ``load``'s component would be cached; None when it cannot be (see the module docstring).
    Reads a checkpoint's header (to pick the component's tensors): call it off the event loop."""
    req = load.request
    path = Path(req.path)
    if req.type == ModelKind.TOKENIZER:
        return None
    cid = load.spec.get("content_id")
    if path.is_dir():
        folder = path / req.subfolder if req.subfolder else path
        weight = _folder_weight_file(folder, req.variant)
        if weight is None:
            return None
        return CachePlan(weight, cid, None, str(folder))
    if path.suffix.lower() in SAFETENSORS_SUFFIXES:
        prefix = load.spec.get("key_prefix") or ""
        names = [n for n in read_header(path).tensors if n.startswith(prefix)] if prefix else None
        return CachePlan(path, cid, names, req.config)
    if path.suffix.lower() in PICKLE_SUFFIXES or path.suffix.lower() == ".gguf":
        # a pickle is converted on fill; a GGUF file is repacked (its blocks as uint8 tensors, their
        # quant types and the file's string metadata, its config included, in the segment's header)
        return CachePlan(path, cid, None, req.config)
    return None


def lookup(cache: RamCache, record: ModelRecord, plan: CachePlan) -> Segment | None:
    """The segment of ``plan`` when it is cached (a hit), else None; fills nothing."""
    return cache.lookup(plan.source, component_id=plan.component_id, tensors=plan.names, model=record.id)


def fill(cache: RamCache, record: ModelRecord, plan: CachePlan, progress: Progress | None = None) -> Segment:
    """The segment of ``plan``, filled on a miss (CacheFull when it cannot fit)."""
    return cache.cache_file(
        plan.source, component_id=plan.component_id, tensors=plan.names, model=record.id, progress=progress
    )


def from_segment(load: ComponentLoad, plan: CachePlan, seg: Segment) -> ComponentLoad:
    """``load`` pointed at its component's segment."""
    new = load.request.model_copy(update={"path": str(seg.path), "subfolder": None, "variant": None})
    if seg.source != str(plan.source):
        # The same tensors (one content id) were cached from another file, perhaps under another
        # key layout (a checkpoint's prefixed names, a folder's diffusers names): the worker detects it.
        new.layout = KeyLayout.AUTO
    if plan.config is not None:
        new.config = plan.config
    return ComponentLoad(load.component, load.spec, new, load.bytes, seg)


def through_cache(
    cache: RamCache, record: ModelRecord, load: ComponentLoad, progress: Progress | None = None
) -> ComponentLoad:
    """Fill or hit the component's segment and point the request at it; unchanged when the
    component cannot be cached (see the module docstring). Raises CacheFull when it does not fit."""
    plan = cache_plan(load)
    if plan is None:
        return load
    return from_segment(load, plan, fill(cache, record, plan, progress))
