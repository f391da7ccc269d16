"""Sidecar files next to a model: ``.civitai.info``, ``.json`` (A1111), ``.yaml`` configs, previews.

For ``foo.safetensors`` the sidecars are ``foo.civitai.info``, ``foo.json``, ``foo.yaml`` and a
preview ``foo.png`` / ``foo.preview.png`` (or .jpg, .jpeg, .webp). Broken sidecars are ignored:
they are the user's notes, never a reason to reject the model.
"""

from __future__ import annotations

import json
import os
import re
from collections.abc import Collection
from pathlib import Path
from typing import Any

from pydantic import BaseModel, ConfigDict, Field

PREVIEW_SUFFIXES: tuple[str, ...] = (".png", ".jpg", ".jpeg", ".webp")
SIDECAR_SUFFIXES: tuple[str, ...] = (".civitai.info", ".json", ".yaml", *PREVIEW_SUFFIXES)
_MAX_SIDECAR = 4 * 1024 * 1024
_YAML_PARAMETERIZATION = re.compile(r"^\s*parameterization:\s*[\"']?(\w+)", re.MULTILINE)


class Sidecar(BaseModel):
    """What the sidecars say, normalised; ``user`` holds defaults for the registry's user metadata."""

    model_config = ConfigDict(extra="forbid")

    files: list[str] = Field(default_factory=list)
    previews: list[str] = Field(default_factory=list)
    civitai: dict[str, Any] = Field(default_factory=dict)
    a1111: dict[str, Any] = Field(default_factory=dict)
    prediction: str | None = None  # "v" / "epsilon" from an A1111 .yaml config
    user: dict[str, Any] = Field(default_factory=dict)

    @property
    def empty(self) -> bool:
        return not self.files


def _read_json(path: Path) -> Any:
    try:
        if path.stat().st_size > _MAX_SIDECAR:
            return None
        return json.loads(path.read_text(encoding="utf-8", errors="replace"))
    except (OSError, ValueError):
        return None


def _civitai(info: dict[str, Any]) -> tuple[dict[str, Any], dict[str, Any]]:
    model = info.get("model") if isinstance(info.get("model"), dict) else {}
    assert isinstance(model, dict)
    words = [str(w).strip() for w in info.get("trainedWords") or [] if str(w).strip()]
    summary = {
        "version_id": info.get("id"),
        "model_id": info.get("modelId"),
        "version_name": info.get("name"),
        "model_name": model.get("name"),
        "type": model.get("type"),
        "base_model": info.get("baseModel"),
        "trained_words": words,
    }
    user: dict[str, Any] = {}
    if model.get("name"):
        user["name"] = str(model["name"]) + (f" ({info['name']})" if info.get("name") else "")
    if info.get("description"):
        user["description"] = str(info["description"])
    if words:
        user["trigger_words"] = words
    if info.get("modelId"):
        url = f"https://civitai.com/models/{info['modelId']}"
        user["source_url"] = url + (f"?modelVersionId={info['id']}" if info.get("id") else "")
    tags = model.get("tags")
    if isinstance(tags, list):
        user["tags"] = [str(t) for t in tags]
    return {k: v for k, v in summary.items() if v not in (None, [], "")}, user


def _a1111(data: dict[str, Any]) -> tuple[dict[str, Any], dict[str, Any]]:
    keep = ("description", "sd version", "activation text", "preferred weight", "negative text", "notes")
    summary = {k: data[k] for k in keep if data.get(k) not in (None, "")}
    user: dict[str, Any] = {}
    if summary.get("description"):
        user["description"] = str(summary["description"])
    if summary.get("activation text"):
        user["trigger_words"] = [w.strip() for w in str(summary["activation text"]).split(",") if w.strip()]
    if summary.get("preferred weight"):
        try:
            user["default_settings"] = {"lora_weight": float(summary["preferred weight"])}
        except (TypeError, ValueError):
            pass
    return summary, user


_CANDIDATE_SUFFIXES = (*SIDECAR_SUFFIXES, *(".preview" + s for s in PREVIEW_SUFFIXES))
_PREVIEWS = (*PREVIEW_SUFFIXES, *(".preview" + s for s in PREVIEW_SUFFIXES))


def read_sidecars(
    model_path: str | os.PathLike[str], siblings: Collection[str] | None = None, *, is_dir: bool | None = None
) -> Sidecar:
    """Sidecars of ``model_path``; ``siblings`` (names in its folder) and ``is_dir`` save system
    calls when the caller knows them."""
    spath = os.fspath(model_path)
    name = os.path.basename(spath.rstrip(os.sep))
    if is_dir is None:
        is_dir = os.path.isdir(spath)
    stem = name if is_dir else os.path.splitext(name)[0]
    if siblings is None:
        try:
            siblings = set(os.listdir(os.path.dirname(spath.rstrip(os.sep)) or "."))
        except OSError:
            siblings = set()
    if not any(stem + suffix in siblings for suffix in _CANDIDATE_SUFFIXES):
        return Sidecar()
    parent = Path(spath).parent
    found = Sidecar()
    user: dict[str, Any] = {}
    for suffix in _PREVIEWS:
        if stem + suffix in siblings:
            found.previews.append(str(parent / (stem + suffix)))
            found.files.append(stem + suffix)
    if stem + ".json" in siblings:
        data = _read_json(parent / (stem + ".json"))
        if isinstance(data, dict):
            found.files.append(stem + ".json")
            found.a1111, more = _a1111(data)
            user.update(more)
    if stem + ".civitai.info" in siblings:
        info = _read_json(parent / (stem + ".civitai.info"))
        if isinstance(info, dict):
            found.files.append(stem + ".civitai.info")
            found.civitai, more = _civitai(info)
            user.update({k: v for k, v in more.items() if k not in user or k == "name"})
    if stem + ".yaml" in siblings:
        try:
            text = (parent / (stem + ".yaml")).read_text(encoding="utf-8", errors="replace")[:_MAX_SIDECAR]
        except OSError:
            text = ""
        if m := _YAML_PARAMETERIZATION.search(text):
            found.files.append(stem + ".yaml")
            found.prediction = "v" if m.group(1).lower() in ("v", "v_prediction") else "epsilon"
    found.user = user
    return found
