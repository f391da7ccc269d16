"""Handles: the short, unique names users type for models (``ls``, ``status``, the API show them).

The scheme, for the models present (status ok):

- a model alone with its name is its name: ``dreamshaper_8``;
- models sharing a name (without case) each add what tells them apart, the first that does:
  their type (``tiny-sdxl.unet``), else the folder of their file (``tiny-sdxl@checkpoints``),
  else both (``tiny-sdxl.main@checkpoints``);
- what is still not unique, and every model not present (missing, rejected), adds the start of
  its id: ``tiny-sdxl~3fa2c1``, so a deleted copy never takes a name from a present model.

Spaces and characters a shell or a URL would need quoted (``/ ? # %`` and the like) become ``-``.
A handle resolves like an id (``Registry.resolve``); a shared bare name stays ambiguous, and the
error lists each candidate's handle. Handles follow the library: adding a second model named
``x`` turns ``x`` into ``x.lora`` and ``x.main``; ids never change.
"""

from __future__ import annotations

import os
import re
import sqlite3
from collections.abc import Iterable
from dataclasses import dataclass

__all__ = ["Named", "assign", "read_named"]

_UNSAFE = re.compile(r"[^\w.+\-]+")


@dataclass(frozen=True)
class Named:
    """What a handle is made of."""

    id: str
    name: str
    type: str
    folder: str  # the folder of the model's file ("" when unknown)
    present: bool = True


def _slug(name: str) -> str:
    return _UNSAFE.sub("-", name.strip()).strip("-") or "model"


def _id_suffix(model_id: str) -> str:
    return model_id.removeprefix("m-")[:6]


def assign(models: Iterable[Named]) -> dict[str, str]:
    """Model id -> handle; see the module docstring."""
    handles: dict[str, str] = {}
    groups: dict[str, list[Named]] = {}
    for m in models:
        if m.present:
            groups.setdefault(_slug(m.name).lower(), []).append(m)
        else:
            handles[m.id] = f"{_slug(m.name)}~{_id_suffix(m.id)}"
    for group in groups.values():
        if len(group) == 1:
            handles[group[0].id] = _slug(group[0].name)
            continue
        for m in group:
            handles[m.id] = _qualified(m, group)
    seen: dict[str, list[str]] = {}
    for model_id, handle in handles.items():
        seen.setdefault(handle.lower(), []).append(model_id)
    for ids in seen.values():
        if len(ids) > 1:  # a name qualified into another model's name: both take their id
            for model_id in ids:
                base = handles[model_id].split("~")[0]
                handles[model_id] = f"{base}~{_id_suffix(model_id)}"
    return handles


def _qualified(m: Named, group: list[Named]) -> str:
    name = _slug(m.name)
    same_type = [o for o in group if o.type == m.type]
    if len(same_type) == 1:
        return f"{name}.{m.type}"
    folder = _slug(m.folder) if m.folder else ""
    if folder and sum(1 for o in group if o.folder == m.folder) == 1:
        return f"{name}@{folder}"
    if folder and sum(1 for o in same_type if o.folder == m.folder) == 1:
        return f"{name}.{m.type}@{folder}"
    return f"{name}~{_id_suffix(m.id)}"


def read_named(conn: sqlite3.Connection) -> list[Named]:
    """Every model with what its handle is made of (the folder of its first present location)."""
    folders: dict[str, str] = {}
    for model_id, rel, root in conn.execute(
        "SELECT model_id, rel, root FROM files WHERE model_id IS NOT NULL ORDER BY model_id, status='ok' DESC, id"
    ):
        if model_id not in folders:
            parent = os.path.basename(os.path.dirname(rel.rstrip("/")))
            folders[model_id] = parent or os.path.basename(root.rstrip("/"))
    return [
        Named(model_id, name, type, folders.get(model_id, ""), status == "ok")
        for model_id, name, type, status in conn.execute("SELECT id, name, type, status FROM models")
    ]
