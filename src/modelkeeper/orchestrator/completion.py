"""Completing a transformer-only model from the registry: the reads around ``parts.resolve``.

:func:`plan_parts` reads what a Flux or SD3 transformer needs (its diffusers config, else the
tensor shapes of its safetensors or GGUF header), gathers the registry's standalone text encoders
and VAEs and the text-encoder and VAE components of Flux and SD3 pipeline folders and full
checkpoints (under the roots served), resolves the parts pinned in the model's user metadata
(``default_settings.parts``: role -> model reference, ``handle:component`` for a component) and
returns a :class:`PartsPlan`: what the catalog turns into worker requests, what views show, and what
a load refuses with (422) when a part is missing or a pinned one does not fit. Registry and header
reads: call it off the event loop.

A component chosen as a part is handed on as its model's record narrowed to that one component
(:func:`narrowed`): what counts a record's components (the bytes a load needs, its worker
requests, its content ids for the RAM cache and the share token) then counts only the part.
"""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from modelkeeper.discovery.records import ComponentInfo
from modelkeeper.discovery.tables import FLOAT8_NAMES
from modelkeeper.formats.conventions import SAFETENSORS_SUFFIXES
from modelkeeper.formats.gguf_header import read_gguf_header
from modelkeeper.formats.safetensors_header import read_header
from modelkeeper.orchestrator.errors import IncompatiblePart, MissingPart
from modelkeeper.orchestrator.parts import PART_BASES, Candidate, Choice, Needs, needs_from_shapes, resolve
from modelkeeper.protocol.errors import ProtocolError
from modelkeeper.registry import ModelNotFound, ModelRecord, Registry

#: The key of ``default_settings`` (user metadata) that pins parts: ``{"text_encoder_2": "<ref>"}``.
PIN_KEY = "parts"
#: The registry types a part is chosen among; the same kinds of component of a ``main`` model.
PART_TYPES = ("text_encoder", "vae")
#: Separates a model reference from a component name in a pin: ``tiny-flux-folder:text_encoder_2``
#: (handles and ids never hold one; a path that does resolves whole first).
COMPONENT_SEP = ":"
#: Where the width of a checkpoint's component is read when it has no config: a tensor name suffix
#: and the dimension (CLIP's and T5's embeddings: [vocabulary, width]; a VAE decoder's first
#: convolution: [channels, latent channels, k, k]).
WIDTH_TENSORS: dict[str, tuple[tuple[str, int], ...]] = {
    "text_encoder": (("token_embedding.weight", 1), ("shared.weight", 1), ("embed_tokens.weight", 1)),
    "vae": (("decoder.conv_in.weight", 1),),
}
PIN_HINT = "pin one in the model's default_settings.parts (role: model reference)"


@dataclass
class PartsPlan:
    """The parts a transformer-only model is loaded with: one choice per role, and the registry
    record of each part chosen (by role)."""

    model: ModelRecord
    needs: Needs
    choices: list[Choice]
    #: role -> the part's record (a component's: its model's, narrowed to it)
    records: dict[str, ModelRecord] = field(default_factory=dict)

    @property
    def complete(self) -> bool:
        return all(c.ok for c in self.choices)

    def info(self) -> list[dict[str, Any]]:
        """One entry per role, as ``show`` and ``GET /api/model/{id}`` give them."""
        return [
            {
                "role": c.role.name,
                "wants": c.role.wants,
                "status": c.status,
                "model_id": c.candidate.id if c.candidate else None,
                "handle": c.candidate.handle if c.candidate else None,
                "component": c.candidate.component if c.candidate else None,
                "why": c.why,
            }
            for c in self.choices
        ]

    @property
    def _head(self) -> str:
        return f"{self.model.base} transformer {self.model.id} ({self.model.handle})"

    def check_pins(self) -> None:
        """Raise IncompatiblePart when a pinned part is refused, naming the role and why."""
        refused = [c for c in self.choices if c.status == "refused"]
        if refused:
            text = "; ".join(f"the {c.role.name} pinned is refused: {c.why}" for c in refused)
            raise IncompatiblePart(f"{self._head}: {text}", model_id=self.model.id, parts=_details(refused))

    def check(self) -> None:
        """Raise IncompatiblePart when a pinned part is refused, else MissingPart when a role has
        no part; both name the role, what would fit and why."""
        self.check_pins()
        m = self.model
        head = self._head
        missing = [c for c in self.choices if c.status == "missing"]
        if missing:
            text = "; ".join(f"needs a {c.role.name} ({c.role.wants}): {c.why}" for c in missing)
            raise MissingPart(
                f"{head} {text}; add one under the model roots, or {PIN_HINT}",
                model_id=m.id,
                parts=_details(missing),
            )


