"""Model-ID mapping: from a registry model (or one of its components) to what a worker needs.

The seed's orchestrator had model ids and its workers wanted names and paths; this is the bridge.
``worker_spec`` returns ``request``, the data of a ``model.load_*`` command (valid for the
protocol's ``LoadRequest``), and around it what the orchestrator itself uses: the base, the
model variant, where the component's tensors sit in a single file (``key_prefix``), its content id
(the RAM cache key), and where its config comes from.
"""

from __future__ import annotations

from typing import Any

from modelkeeper.discovery.records import Base, ComponentInfo, EncoderKind, ModelType, Variant
from modelkeeper.formats.known_configs import UnknownConfigError, known_components
from modelkeeper.registry.errors import ModelNotFound
from modelkeeper.registry.records import ModelRecord

#: (base, model variant) -> the shipped config set (``modelkeeper.formats.known_configs``); the
#: variant None row is the base's default.
KNOWN_CONFIGS: dict[tuple[str, str | None], str] = {
    (Base.SD1, None): "sd1",
    (Base.SD1, Variant.INPAINT): "sd1_inpaint",
    (Base.SD2, None): "sd2",
    (Base.SD2, Variant.NORMAL): "sd2_base",
    (Base.SDXL, None): "sdxl",
    (Base.SDXL_REFINER, None): "sdxl_refiner",
    (Base.SD3, None): "sd3",
    (Base.FLUX, None): "flux_dev",
    (Base.FLUX, Variant.SCHNELL): "flux_schnell",
}

#: A standalone text encoder's config: encoder -> (config set, component).
ENCODER_CONFIGS: dict[str, tuple[str, str]] = {
    EncoderKind.CLIP_L: ("sd1", "text_encoder"),
    EncoderKind.CLIP_G: ("sdxl", "text_encoder_2"),
    EncoderKind.CLIP_H: ("sd2", "text_encoder"),
    EncoderKind.T5_XXL: ("flux_dev", "text_encoder_2"),
}

#: Registry types a worker loads, -> protocol ModelKind value.
WORKER_KINDS: dict[str, str] = {
    ModelType.UNET: "unet",
    ModelType.TRANSFORMER: "transformer",
    ModelType.VAE: "vae",
    ModelType.TEXT_ENCODER: "text_encoder",
    ModelType.CONTROLNET: "controlnet",
    ModelType.LORA: "lora",
}

#: Our encoder names -> the worker's encoder hints.
ENCODER_HINTS: dict[str, str] = {"clip_l": "clip_l", "clip_g": "clip_g", "clip_h": "clip_h", "t5_xxl": "t5"}


def known_config_ref(base: str, variant: str, component: str) -> str | None:
    """``"<config set>/<component>"`` when a shipped config exists for it, else None."""
    name = KNOWN_CONFIGS.get((base, variant)) or KNOWN_CONFIGS.get((base, None))
    if name is None:
        return None
    try:
        return f"{name}/{component}" if component in known_components(name) else None
    except UnknownConfigError:
        return None


def _config_for(record: ModelRecord, comp: ComponentInfo) -> str | None:
    if comp.subfolder is not None or record.format == "diffusers":
        return None  # the folder's own config.json
    if comp.kind is ModelType.TEXT_ENCODER:
        if record.type == ModelType.MAIN:
            known = known_config_ref(record.base, record.variant, comp.name)
            if known is not None or comp.encoder is None:
                return known
            # ComfyUI's all-in-one Flux files keep T5 at ``text_encoders.t5xxl`` (``text_encoder_3``,
            # as in SD3): the encoder's own config then, fitted to the file's shapes by the worker
        if comp.encoder is not None:
            name, part = ENCODER_CONFIGS[comp.encoder]
            return f"{name}/{part}"
        return None
    slot = comp.kind.value if comp.kind in (ModelType.UNET, ModelType.TRANSFORMER, ModelType.VAE) else None
    return known_config_ref(record.base, record.variant, slot) if slot else None


def _component_spec(record: ModelRecord, comp: ComponentInfo, single: bool) -> dict[str, Any]:
    path = record.path or ""
    kind = WORKER_KINDS.get(comp.kind)
    config = _config_for(record, comp)
    request: dict[str, Any] | None = None
    if kind is not None:
        request = {
            "name": record.id if single else f"{record.id}/{comp.name}",
            "path": path,
            "type": kind,
            "subfolder": comp.subfolder,
            "variant": record.identification.weight_variant,
            "layout": comp.layout.value if comp.layout.value in ("diffusers", "original") else "auto",
            "config": config,
            "encoder": ENCODER_HINTS.get(comp.encoder.value) if comp.encoder else None,
            "estimated_size_mb": round(comp.bytes / 2**20, 3),
        }
    return {
        "model_id": record.id,
        "component": comp.name,
        "type": comp.kind.value,
        "base": record.base,
        "model_variant": record.variant,
        "format": record.format,
        "path": path,
        "subfolder": comp.subfolder,
        "layout": comp.layout.value,
        "key_prefix": comp.prefix,
        "config_source": f"known:{config}"
        if config
        else ("folder" if comp.subfolder or record.format == "diffusers" else None),
        "content_id": comp.content_id,
        "loadable": request is not None and record.identification.loadable and record.status == "ok",
        "request": request,
    }


def worker_spec(record: ModelRecord, component: str | None = None) -> dict[str, Any]:
    """The spec of one component (by name), of a one-component model, or of a main model with one
    spec per component under ``components``. Raises ModelNotFound for an unknown component."""
    ident = record.identification
    if component is not None:
        for comp in record.components:
            if component in (comp.name, comp.kind.value):
                return _component_spec(record, comp, single=len(record.components) == 1)
        names = ", ".join(c.name for c in record.components) or "none"
        raise ModelNotFound(f"model {record.id} has no component {component!r} (components: {names})")
    if record.type == ModelType.LORA:
        lora = ComponentInfo(
            name="lora", kind=ModelType.LORA, layout=ident.layout, rule=ident.rule, bytes=ident.bytes
        )
        return _component_spec(record, lora, single=True)
    if record.type != ModelType.MAIN and len(record.components) == 1:
        return _component_spec(record, record.components[0], single=True)
    return {
        "model_id": record.id,
        "component": None,
        "type": record.type,
        "base": record.base,
        "model_variant": record.variant,
        "format": record.format,
        "path": record.path,
        "layout": record.layout,
        "loadable": record.status == "ok" and ident.loadable and bool(record.components),
        "components": {c.name: _component_spec(record, c, single=False) for c in record.components},
    }
