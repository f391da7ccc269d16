"""Identification of a tensor table (one weights file) by the rule tables.

Order: LoRA formats, then embeddings, then components. A checkpoint is split into components by
``COMPONENT_PREFIXES``; each group is classified by ``COMPONENT_RULES`` and measured by ``PROBES``;
the base and variant tables decide. File names never take part: only the header (names, shapes,
dtypes, ``__metadata__``), the sidecars' stated facts, and folder hints where the header is silent.
"""

from __future__ import annotations

from bisect import bisect_left
from collections import Counter
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from modelkeeper.discovery.errors import NotAMatch
from modelkeeper.discovery.metadata import metadata_evidence, summarize_metadata
from modelkeeper.discovery.records import (
    Base,
    ComponentInfo,
    EncoderKind,
    Identification,
    Layout,
    LoraInfo,
    ModelFormat,
    ModelType,
    Variant,
)
from modelkeeper.discovery.rules.components import (
    BASE_RULES,
    COMPONENT_PREFIXES,
    COMPONENT_RULES,
    ENCODER_RULES,
    EXTRA_PREFIXES,
    PROBES,
    VARIANT_RULES,
)
from modelkeeper.discovery.rules.configs import CONFIG_BASE_RULES
from modelkeeper.discovery.rules.embeddings import EMBEDDING_RULES, EMBEDDING_WIDTHS
from modelkeeper.discovery.rules.engine import (
    BaseRule,
    ComponentPrefix,
    ComponentRule,
    Decision,
    KeyIndex,
    check,
    measure,
)
from modelkeeper.discovery.rules.hints import PathHints
from modelkeeper.discovery.rules.lora import LORA_BASE_RULES, LORA_FORMAT_RULES, LORA_PROBES, LORA_TARGETS
from modelkeeper.discovery.tables import TensorLike, TensorTable, gguf_loadable, storage_form

#: Bumped whenever a rule table changes, so that a rescan identifies unchanged files again.
#: 2: GGUF loadable, Identification.quant; 3: llama.cpp's T5 names loadable; 4: embeddings and files
#: of no known part not loadable; 5: the scaling factor of the config a single-file VAE carries
#: (``modelkeeper.config``) breaks the tie among the bases its shapes fit.
RULES_VERSION = 5

DENOISERS = frozenset({ModelType.UNET, ModelType.TRANSFORMER})


@dataclass
class Classified:
    """A group of tensors that a component rule recognised."""

    slot: str
    prefix: str
    names: list[str]
    rule: ComponentRule
    evidence: dict[str, Any]
    prefix_layout: Layout | None = None

    @property
    def layout(self) -> Layout:
        """The rule's layout; Hugging Face CLIP names under a checkpoint prefix are that checkpoint's layout."""
        if self.prefix_layout is not None and self.rule.kind is ModelType.TEXT_ENCODER:
            return self.prefix_layout
        return self.rule.layout


# ----------------------------------------------------------------------------- components


def classify(index: KeyIndex) -> tuple[ComponentRule, dict[str, Any]]:
    """The first component rule that matches ``index``, with the measured evidence."""
    for rule in COMPONENT_RULES:
        try:
            rule.match(index)
        except NotAMatch:
            continue
        evidence = measure(PROBES, rule.kind, index)
        if rule.family:
            evidence["family"] = rule.family
        return rule, evidence
    raise NotAMatch("no component rule matches")


def split(names: list[str]) -> tuple[dict[ComponentPrefix, list[str]], list[str]]:
    """Group sorted tensor names by component prefix; the rest are names under no known prefix.

    Names under one prefix are contiguous once sorted, so each group is one bisection away."""
    groups: dict[ComponentPrefix, list[str]] = {}
    taken: list[tuple[int, int]] = []
    for p in COMPONENT_PREFIXES:
        lo = bisect_left(names, p.prefix)
        hi = bisect_left(names, p.prefix[:-1] + chr(ord(p.prefix[-1]) + 1), lo)
        if hi > lo:
            groups[p] = names[lo:hi]
            taken.append((lo, hi))
    rest: list[str] = []
    at = 0
    for lo, hi in sorted(taken):
        rest += names[at:lo]
        at = max(at, hi)
    rest += names[at:]
    return groups, rest