def _details(choices: Sequence[Choice]) -> list[dict[str, str]]:
    return [{"role": c.role.name, "wants": c.role.wants, "why": c.why} for c in choices]


def needs_parts(record: ModelRecord) -> bool:
    """Whether ``record`` is a transformer-only file that is completed from parts."""
    return record.type == "transformer" and record.base in PART_BASES


def _config_needs(record: ModelRecord) -> Needs | None:
    config = next((c.config for c in record.components if c.config), None)
    if not config or "joint_attention_dim" not in config:
        return None
    return Needs(record.base, config.get("joint_attention_dim"), config.get("pooled_projection_dim"))


def needs_of(record: ModelRecord) -> Needs:
    """What the transformer needs: from its diffusers config, else its header's tensor shapes
    (widths left unknown when neither can be read: any width then fits)."""
    found = _config_needs(record)
    if found is not None:
        return found
    path = Path(record.path or "")
    shapes: Mapping[str, Sequence[int]] = {}
    try:
        if record.format == "gguf":
            shapes = {n: t.shape for n, t in read_gguf_header(path).tensors.items()}
        elif record.format == "safetensors":
            shapes = {n: t.shape for n, t in read_header(path).tensors.items()}
    except (ProtocolError, OSError):
        pass  # a broken file is the worker's to report; its parts are chosen on kind alone
    return needs_from_shapes(record.base, shapes)


def _unusable(record: ModelRecord) -> str | None:
    if record.status != "ok":
        return f"its file is {record.status}"
    if not record.identification.loadable:
        return "a worker cannot load its format"
    return None


def candidate(record: ModelRecord) -> Candidate:
    """``record`` as a part: its kind, width and bases; why it cannot load, if so."""
    ident = record.identification
    config = next((c.config for c in record.components if c.config), None) or {}
    kind: str | None = None
    width: Any = None
    if record.type == "text_encoder" and record.encoder:
        kind = record.encoder
        width = ident.evidence.get("hidden") or config.get("d_model") or config.get("hidden_size")
    elif record.type == "vae":
        kind = "vae"
        width = ident.evidence.get("latent_channels") or config.get("latent_channels")
    return Candidate(
        id=record.id,
        handle=record.handle,
        kind=kind,
        width=int(width) if isinstance(width, int) else None,
        base=record.base,
        bases=tuple(b.value for b in ident.compatible_bases if b.value != record.base),
        quant=ident.quant,
        unusable=_unusable(record),
    )


def _offered(comp: ComponentInfo) -> bool:
    """Whether a component of a main model may be a part: a VAE, or a text encoder of known kind."""
    return comp.kind.value == "vae" or (comp.kind.value == "text_encoder" and comp.encoder is not None)


def _checkpoint_shapes(record: ModelRecord) -> Mapping[str, Sequence[int]]:
    """The tensor shapes of a single-file checkpoint (empty for a folder or an unreadable file)."""
    path = Path(record.path or "")
    if path.suffix.lower() not in SAFETENSORS_SUFFIXES:
        return {}
    try:
        return {n: t.shape for n, t in read_header(path).tensors.items()}
    except (ProtocolError, OSError):
        return {}


