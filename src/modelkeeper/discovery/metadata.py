"""Metadata a file already carries: safetensors ``__metadata__`` (modelspec, kohya ``ss_*``).

:func:`summarize_metadata` keeps what a person or the registry can use (titles, trigger phrases,
training settings, the most frequent training tags) and drops the bulky parts (thumbnails, full
dataset listings). :func:`metadata_evidence` turns it into evidence for the rule tables.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from typing import Any

from modelkeeper.discovery.records import Base, ModelType
from modelkeeper.discovery.rules.components import METADATA_BASES
from modelkeeper.discovery.rules.configs import CONFIG_EVIDENCE
from modelkeeper.formats.conventions import CONFIG_METADATA_KEY

_MAX_VALUE = 2000
_TOP_TAGS = 20

#: kohya sd-scripts fields worth keeping, as they are named in the file.
KOHYA_FIELDS: tuple[str, ...] = (
    "ss_network_module",
    "ss_network_dim",
    "ss_network_alpha",
    "ss_network_args",
    "ss_base_model_version",
    "ss_sd_model_name",
    "ss_output_name",
    "ss_training_comment",
    "ss_v2",
    "ss_v_parameterization",
    "ss_resolution",
    "ss_num_train_images",
    "ss_num_epochs",
    "ss_learning_rate",
    "ss_training_started_at",
)

#: Keys whose values name a base model.
BASE_KEYS: tuple[str, ...] = ("modelspec.architecture", "ss_base_model_version", "civitai.base_model")


def _parse_tags(raw: str) -> list[str]:
    """Most frequent tags of kohya's ``ss_tag_frequency`` ({dataset: {tag: count}})."""
    try:
        freq = json.loads(raw)
    except json.JSONDecodeError:
        return []
    counts: dict[str, int] = {}
    if isinstance(freq, dict):
        for tags in freq.values():
            if isinstance(tags, dict):
                for tag, n in tags.items():
                    if isinstance(n, int):
                        counts[str(tag).strip()] = counts.get(str(tag).strip(), 0) + n
    return [t for t, _ in sorted(counts.items(), key=lambda kv: (-kv[1], kv[0]))[:_TOP_TAGS]]


def summarize_metadata(meta: Mapping[str, str]) -> dict[str, Any]:
    """``{"modelspec": {...}, "kohya": {...}, "other": {...}}`` with only the parts present."""
    out: dict[str, dict[str, Any]] = {}
    for key, value in meta.items():
        if key.startswith("modelspec."):
            if key == "modelspec.thumbnail":
                continue
            out.setdefault("modelspec", {})[key.removeprefix("modelspec.")] = value[:_MAX_VALUE]
        elif key == "ss_tag_frequency":
            tags = _parse_tags(value)
            if tags:
                out.setdefault("kohya", {})["top_tags"] = tags
        elif key in KOHYA_FIELDS:
            out.setdefault("kohya", {})[key.removeprefix("ss_")] = value[:_MAX_VALUE]
        elif not key.startswith("ss_") and len(value) <= 200:
            out.setdefault("other", {})[key] = value
    return dict(out)


def base_from_text(text: str) -> Base | None:
    low = text.lower()
    for needle, base in METADATA_BASES:
        if needle in low:
            return base
    return None


def metadata_evidence(
    meta: Mapping[str, str], tensor_names: Mapping[str, object] | None = None
) -> dict[str, Any]:
    """Evidence for the rule tables: ``meta_base``, ``meta_prediction``, ``v_pred_marker``."""
    evidence: dict[str, Any] = {}
    for key in BASE_KEYS:
        if key in meta and (base := base_from_text(meta[key])) is not None:
            evidence["meta_base"] = base
            break
    pred = (meta.get("modelspec.prediction_type") or "").lower()
    if pred in ("v", "v_prediction", "v-prediction"):
        evidence["meta_prediction"] = "v"
    elif pred in ("epsilon", "eps"):
        evidence["meta_prediction"] = "epsilon"
    elif (meta.get("ss_v_parameterization") or "").lower() == "true":
        evidence["meta_prediction"] = "v"
    if tensor_names is not None:
        evidence["v_pred_marker"] = "v_pred" in tensor_names
    evidence.update(embedded_vae_evidence(meta))
    return evidence


def embedded_vae_evidence(meta: Mapping[str, str]) -> dict[str, Any]:
    """What a VAE's own config says where its shapes cannot (``CONFIG_EVIDENCE`` of a VAE: the
    ``scaling_factor`` that tells an SD1 from an SDXL VAE), when the file carries that config in
    its ``modelkeeper.config`` metadata (modelkeeper's demo models and converted files). No field
    is defaulted: a config that leaves it out says nothing."""
    raw = meta.get(CONFIG_METADATA_KEY)
    if not raw or "scaling_factor" not in raw:
        return {}
    try:
        config = json.loads(raw)
    except json.JSONDecodeError:
        return {}
    if not isinstance(config, dict) or config.get("_class_name") != "AutoencoderKL":
        return {}
    evidence: dict[str, Any] = {}
    for name, fields in CONFIG_EVIDENCE[ModelType.VAE].items():
        value = next((config[f] for f in fields if isinstance(config.get(f), int | float)), None)
        if value is not None and name != "latent_channels":  # the shapes measure that one
            evidence[name] = value
    return evidence
