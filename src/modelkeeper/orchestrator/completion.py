"""Completing a transformer-only model from the registry: the reads around ``parts.resolve``.

:func:`plan_parts` reads what a Flux or SD3 transformer needs (its diffusers config, else the
tensor shapes of its safetensors or GGUF header), gathers the registry's standalone text encoders
and VAEs (under the roots served), resolves the parts pinned in the model's user metadata
(``default_settings.parts``: role -> model reference) and returns a :class:`PartsPlan`: what the
catalog turns into worker requests, what views show, and what a load refuses with (422) when a
part is missing or a pinned one does not fit. Registry and header reads: call it off the event loop.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from modelkeeper.formats.gguf_header import read_gguf_header
from modelkeeper.formats.safetensors_header import read_header
from modelkeeper.orchestrator.errors import IncompatiblePart, MissingPart
from modelkeeper.orchestrator.parts import PART_BASES, Candidate, Choice, Needs, needs_from_shapes, resolve
from modelkeeper.protocol.errors import ProtocolError
from modelkeeper.registry import ModelRecord, Registry

#: The key of ``default_settings`` (user metadata) that pins parts: ``{"text_encoder_2": "<ref>"}``.
PIN_KEY = "parts"
#: The registry types a part is chosen among.
PART_TYPES = ("text_encoder", "vae")
PIN_HINT = "pin one in the model's default_settings.parts (role: model reference)"


@dataclass
class PartsPlan:
    """The parts a transformer-only model is loaded with: one choice per role, and the registry
    record of each part chosen (by role)."""

    model: ModelRecord
    needs: Needs
    choices: list[Choice]
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
    unusable = None
    if record.status != "ok":
        unusable = f"its file is {record.status}"
    elif not ident.loadable:
        unusable = "a worker cannot load its format"
    return Candidate(
        id=record.id,
        handle=record.handle,
        kind=kind,
        width=int(width) if isinstance(width, int) else None,
        base=record.base,
        bases=tuple(b.value for b in ident.compatible_bases if b.value != record.base),
        quant=ident.quant,
        unusable=unusable,
    )


def pins_of(record: ModelRecord) -> dict[str, Any]:
    """The parts pinned in the model's user metadata (``default_settings.parts``); a value that is
    no object is refused as a whole (under the role name ``parts``)."""
    pins = record.meta.default_settings.get(PIN_KEY) or {}
    return pins if isinstance(pins, dict) else {PIN_KEY: pins}


def plan_parts(registry: Registry, record: ModelRecord, roots: Sequence[str] = ()) -> PartsPlan | None:
    """The parts ``record`` is loaded with (None when it needs none), chosen among the models
    under ``roots`` (every model when empty)."""
    if not needs_parts(record):
        return None
    found: dict[str, ModelRecord] = {}
    for type_ in PART_TYPES:
        for item in registry.search(type=type_, limit=100_000, roots=roots).items:
            found[item.id] = registry.get(item.id, roots)
    pins: dict[str, Candidate | str] = {}
    for role, ref in pins_of(record).items():
        if not isinstance(ref, str):
            where = f"default_settings.{PIN_KEY}" + ("" if role == PIN_KEY else f".{role}")
            pins[role] = (
                f"{where} must be {'a model reference' if role != PIN_KEY else 'an object'}, not {ref!r}"
            )
            continue
        try:
            pinned = registry.resolve(ref, roots)
        except ProtocolError as exc:
            pins[role] = f"the reference {ref!r}: {exc.message}"
            continue
        found.setdefault(pinned.id, pinned)
        pins[role] = candidate(pinned)
    needs = needs_of(record)
    choices = resolve(needs, [candidate(r) for r in found.values() if r.id != record.id], pins)
    chosen = {c.role.name: found[c.candidate.id] for c in choices if c.candidate is not None}
    return PartsPlan(record, needs, choices, chosen)