def _stripped(tensors: Mapping[str, TensorLike], names: list[str], prefix: str) -> KeyIndex:
    n = len(prefix)
    return KeyIndex({name[n:]: tensors[name] for name in names})


def decide_encoder(evidence: Mapping[str, Any]) -> tuple[EncoderKind | None, Decision]:
    for rule in ENCODER_RULES:
        try:
            rule.match(evidence)
        except NotAMatch:
            continue
        base = rule.compatible[0] if len(rule.compatible) == 1 else Base.ANY
        return rule.encoder, Decision(rule.name, base, rule.confidence, rule.compatible)
    return None, Decision(None, Base.UNKNOWN, 0.5)


def decide_base(
    kind: ModelType,
    evidence: Mapping[str, Any],
    *,
    fixed: tuple[str, Base | None] | None = None,
    extra_rules: tuple[BaseRule, ...] = (),
) -> Decision:
    """Base of a component: fixed by its architecture rule, else the first base rule that matches."""
    if fixed is not None and fixed[1] is not None:
        return Decision(fixed[0], fixed[1], 1.0, (fixed[1],))
    for base_rule in (*extra_rules, *BASE_RULES):
        try:
            base_rule.match(kind, evidence)
        except NotAMatch:
            continue
        return Decision(
            base_rule.name, base_rule.base, base_rule.confidence, base_rule.compatible or (base_rule.base,)
        )
    return Decision(None, Base.UNKNOWN, 0.5)


def decide_variant(kind: ModelType, base: Base, evidence: Mapping[str, Any]) -> Decision:
    if kind not in DENOISERS:
        return Decision("default.normal", Variant.NORMAL.value, 1.0)
    for rule in VARIANT_RULES:
        try:
            rule.match(kind, base, evidence)
        except NotAMatch:
            continue
        return Decision(rule.name, rule.variant, rule.confidence)
    return Decision("default.normal", Variant.NORMAL.value, 1.0)


_CONFIG_RULES = frozenset(r.name for r in CONFIG_BASE_RULES)


def _config_base(evidence: Mapping[str, Any]) -> Base | None:
    """The base a VAE's stated config names by its scaling factor (``CONFIG_BASE_RULES``), if any."""
    if "scaling_factor" not in evidence:
        return None
    for rule in CONFIG_BASE_RULES:
        try:
            rule.match(ModelType.VAE, evidence)
        except NotAMatch:
            continue
        return rule.base
    return None


def break_tie(decision: Decision, evidence: Mapping[str, Any], hints: PathHints | None) -> Decision:
    """Where the header allows several bases, the file's own config (a VAE's scaling factor, as
    ``CONFIG_BASE_RULES`` read it in a diffusers folder), stated metadata or an InvokeAI base folder
    chooses. The bases the shapes fit stay listed: the choice is the base to file it under."""
    if len(decision.compatible) < 2:
        return decision
    stated = _config_base(evidence) if decision.rule not in _CONFIG_RULES else None
    if stated in decision.compatible:
        return Decision(
            f"{decision.rule}+config.scaling_factor", stated, min(decision.confidence + 0.4, 0.9), decision.compatible
        )  # fmt: skip
    meta_base = evidence.get("meta_base")
    if meta_base in decision.compatible:
        return Decision(
            f"{decision.rule}+meta.base", meta_base, min(decision.confidence + 0.3, 0.9), decision.compatible
        )
    if hints is not None and hints.base in decision.compatible:
        return Decision(
            f"{decision.rule}+hint.base_folder",
            hints.base,
            min(decision.confidence + 0.2, 0.8),
            decision.compatible,
        )
    return decision


def component_info(
    table: TensorTable, c: Classified, base: Decision, encoder: EncoderKind | None
) -> ComponentInfo:
    count, params, nbytes, dtypes = table.stats(c.names)
    kind = c.rule.kind
    name = kind.value if c.slot in ("denoiser", "") else c.slot
    return ComponentInfo(
        name=name,
        kind=kind,
        layout=c.layout,
        prefix=c.prefix,
        base=base.value,
        encoder=encoder,
        rule=c.rule.name,
        tensor_count=count,
        parameters=params,
        bytes=nbytes,
        dtypes=dtypes,
    )