def _component_width(comp: ComponentInfo, shapes: Mapping[str, Sequence[int]]) -> int | None:
    """An encoder's hidden size or a VAE's latent channels: from its config (a folder's component),
    else from the checkpoint's tensors under the component's prefix."""
    config = comp.config or {}
    for key in ("latent_channels",) if comp.kind.value == "vae" else ("d_model", "hidden_size"):
        if isinstance(config.get(key), int):
            return int(config[key])
    for suffix, dim in WIDTH_TENSORS.get(comp.kind.value, ()):
        for name, shape in shapes.items():
            if name.startswith(comp.prefix) and name.endswith(suffix) and len(shape) > dim:
                return int(shape[dim])
    return None


def _component_quant(record: ModelRecord, comp: ComponentInfo) -> str | None:
    """The stored form of one component: a checkpoint's fp8 transformer beside a bf16 VAE leaves
    the VAE full precision. fp8 by its tensors' dtypes (``scaled_`` as the file is); a GGUF file's
    type for its components."""
    quant = record.identification.quant
    if record.format == "gguf":
        return quant
    fp8 = [FLOAT8_NAMES[d] for d, _ in sorted(comp.dtypes.items(), key=lambda i: -i[1]) if d in FLOAT8_NAMES]
    if not fp8:
        return None
    return f"scaled_{fp8[0]}" if quant and quant.startswith("scaled_") else fp8[0]


def component_candidates(record: ModelRecord) -> list[tuple[Candidate, ModelRecord]]:
    """The components of a pipeline folder or full checkpoint that may be parts, each with the
    record narrowed to it. A text encoder keeps its own base (``any`` for the CLIP and T5 encoders
    every base shares); a VAE is its model's (a Flux folder's VAE is a Flux VAE, not an SD3 one,
    although shapes cannot tell them apart)."""
    offered = [c for c in record.components if _offered(c)]
    if not offered:
        return []
    shapes = _checkpoint_shapes(record) if any(c.config is None for c in offered) else {}
    out = []
    for comp in offered:
        kind = "vae" if comp.kind.value == "vae" else comp.encoder.value if comp.encoder else None
        cand = Candidate(
            id=record.id,
            handle=record.handle,
            kind=kind,
            width=_component_width(comp, shapes),
            base=record.base if kind == "vae" else comp.base.value,
            quant=_component_quant(record, comp),
            unusable=_unusable(record),
            component=comp.name,
        )
        out.append((cand, narrowed(record, comp)))
    return out


def narrowed(record: ModelRecord, comp: ComponentInfo) -> ModelRecord:
    """``record`` with ``comp`` as its only component (and its size): a part taken from a folder or
    checkpoint, loaded, counted and cached as that component alone."""
    return record.model_copy(update={"components": [comp], "size": comp.bytes})


def pins_of(record: ModelRecord) -> dict[str, Any]:
    """The parts pinned in the model's user metadata (``default_settings.parts``); a value that is
    no object is refused as a whole (under the role name ``parts``)."""
    pins = record.meta.default_settings.get(PIN_KEY) or {}
    return pins if isinstance(pins, dict) else {PIN_KEY: pins}


def _pin(registry: Registry, ref: str, roots: Sequence[str]) -> tuple[Candidate, ModelRecord] | str:
    """The part a pin names (a model reference, or ``reference:component``), or why it names none."""
    try:
        pinned = registry.resolve(ref, roots)
    except ModelNotFound as exc:
        head, sep, name = ref.rpartition(COMPONENT_SEP)
        if not sep or not head:
            return f"the reference {ref!r}: {exc.message}"
        try:
            pinned = registry.resolve(head, roots)
        except ProtocolError as inner:
            return f"the reference {head!r}: {inner.message}"
        found = [pair for pair in component_candidates(pinned) if pair[0].component == name]
        if found:
            return found[0]
        names = ", ".join(c.ref for c, _ in component_candidates(pinned)) or "none"
        return f"{pinned.handle} has no text encoder or VAE component {name!r} (its parts to pin: {names})"
    except ProtocolError as exc:
        return f"the reference {ref!r}: {exc.message}"
    if pinned.type == "main" and (parts := component_candidates(pinned)):
        names = ", ".join(c.ref for c, _ in parts)
        return f"{pinned.handle} is a {pinned.type} model, not a part: pin one of its components ({names})"
    return candidate(pinned), pinned


