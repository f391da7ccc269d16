"""Where a component's weights and config come from: a diffusers folder or a single file.

A request names a path; this module turns it into a :class:`ComponentSource` (weight files,
config and where the config came from) or raises an error that names the path and the problem.
Only headers and small JSON files are read here.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from modelkeeper.formats.conventions import CONFIG_METADATA_KEY, SAFETENSORS_SUFFIXES
from modelkeeper.formats.errors import InvalidModelFile, ModelFileNotFound, UnsupportedFormat
from modelkeeper.formats.folders import find_weight_files, read_json
from modelkeeper.formats.pickle_sandbox import PICKLE_SUFFIXES
from modelkeeper.protocol.messages import KeyLayout, LoadRequest, ModelKind
from modelkeeper.worker.errors import InvalidRequest

#: Subfolders of a diffusers pipeline that hold each kind, in order of preference.
PIPELINE_SUBFOLDERS: dict[ModelKind, tuple[str, ...]] = {
    ModelKind.UNET: ("unet",),
    ModelKind.TRANSFORMER: ("transformer",),
    ModelKind.VAE: ("vae",),
    ModelKind.CONTROLNET: ("controlnet",),
    ModelKind.TEXT_ENCODER: ("text_encoder", "text_encoder_2", "text_encoder_3"),
    ModelKind.TOKENIZER: ("tokenizer", "tokenizer_2", "tokenizer_3"),
}

TOKENIZER_FILES = ("tokenizer_config.json", "tokenizer.json", "vocab.json", "spiece.model")


@dataclass
class ComponentSource:
    kind: ModelKind
    path: Path
    format: str  # "diffusers_folder" or "single_file"
    files: list[Path] = field(default_factory=list)
    config: dict[str, Any] | None = None
    config_origin: str = ""
    layout: KeyLayout = KeyLayout.AUTO

    def describe(self) -> dict[str, Any]:
        return {
            "path": str(self.path),
            "format": self.format,
            "files": [str(f) for f in self.files],
            "config_origin": self.config_origin,
            "layout": self.layout.value,
        }


def normalise_kind(value: ModelKind | str | None, default: ModelKind | None) -> ModelKind:
    if value is None:
        if default is None:
            raise InvalidRequest("data.type: required for model.load_model (unet, vae, text_encoder, ...)")
        return default
    if value == "encoder":
        return ModelKind.TEXT_ENCODER
    return ModelKind(value)


def resolve(request: LoadRequest, kind: ModelKind) -> ComponentSource:
    """Find the folder or file, the weight files and the config for ``kind``."""
    path = Path(request.path).expanduser()
    if not path.exists():
        raise ModelFileNotFound(f"data.path: {path} does not exist", path=str(path))
    if path.is_dir():
        folder = _component_folder(path, kind, request)
        if kind is ModelKind.TOKENIZER:
            return ComponentSource(kind, folder, "diffusers_folder", config_origin="tokenizer files")
        config = read_json(folder / "config.json", "config") if (folder / "config.json").exists() else None
        if config is None:
            raise ModelFileNotFound(f"folder {folder} has no config.json", path=str(folder))
        files = find_weight_files(folder, request.variant)
        return ComponentSource(
            kind, folder, "diffusers_folder", files, config, "config.json", KeyLayout.DIFFUSERS
        )
    if kind is ModelKind.TOKENIZER:
        raise UnsupportedFormat(
            f"data.path: {path} is a file; a tokenizer is loaded from a folder", path=str(path)
        )
    suffix = path.suffix.lower()
    if suffix in PICKLE_SUFFIXES:
        raise UnsupportedFormat(
            f"{path}: pickle-based {suffix} files are not loaded directly; convert to safetensors first",
            path=str(path),
        )
    if suffix not in (*SAFETENSORS_SUFFIXES, ".gguf"):
        raise UnsupportedFormat(
            f"{path}: unknown file type {suffix!r}; expected .safetensors or .gguf", path=str(path)
        )
    config, origin = _single_file_config(path, request)
    return ComponentSource(kind, path, "single_file", [path], config, origin, request.layout)


def _component_folder(path: Path, kind: ModelKind, request: LoadRequest) -> Path:
    if request.subfolder:
        folder = path / request.subfolder
        if not folder.is_dir():
            raise ModelFileNotFound(f"data.subfolder: {folder} is not a folder", path=str(folder))
        return folder
    if not (path / "model_index.json").exists():
        return path
    candidates = [path / name for name in PIPELINE_SUBFOLDERS.get(kind, ()) if (path / name).is_dir()]
    if not candidates:
        raise ModelFileNotFound(
            f"pipeline folder {path} has no {kind.value} component (looked for {', '.join(PIPELINE_SUBFOLDERS.get(kind, ()))})",
            path=str(path),
        )
    if request.encoder and kind in (ModelKind.TEXT_ENCODER, ModelKind.TOKENIZER):
        for folder in candidates:
            encoder_folder = path / folder.name.replace("tokenizer", "text_encoder")
            cfg_path = encoder_folder / "config.json"
            if cfg_path.exists() and encoder_matches(read_json(cfg_path, "config"), request.encoder):
                return folder
        raise ModelFileNotFound(
            f"pipeline folder {path} has no text encoder matching {request.encoder!r}", path=str(path)
        )
    return candidates[0]


def encoder_matches(config: dict[str, Any], hint: str) -> bool:
    """Whether a text-encoder config is the encoder named by ``hint`` (clip_l, clip_g, clip_h, t5)."""
    model_type = config.get("model_type", "")
    hidden = config.get("hidden_size", config.get("d_model"))
    if hint.startswith("t5"):
        return bool(model_type == "t5")
    if model_type != "clip_text_model" and not str(model_type).startswith("clip"):
        return False
    widths = {"clip_l": 768, "clip_h": 1024, "clip_g": 1280}
    return hint not in widths or hidden == widths[hint] or (hint == "clip_l" and hidden not in (1024, 1280))


def _single_file_config(path: Path, request: LoadRequest) -> tuple[dict[str, Any], str]:
    if isinstance(request.config, dict):
        return request.config, "request"
    if isinstance(request.config, str):
        return _config_from_reference(request.config), f"request:{request.config}"
    from modelkeeper.worker.weights import file_metadata

    meta = file_metadata(path)
    if CONFIG_METADATA_KEY in meta:
        try:
            cfg = json.loads(meta[CONFIG_METADATA_KEY])
        except json.JSONDecodeError as exc:
            raise InvalidModelFile(
                f"{path}: metadata {CONFIG_METADATA_KEY} is not JSON: {exc}", path=str(path)
            ) from None
        if isinstance(cfg, dict):
            return cfg, "file metadata"
    raise InvalidRequest(
        f"data.config: single file {path} carries no config; pass a config dict, a path to a config.json "
        "or a folder, or a known base component such as 'sdxl/unet'",
        path=str(path),
    )


def _config_from_reference(ref: str) -> dict[str, Any]:
    candidate = Path(ref).expanduser()
    if candidate.is_dir():
        return read_json(candidate / "config.json", "config")
    if candidate.suffix == ".json" or candidate.exists():
        return read_json(candidate, "config")
    base, sep, component = ref.partition("/")
    if not sep:
        raise InvalidRequest(
            f"data.config: {ref!r} is neither a file nor a known base component like 'sdxl/unet'"
        )
    from modelkeeper.formats.known_configs import load_known_config

    try:
        return dict(load_known_config(base, component))
    except KeyError as exc:
        raise InvalidRequest(f"data.config: {exc.args[0] if exc.args else ref}") from None