# ----------------------------------------------------------------------------- LoRA and embeddings


def _mode(values: list[int]) -> int | None:
    return Counter(values).most_common(1)[0][0] if values else None


def identify_lora(index: KeyIndex, evidence: Mapping[str, Any], hints: PathHints | None) -> dict[str, Any]:
    for rule in LORA_FORMAT_RULES:
        matches = index.all(rule.marker)
        if not matches:
            continue
        modules = {m.group(1) for m in matches}
        ranks = [index.shape(m.group(0))[rule.rank_dim] for m in index.all(rule.rank)] if rule.rank else []
        joined = "\n" + "\n".join(modules)
        targets = sorted({t for p, t in LORA_TARGETS if "\n" + p in joined})
        lev: dict[str, Any] = dict(evidence)
        for probe in LORA_PROBES:
            if lev.get(probe.name) not in (None, False):
                continue
            key = index.first(probe.pattern)
            if probe.dim is None:
                lev[probe.name] = key is not None
            elif key is not None:
                value = index.shape(key)[probe.dim]
                if probe.times is not None:
                    other = index.first(probe.times)
                    value = value * index.shape(other)[probe.dim] if other else value
                lev[probe.name] = value
        base = Decision(None, Base.UNKNOWN, 0.5)
        for base_rule in LORA_BASE_RULES:
            try:
                check(base_rule.when, lev, base_rule.name)
            except NotAMatch:
                continue
            base = Decision(base_rule.name, base_rule.base, base_rule.confidence)
            break
        if base.rule is None and "meta_base" in lev:
            base = Decision("meta.base", lev["meta_base"], 0.7)
        elif base.rule is None and hints is not None and hints.base is not None:
            base = Decision("hint.base_folder", hints.base, 0.5)
        alpha = None
        if (raw := evidence.get("meta_alpha")) is not None:
            try:
                alpha = float(raw)
            except ValueError:
                alpha = None
        lora = LoraInfo(
            format=rule.format, rank=_mode(ranks), alpha=alpha, targets=targets, modules=len(modules)
        )
        return {
            "type": ModelType.LORA,
            "base": base.value,
            "lora": lora,
            "rule": rule.name,
            "rules": {"type": rule.name, "base": base.rule or "none"},
            "confidence": min(1.0, base.confidence if base.rule else 0.9),
            "evidence": {k: v for k, v in lev.items() if k not in evidence},
        }
    raise NotAMatch("no LoRA format rule matches")


def identify_embedding(index: KeyIndex) -> dict[str, Any]:
    if len(index) > max(r.max_tensors for r in EMBEDDING_RULES):
        raise NotAMatch("too many tensors for an embedding")
    for rule in EMBEDDING_RULES:
        if len(index) > rule.max_tensors or not all(index.has(p) for p in rule.requires):
            continue
        shapes = [index.shape(n) for n in index.tensors if not n.startswith("string_to_token")]
        if any(len(s) > 2 or (len(s) == 2 and s[0] > 128) for s in shapes):
            continue
        if rule.base is not None:
            widths = {index.shape(n)[-1] for n in ("clip_l", "clip_g")}
            if widths != {768, 1280}:
                continue
            base = rule.base
            width = 2048
        else:
            key = index.first(rule.width_key) if rule.width_key else None
            if key is None or not index.shape(key):
                continue
            width = index.shape(key)[-1]
            if width not in EMBEDDING_WIDTHS:
                continue
            base = EMBEDDING_WIDTHS[width]
        shape = index.shape(index.first(rule.requires[0]) or "")
        tokens = shape[0] if len(shape) == 2 else 1
        return {
            "type": ModelType.TEXTUAL_INVERSION,
            "base": base,
            "rule": rule.name,
            "rules": {"type": rule.name, "base": rule.name},
            "confidence": rule.confidence,
            "evidence": {"width": width, "tokens": tokens},
        }
    raise NotAMatch("no embedding rule matches")