def _gather(registry: Registry, roots: Sequence[str]) -> dict[str, tuple[Candidate, ModelRecord]]:
    """Every candidate under ``roots`` by key: standalone text encoders and VAEs, and the
    components of Flux and SD3 main models (folders and checkpoints)."""
    found: dict[str, tuple[Candidate, ModelRecord]] = {}
    for type_ in PART_TYPES:
        for item in registry.search(type=type_, limit=100_000, roots=roots).items:
            part = registry.get(item.id, roots)
            found[item.id] = (candidate(part), part)
    for base in PART_BASES:
        for item in registry.search(type="main", base=base, limit=100_000, roots=roots).items:
            for cand, part in component_candidates(registry.get(item.id, roots)):
                found[cand.key] = (cand, part)
    return found


def plan_parts(registry: Registry, record: ModelRecord, roots: Sequence[str] = ()) -> PartsPlan | None:
    """The parts ``record`` is loaded with (None when it needs none), chosen among the models
    under ``roots`` (every model when empty)."""
    if not needs_parts(record):
        return None
    found = _gather(registry, roots)
    pins: dict[str, Candidate | str] = {}
    for role, ref in pins_of(record).items():
        if not isinstance(ref, str):
            where = f"default_settings.{PIN_KEY}" + ("" if role == PIN_KEY else f".{role}")
            pins[role] = (
                f"{where} must be {'a model reference' if role != PIN_KEY else 'an object'}, not {ref!r}"
            )
            continue
        pinned = _pin(registry, ref, roots)
        if isinstance(pinned, str):
            pins[role] = pinned
            continue
        found.setdefault(pinned[0].key, pinned)
        pins[role] = pinned[0]
    needs = needs_of(record)
    choices = resolve(needs, [c for c, r in found.values() if r.id != record.id], pins)
    chosen = {c.role.name: found[c.candidate.key][1] for c in choices if c.candidate is not None}
    return PartsPlan(record, needs, choices, chosen)


def check_pinned_parts(
    registry: Registry, record: ModelRecord, settings: Any, roots: Sequence[str] = ()
) -> None:
    """Raise IncompatiblePart when the ``default_settings`` about to be set on ``record`` (an
    object, or its JSON text) pin a part that does not fit it; nothing to check otherwise.

    The one check that ``PUT /api/model/{id}/metadata`` and ``modelkeeper meta --set`` run before
    writing, so that a pin naming no model, or one that does not fit, is refused when it is set
    rather than when the model is loaded. Text that is no JSON is left to the registry, which
    refuses it naming the key. Registry and header reads: call it off the event loop.
    """
    if isinstance(settings, str):
        try:
            settings = json.loads(settings)
        except json.JSONDecodeError:
            return
    if not isinstance(settings, dict) or PIN_KEY not in settings:
        return
    if not needs_parts(record):
        if settings[PIN_KEY]:  # an empty object (clearing the pins) is always fine
            raise IncompatiblePart(
                f"{record.handle or record.name} ({record.type}, {record.base}) takes no parts: only a "
                f"transformer-only file of {', '.join(sorted(PART_BASES))} is completed from parts; "
                f"leave default_settings.{PIN_KEY} out",
                model_id=record.id,
            )
        return
    meta = record.meta.model_copy(update={"default_settings": settings})
    plan = plan_parts(registry, record.model_copy(update={"meta": meta}), roots)
    if plan is not None:
        plan.check_pins()
