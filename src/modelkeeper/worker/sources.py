"""Where a component's weights and config come from: a diffusers folder or a single file.

A request names a path; this module turns it into a :class:`ComponentSource` (weight files,
config and where the config came from) or raises an error that names the path and the problem.
Only headers and small JSON files are read here.

A single file's config, in order: a config dict in the request (the file's own, as the
orchestrator reads it from the metadata, or the caller's), a path to a ``config.json``, the file's
``modelkeeper.config`` metadata, a known base component named in the request (``sdxl/unet``). The
last is a guess from the base alone, as is having no config at all: such a config is fitted to the
file's tensor shapes (``fit_to_shapes``, once the worker knows the layout) so that pruned or shrunk
variants of a base load with the architecture their shapes imply.
"""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from modelkeeper.formats.conventions import CONFIG_METADATA_KEY, SAFETENSORS_SUFFIXES
from modelkeeper.formats.errors import InvalidModelFile, ModelFileNotFound, UnsupportedFormat
from modelkeeper.formats.folders import find_weight_files, read_json
from modelkeeper.formats.pickle_sandbox import PICKLE_SUFFIXES
from modelkeeper.formats.shape_configs import fit_config
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
    #: The config is a guess (its base's known config, or none): the file's shapes decide its architecture.
    config_guessed: bool = False

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
    config, origin, guessed = _single_file_config(path, request)
    return ComponentSource(kind, path, "single_file", [path], config, origin, request.layout, guessed)


def fit_to_shapes(source: ComponentSource, layout_rule: str, shapes: Mapping[str, Sequence[int]]) -> None:
    """Fit a guessed config (``config_guessed``) to the shapes of the file's component tensors
    (keys relative to its prefix, in the layout of the worker's rule ``layout_rule``); a config
    the file or the caller gave is left as it is. Raises INVALID_REQUEST when there is no config
    and the shapes do not give one."""
    if not source.config_guessed:
        return
    fitted = fit_config(layout_rule, shapes, source.config)
    if fitted.changed:
        source.config = fitted.config
        source.config_origin = (
            f"{source.config_origin} fitted to the file's shapes"
            if source.config_origin
            else "the file's shapes"
        )
    if not source.config:
        raise InvalidRequest(
            f"data.config: single file {source.path} carries no config and its shapes do not give one "
            f"({layout_rule}); pass a config dict, a path to a config.json or a folder, or a known base "
            "component such as 'sdxl/unet'",
            path=str(source.path),
        )


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


def _single_file_config(path: Path, request: LoadRequest) -> tuple[dict[str, Any], str, bool]:
    """(config, where it came from, whether it is a guess to fit to the shapes): see the module docstring."""
    if isinstance(request.config, dict):
        return request.config, "request", False
    known: dict[str, Any] | None = None
    if isinstance(request.config, str):
        config, is_file = _config_from_reference(request.config)
        if is_file:
            return config, f"request:{request.config}", False
        known = config
    own = _metadata_config(path)
    if own is not None:
        return own, "file metadata", False
    if known is not None:
        return known, f"request:{request.config}", True
    return {}, "", True


def _metadata_config(path: Path) -> dict[str, Any] | None:
    """The component config in the file's ``modelkeeper.config`` metadata (a full checkpoint's
    pipeline config is split per component by the orchestrator, not here)."""
    from modelkeeper.worker.weights import file_metadata

    meta = file_metadata(path)
    if CONFIG_METADATA_KEY not in meta:
        return None
    try:
        cfg = json.loads(meta[CONFIG_METADATA_KEY])
    except json.JSONDecodeError as exc:
        raise InvalidModelFile(
            f"{path}: metadata {CONFIG_METADATA_KEY} is not JSON: {exc}", path=str(path)
        ) from None
    if not isinstance(cfg, dict) or str(cfg.get("_class_name", "")).endswith("Pipeline"):
        return None
    return cfg


def _config_from_reference(ref: str) -> tuple[dict[str, Any], bool]:
    """The config ``ref`` names, and whether it is a file (else a known base component)."""
    candidate = Path(ref).expanduser()
    if candidate.is_dir():
        return read_json(candidate / "config.json", "config"), True
    if candidate.suffix == ".json" or candidate.exists():
        return read_json(candidate, "config"), True
    base, sep, component = ref.partition("/")
    if not sep:
        raise InvalidRequest(
            f"data.config: {ref!r} is neither a file nor a known base component like 'sdxl/unet'"
        )
    from modelkeeper.formats.known_configs import load_known_config

    try:
        return dict(load_known_config(base, component)), False
    except KeyError as exc:
        raise InvalidRequest(f"data.config: {exc.args[0] if exc.args else ref}") from None