# ----------------------------------------------------------------------------- whole files


def _classify_groups(table: TensorTable, index: KeyIndex) -> tuple[list[Classified], list[str]]:
    groups, rest = split(index.names)
    found: list[Classified] = []
    unclassified: list[str] = []
    for prefix_rule, names in groups.items():
        try:
            rule, evidence = classify(_stripped(table.tensors, names, prefix_rule.prefix))
        except NotAMatch:
            unclassified.append(prefix_rule.prefix)
            continue
        found.append(
            Classified(prefix_rule.slot, prefix_rule.prefix, names, rule, evidence, prefix_rule.layout)
        )
    whole = [n for n in rest if not n.startswith(EXTRA_PREFIXES)]
    if not found and whole:
        # No prefixed component: the file is one component, named as such (a bare VAE, a UNet...).
        # An OpenCLIP model's own "transformer." keys must not be taken for a pipeline prefix.
        try:
            rule, evidence = classify(index)
        except NotAMatch:
            return [], unclassified
        return [Classified("", "", list(table.tensors), rule, evidence)], []
    return found, unclassified


def _small_model(
    index: KeyIndex, evidence: Mapping[str, Any], hints: PathHints | None
) -> dict[str, Any] | None:
    """A LoRA or an embedding, or None."""
    try:
        return identify_lora(index, evidence, hints)
    except NotAMatch:
        pass
    try:
        return identify_embedding(index)
    except NotAMatch:
        return None


#: Identifications (dumped) by (table structure, format, file evidence, hints); see ``identify_table``.
IdentificationMemo = dict[tuple[Any, ...], dict[str, Any]]


def identify_table(
    table: TensorTable,
    fmt: ModelFormat,
    *,
    hints: PathHints | None = None,
    sidecar_prediction: str | None = None,
    civitai_base: Base | None = None,
    memo: IdentificationMemo | None = None,
) -> Identification:
    """Identify one weights file from its tensor table. Never raises for an unknown file:
    the answer is then ``type=unknown`` with rule ``none``.

    With ``memo``, a table with a known structure (``TensorTable.structure``) and the same
    evidence from its metadata and folders gets a copy of the earlier answer, with its own
    metadata summary: every rule reads only the tensors, that evidence and the hints.
    """
    file_evidence = metadata_evidence(table.metadata, table.tensors)
    if sidecar_prediction and "meta_prediction" not in file_evidence:
        file_evidence["meta_prediction"] = sidecar_prediction
    if civitai_base is not None and "meta_base" not in file_evidence:
        file_evidence["meta_base"] = civitai_base
    if "ss_network_alpha" in table.metadata:
        file_evidence["meta_alpha"] = table.metadata["ss_network_alpha"]
    if memo is None or table.structure is None:
        return _identify_table(table, fmt, file_evidence, hints)
    key = (table.structure, fmt, tuple(sorted(file_evidence.items())), hints)
    known = memo.get(key)
    if known is not None:
        # Validation builds new containers: a copy for this file (a fifth of a deep copy's cost).
        return Identification.model_validate({**known, "metadata": summarize_metadata(table.metadata)})
    ident = _identify_table(table, fmt, file_evidence, hints)
    memo[key] = ident.model_dump()
    return ident


