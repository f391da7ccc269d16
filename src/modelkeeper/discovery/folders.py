"""Identification of diffusers folders: pipelines (``model_index.json``) and single components (``config.json``).

The configs decide the kind, base and variant (through ``rules/configs.py`` and the same base and
variant tables as single files); the weights' headers give the statistics (tensor count,
parameters, bytes, dtypes). A component whose class no config rule knows is identified from its
weights' header instead.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

from modelkeeper.discovery.errors import BrokenConfig, NotAMatch
from modelkeeper.discovery.identify import (
    DENOISERS,
    break_tie,
    decide_base,
    decide_encoder,
    decide_variant,
    finish,
    identify_table,
)
from modelkeeper.discovery.records import (
    Base,
    ComponentInfo,
    EncoderKind,
    Identification,
    Layout,
    ModelFormat,
    ModelType,
)
from modelkeeper.discovery.rules.configs import (
    CONFIG_BASE_RULES,
    CONFIG_CLASSES,
    CONFIG_DEFAULTS,
    CONFIG_EVIDENCE,
    NON_MODEL_SLOTS,
    PIPELINE_BASES,
    PREDICTION_TYPES,
    ConfigClass,
)
from modelkeeper.discovery.rules.engine import Decision
from modelkeeper.discovery.rules.hints import PathHints
from modelkeeper.discovery.tables import TensorLike, TensorTable, read_pickle_table, read_safetensors_table
from modelkeeper.formats.conventions import FOLDER_WEIGHT_STEMS
from modelkeeper.formats.errors import InvalidModelFile
from modelkeeper.formats.safetensors_header import StructureMemo

WEIGHT_SUFFIXES: tuple[str, ...] = (".safetensors", ".bin")
_MAX_CONFIG = 4 * 1024 * 1024


def read_json_config(path: Path) -> dict[str, Any]:
    """A config file as a dict; BrokenConfig when it is not a JSON object."""
    try:
        if path.stat().st_size > _MAX_CONFIG:
            raise BrokenConfig(f"{path}: config larger than {_MAX_CONFIG} bytes", path=str(path))
        data = json.loads(path.read_bytes())
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise BrokenConfig(f"{path}: not valid JSON: {exc}", path=str(path)) from exc
    if not isinstance(data, dict):
        raise BrokenConfig(f"{path}: not a JSON object", path=str(path))
    return data


def weight_files(folder: Path, names: set[str] | None = None) -> tuple[list[Path], str | None]:
    """The weight files of a component folder (shards included) and their diffusers weight variant.

    Preference: safetensors over .bin, no variant over a variant (fp16...)."""
    if names is None:
        names = set(os.listdir(folder))
    for suffix in WEIGHT_SUFFIXES:
        for stem in FOLDER_WEIGHT_STEMS:
            plain: list[tuple[str, str | None]] = [(f"{stem}{suffix}", None)]
            candidates = plain + sorted(
                (n, n[len(stem) + 1 : -len(suffix)])
                for n in names
                if n.startswith(stem + ".") and n.endswith(suffix) and n.count(".") == 2
            )
            for name, variant in candidates:
                if name in names:
                    return [folder / name], variant
            index = f"{stem}{suffix}.index.json"
            plain = [(index, None)]
            index_variants = plain + sorted(
                (n, n[len(stem) + 1 : -len(suffix) - 11])
                for n in names
                if n.startswith(stem + ".") and n.endswith(f"{suffix}.index.json") and n != index
            )
            for name, variant in index_variants:
                if name in names:
                    weight_map = read_json_config(folder / name).get("weight_map", {})
                    shards = (
                        sorted({str(v) for v in weight_map.values()}) if isinstance(weight_map, dict) else []
                    )
                    return [folder / s for s in shards], variant
    return [], None


def folder_table(files: list[Path], memo: StructureMemo | None = None) -> TensorTable:
    """One tensor table over all the shards of a component (``memo``: see ``StructureMemo``)."""
    tensors: dict[str, TensorLike] = {}
    metadata: dict[str, str] = {}
    for f in files:
        table = read_safetensors_table(f, memo) if f.suffix == ".safetensors" else read_pickle_table(f)
        tensors.update(table.tensors)
        metadata.update(table.metadata)
    return TensorTable(tensors, metadata)


def _config_class(config: dict[str, Any]) -> ConfigClass | None:
    names = {str(config.get("_class_name", "")), str(config.get("model_type", ""))}
    archs = config.get("architectures")
    if isinstance(archs, list):
        names.update(str(a) for a in archs)
    for cc in CONFIG_CLASSES:
        if cc.classes & names:
            return cc
    return None


def _config_evidence(kind: ModelType, config: dict[str, Any]) -> dict[str, Any]:
    evidence: dict[str, Any] = {}
    for name, fields in CONFIG_EVIDENCE.get(kind, {}).items():
        for field in fields:
            if field in config and config[field] is not None:
                value = config[field]
                evidence[name] = value[-1] if isinstance(value, list) and value else value
                break
    for name, value in CONFIG_DEFAULTS.get(kind, {}).items():
        evidence.setdefault(name, value)
    return evidence


def identify_component_config(
    folder: Path,
    config: dict[str, Any],
    slot: str,
    names: set[str] | None = None,
    memo: StructureMemo | None = None,
) -> tuple[ComponentInfo, dict[str, Any], Decision, str | None]:
    """One component folder: its info, the evidence for variants, its base decision, its weight variant."""
    files, weight_variant = weight_files(folder, names)
    table = folder_table(files, memo) if files else TensorTable({})
    count, params, nbytes, dtypes = table.stats()
    cc = _config_class(config)
    encoder: EncoderKind | None = None
    kind: ModelType
    if cc is None:
        if not table.tensors:
            raise NotAMatch(f"{folder}: unknown config class and no weights")
        ident = identify_table(table, ModelFormat.SAFETENSORS)
        if ident.type in (ModelType.UNKNOWN, ModelType.MAIN, ModelType.LORA, ModelType.TEXTUAL_INVERSION):
            raise NotAMatch(f"{folder}: {ident.type} is not a component")
        kind, rule, evidence = ident.type, f"folder.header.{ident.rule}", dict(ident.evidence)
        encoder = ident.encoder
        base = Decision(ident.rules.get("base"), ident.base, ident.confidence, tuple(ident.compatible_bases))
    else:
        kind, rule = cc.kind, cc.name
        evidence = _config_evidence(kind, config)
        if cc.family:
            evidence["family"] = cc.family
        if kind is ModelType.TEXT_ENCODER:
            encoder, base = decide_encoder(evidence)
        else:
            base = decide_base(kind, evidence, fixed=(cc.name, cc.base), extra_rules=CONFIG_BASE_RULES)
    info = ComponentInfo(
        name=slot or kind.value,
        kind=kind,
        layout=Layout.DIFFUSERS,
        subfolder=slot or None,
        base=base.value,
        encoder=encoder,
        rule=rule,
        tensor_count=count,
        parameters=params,
        bytes=nbytes,
        dtypes=dtypes,
        config=config,
    )
    return info, evidence, base, weight_variant


def _totals(components: list[ComponentInfo]) -> dict[str, Any]:
    dtypes: dict[str, int] = {}
    for c in components:
        for d, n in c.dtypes.items():
            dtypes[d] = dtypes.get(d, 0) + n
    return {
        "tensor_count": sum(c.tensor_count for c in components),
        "parameters": sum(c.parameters for c in components),
        "bytes": sum(c.bytes for c in components),
        "dtypes": dtypes,
    }


def identify_component_folder(
    folder: Path, names: set[str], hints: PathHints | None = None, memo: StructureMemo | None = None
) -> Identification:
    config = read_json_config(folder / "config.json")
    try:
        info, evidence, base, weight_variant = identify_component_config(folder, config, "", names, memo)
    except NotAMatch:
        return finish(
            Identification(
                format=ModelFormat.DIFFUSERS,
                layout=Layout.DIFFUSERS,
                rule="none",
                rules={"type": "none"},
                confidence=0.0,
            ),
            hints,
        )
    base = break_tie(base, evidence, hints)
    info.base = base.value
    variant = decide_variant(info.kind, base.value, evidence)
    ident = Identification(
        format=ModelFormat.DIFFUSERS,
        type=info.kind,
        base=base.value,
        variant=str(variant.value),
        layout=Layout.DIFFUSERS,
        encoder=info.encoder,
        components=[info],
        compatible_bases=list(base.compatible),
        rule=info.rule,
        rules={"type": info.rule, "base": base.rule or "none", "variant": variant.rule or ""},
        confidence=min(base.confidence, variant.confidence),
        weight_variant=weight_variant,
        evidence={k: v for k, v in evidence.items() if not isinstance(v, Base)},
        **_totals([info]),
    )
    return finish(ident, hints)


def identify_pipeline_folder(
    folder: Path, hints: PathHints | None = None, memo: StructureMemo | None = None
) -> Identification:
    index = read_json_config(folder / "model_index.json")
    pipeline = str(index.get("_class_name", ""))
    components: list[ComponentInfo] = []
    evidence_by_slot: dict[str, tuple[dict[str, Any], Decision]] = {}
    weight_variants: set[str] = set()
    for slot, spec in sorted(index.items()):
        if slot.startswith("_") or slot in NON_MODEL_SLOTS or not isinstance(spec, list) or None in spec:
            continue
        sub = folder / slot
        if not (sub / "config.json").is_file():
            continue
        try:
            info, evidence, base, weight_variant = identify_component_config(
                sub, read_json_config(sub / "config.json"), slot, memo=memo
            )
        except NotAMatch:
            continue
        components.append(info)
        evidence_by_slot[slot] = (evidence, base)
        if weight_variant:
            weight_variants.add(weight_variant)
    denoiser = next((c for c in components if c.kind in DENOISERS), None)
    if denoiser is None:
        raise InvalidModelFile(
            f"{folder}: pipeline {pipeline or '?'} has no unet or transformer folder", path=str(folder)
        )
    evidence, base = evidence_by_slot[denoiser.name]
    evidence = dict(evidence)
    scheduler = folder / "scheduler" / "scheduler_config.json"
    if scheduler.is_file():
        pred = read_json_config(scheduler).get("prediction_type")
        if isinstance(pred, str) and pred in PREDICTION_TYPES:
            evidence["meta_prediction"] = PREDICTION_TYPES[pred]
    if pipeline in PIPELINE_BASES and base.value is Base.UNKNOWN:
        base = Decision(f"pipeline.{pipeline}", PIPELINE_BASES[pipeline], 1.0, (PIPELINE_BASES[pipeline],))
    variant = decide_variant(denoiser.kind, base.value, evidence)
    for c in components:
        if c.kind is not ModelType.TEXT_ENCODER:
            c.base = base.value
    rule = "pipeline.model_index"
    ident = Identification(
        format=ModelFormat.DIFFUSERS,
        type=ModelType.MAIN,
        base=base.value,
        variant=str(variant.value),
        layout=Layout.DIFFUSERS,
        components=components,
        compatible_bases=list(base.compatible),
        rule=rule,
        rules={
            "type": rule,
            "component": denoiser.rule,
            "base": base.rule or "none",
            "variant": variant.rule or "",
        },
        confidence=min(base.confidence, variant.confidence),
        weight_variant=sorted(weight_variants)[0] if weight_variants else None,
        evidence={"pipeline": pipeline, **{k: v for k, v in evidence.items() if not isinstance(v, Base)}},
        **_totals(components),
    )
    return finish(ident, hints)
