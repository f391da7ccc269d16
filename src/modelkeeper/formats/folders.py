"""The files of a diffusers or transformers component folder, as every reader resolves them: the
orchestrator (which file to cache) and the workers (which files to load)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from modelkeeper.formats.conventions import WEIGHT_STEMS
from modelkeeper.formats.errors import InvalidModelFile, ModelFileNotFound, UnsupportedFormat
from modelkeeper.formats.pickle_sandbox import PICKLE_SUFFIXES

__all__ = ["find_weight_files", "read_json"]


def read_json(path: Path, what: str) -> dict[str, Any]:
    """The JSON object in ``path``; ModelFileNotFound or InvalidModelFile naming ``what`` and the path."""
    try:
        obj = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise ModelFileNotFound(f"{what} {path} does not exist", path=str(path)) from None
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise InvalidModelFile(f"{what} {path} is not valid JSON: {exc}", path=str(path)) from None
    if not isinstance(obj, dict):
        raise InvalidModelFile(f"{what} {path} must hold a JSON object", path=str(path))
    return obj


def find_weight_files(folder: Path, variant: str | None) -> list[Path]:
    """The safetensors weight files of a diffusers component folder (single or sharded)."""
    suffix = f".{variant}.safetensors" if variant else ".safetensors"
    for stem in WEIGHT_STEMS:
        single = folder / f"{stem}{suffix}"
        if single.exists():
            return [single]
        index = folder / f"{stem}{suffix}.index.json"
        if index.exists():
            weight_map = read_json(index, "shard index").get("weight_map")
            if not isinstance(weight_map, dict) or not weight_map:
                raise InvalidModelFile(f"shard index {index} has no weight_map", path=str(index))
            files = [folder / name for name in dict.fromkeys(str(v) for v in weight_map.values())]
            for f in files:
                if not f.exists():
                    raise ModelFileNotFound(f"shard {f} named in {index} does not exist", path=str(f))
            return files
    present = sorted(p.name for p in folder.iterdir() if p.is_file())
    if any(p.endswith(PICKLE_SUFFIXES) for p in present):
        raise UnsupportedFormat(
            f"folder {folder} holds only pickle-based weights ({', '.join(present)}); convert to safetensors first",
            path=str(folder),
        )
    wanted = f"variant {variant!r} " if variant else ""
    raise ModelFileNotFound(
        f"folder {folder} has no {wanted}safetensors weights (present: {', '.join(present) or 'nothing'})",
        path=str(folder),
    )