def _identify_table(
    table: TensorTable, fmt: ModelFormat, file_evidence: dict[str, Any], hints: PathHints | None
) -> Identification:
    count, params, nbytes, dtypes = table.stats()
    common: dict[str, Any] = {
        "format": fmt,
        "tensor_count": count,
        "parameters": params,
        "bytes": nbytes,
        "dtypes": dtypes,
        "metadata": summarize_metadata(table.metadata),
        "loadable": fmt is not ModelFormat.GGUF or gguf_loadable(table),
        "quant": storage_form(table, gguf=fmt is ModelFormat.GGUF),
    }
    index = KeyIndex(table.tensors)
    found = _small_model(index, file_evidence, hints)
    if found is not None:
        found["compatible_bases"] = [found["base"]] if found["base"] is not Base.UNKNOWN else []
        return finish(Identification(**common, **found, layout=Layout.NONE), hints)

    parts, unclassified = _classify_groups(table, index)
    if not parts:
        ident = Identification(**common, rule="none", rules={"type": "none"}, confidence=0.0)
        ident.evidence["unclassified"] = unclassified
        return finish(ident, hints)

    components: list[ComponentInfo] = []
    decisions: dict[int, tuple[Decision, EncoderKind | None]] = {}
    for i, part in enumerate(parts):
        evidence = {**file_evidence, **part.evidence}
        encoder: EncoderKind | None = None
        if part.rule.kind is ModelType.TEXT_ENCODER:
            encoder, base = decide_encoder(evidence)
        else:
            decision = decide_base(part.rule.kind, evidence, fixed=(part.rule.name, part.rule.base))
            base = break_tie(decision, evidence, hints)
        decisions[i] = (base, encoder)
        components.append(component_info(table, part, base, encoder))

    denoisers = [i for i, p in enumerate(parts) if p.rule.kind in DENOISERS]
    if len(parts) == 1:
        main_i = 0
        kind = parts[0].rule.kind
        type_rule = parts[0].rule.name
    elif denoisers:
        main_i = denoisers[0]
        kind = ModelType.MAIN
        type_rule = f"checkpoint.{parts[main_i].layout.value}"
    else:
        ident = Identification(
            **common,
            components=components,
            rule="checkpoint.no_denoiser",
            rules={"type": "checkpoint.no_denoiser"},
            confidence=0.3,
        )
        return finish(ident, hints)

    part = parts[main_i]
    base, encoder = decisions[main_i]
    evidence = {**file_evidence, **part.evidence}
    variant = decide_variant(part.rule.kind, base.value, evidence)
    if kind is ModelType.MAIN:
        for c in components:
            if c.kind is not ModelType.TEXT_ENCODER:
                c.base = base.value
    ident = Identification(
        **common,
        type=kind,
        base=base.value,
        variant=str(variant.value),
        layout=part.layout,
        encoder=encoder,
        components=components,
        compatible_bases=list(base.compatible),
        rule=type_rule,
        rules={
            "type": type_rule,
            "component": part.rule.name,
            "base": base.rule or "none",
            "variant": variant.rule or "",
        },
        confidence=min(part.rule.confidence, base.confidence, variant.confidence),
        evidence={k: v for k, v in evidence.items() if not isinstance(v, Base)},
    )
    if unclassified:
        ident.evidence["unclassified"] = unclassified
    return finish(ident, hints)


#: Component rules whose key names no worker conversion handles (none today: llama.cpp's T5 names in
#: GGUF files are converted by ``formats.llama_t5``).
UNCONVERTIBLE_RULES: frozenset[str] = frozenset()


def finish(ident: Identification, hints: PathHints | None) -> Identification:
    """Record the folder hints and whether the headers agree with them. Loadable means a worker reads
    it: a file whose keys no worker conversion handles is not, nor one with no component a worker
    loads (an embedding, a file of no known part); a LoRA is (applied to a loaded model)."""
    if ident.rule in UNCONVERTIBLE_RULES or any(c.rule in UNCONVERTIBLE_RULES for c in ident.components):
        ident.loadable = False
    if not ident.components and ident.type is not ModelType.LORA:
        ident.loadable = False
    if hints is None:
        return ident
    if hints.type_hint is not None:
        ident.hints.append(hints.type_hint.name)
        if ident.type is not ModelType.UNKNOWN and ident.type not in hints.type_hint.types:
            wanted = "/".join(sorted(t.value for t in hints.type_hint.types))
            ident.hint_conflicts.append(
                f"{hints.type_hint.name} suggests {wanted}, header says {ident.type.value}"
            )
    if hints.base is not None:
        ident.hints.append(f"base_folder:{hints.base_folder}")
        if (
            ident.base not in (Base.UNKNOWN, Base.ANY, hints.base)
            and hints.base not in ident.compatible_bases
        ):
            ident.hint_conflicts.append(
                f"base folder {hints.base_folder} suggests {hints.base.value}, header says {ident.base.value}"
            )
    return ident
