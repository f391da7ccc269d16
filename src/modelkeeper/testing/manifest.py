"""The demo set's ``manifest.json``: what each written file or folder is, as ground truth for tests.

One entry per model file or folder. Field by field (``None`` / empty where it does not apply):

- ``name``: unique id (``sd15-checkpoint``); ``path``: relative POSIX path under the demo root.
- ``type``: ``main`` | ``unet`` | ``transformer`` | ``vae`` | ``text_encoder`` | ``lora``
  | ``textual_inversion`` | ``tokenizer``.
- ``base``: ``sd1`` | ``sd2`` | ``sdxl`` | ``sdxl_refiner`` | ``sd3`` | ``flux``; ``also_bases``: other bases
  the same tensors fit equally (a VAE's shapes do not tell SD1 from SDXL, nor Flux from SD3).
- ``variant``: ``normal`` | ``inpaint``.
- ``format``: ``safetensors`` or ``gguf`` (one file) | ``diffusers`` (a folder with ``config.json`` or
  ``model_index.json``) | ``tokenizer`` (a tokenizer folder).
- ``layout``: single component files ``diffusers`` | ``original``; checkpoints ``original``; LoRAs ``kohya``
  | ``peft`` | ``loha`` | ``lokr``; embeddings ``a1111`` | ``diffusers`` | ``sdxl``; folders ``diffusers``.
- ``encoder``: ``clip_l`` | ``clip_g`` | ``clip_h`` | ``t5`` for a text encoder; ``components``: what a main
  model holds (``unet``, ``vae``, encoder names), or what a LoRA patches (``unet``, ``text_encoder``...).
- ``class_name``: the diffusers / transformers class that loads it (pipeline class for main models).
- ``prefix``: the key prefix of a single-component file (``model.diffusion_model.``, or ``""``).
- ``config_metadata``: whether the file carries the ``modelkeeper.config`` metadata entry.
- ``config``: the component's ``config.json`` (for main models ``{"_class_name": pipeline, "unet": ...}``),
  so tests can hand it to a loader explicitly; None for LoRAs, embeddings and tokenizers.
- ``dtype``: the stored floating dtype of the (main) weights; ``weights_variants``: diffusers variants
  present (``fp16``); ``quant``: the packed form scan reports (``float8_e4m3fn``,
  ``scaled_float8_e4m3fn``, a GGUF type such as ``Q4_K``), None for plain floats.
- ``prediction_type``: ``epsilon`` | ``v_prediction`` where the model says so (scheduler config).
- ``dims``: the discriminating dimensions (``cross_attention_dim``, ``in_channels``, ``latent_channels``,
  ``hidden_size``, ``projection_dim``, ``addition_embed_input_dim``, ``rank``, ``vectors``...).
- ``trigger_words``, ``token``: a LoRA's trigger words; a diffusers embedding's token.
- ``tensor_count``, ``size_bytes``, ``sha256``: of the file (``size_bytes`` summed over a folder;
  ``tensor_count`` and ``sha256`` for single files only).
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Any, Literal

ModelType = Literal[
    "main", "unet", "transformer", "vae", "text_encoder", "lora", "textual_inversion", "tokenizer"
]
EntryFormat = Literal["safetensors", "gguf", "diffusers", "tokenizer"]

MANIFEST_NAME = "manifest.json"
MANIFEST_VERSION = 1


@dataclass(frozen=True)
class DemoEntry:
    """One written model: see the module docstring for every field."""

    name: str
    path: str
    type: ModelType
    base: str | None
    format: EntryFormat
    layout: str
    variant: str = "normal"
    also_bases: tuple[str, ...] = ()
    encoder: str | None = None
    components: tuple[str, ...] = ()
    class_name: str | None = None
    prefix: str | None = None
    config_metadata: bool = False
    config: dict[str, Any] | None = None
    dtype: str | None = None
    quant: str | None = None
    weights_variants: tuple[str, ...] = ()
    prediction_type: str | None = None
    dims: dict[str, int] = field(default_factory=dict)
    trigger_words: tuple[str, ...] = ()
    token: str | None = None
    tensor_count: int | None = None
    size_bytes: int = 0
    sha256: str | None = None

    def to_json(self) -> dict[str, Any]:
        """The entry as plain JSON types (tuples become lists)."""
        return asdict(self)

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> DemoEntry:
        """Read an entry written by :meth:`to_json` (unknown keys are an error)."""
        names = {f.name for f in fields(cls)}
        unknown = set(data) - names
        if unknown:
            raise ValueError(f"unknown manifest entry fields: {sorted(unknown)}")
        values: dict[str, Any] = {k: tuple(v) if isinstance(v, list) else v for k, v in data.items()}
        return cls(**values)


@dataclass(frozen=True)
class DemoManifest:
    """Every entry of a demo set, and the root they are relative to."""

    root: Path
    entries: tuple[DemoEntry, ...]
    seed: int = 0
    version: int = MANIFEST_VERSION

    def __getitem__(self, name: str) -> DemoEntry:
        for entry in self.entries:
            if entry.name == name:
                return entry
        raise KeyError(name)

    def __contains__(self, name: object) -> bool:
        return any(entry.name == name for entry in self.entries)

    def __iter__(self) -> Iterator[DemoEntry]:
        return iter(self.entries)

    def __len__(self) -> int:
        return len(self.entries)

    def path(self, name: str) -> Path:
        """The absolute path of entry ``name``."""
        return self.root / self[name].path

    def select(self, **criteria: Any) -> list[DemoEntry]:
        """The entries whose fields equal every criterion, e.g. ``select(type="lora", base="sd1")``."""
        return [e for e in self.entries if all(getattr(e, k) == v for k, v in criteria.items())]

    @property
    def total_bytes(self) -> int:
        return sum(entry.size_bytes for entry in self.entries)

    def to_json(self) -> dict[str, Any]:
        return {
            "version": self.version,
            "generator": "modelkeeper.testing",
            "seed": self.seed,
            "total_bytes": self.total_bytes,
            "entries": [entry.to_json() for entry in self.entries],
        }

    def write(self) -> Path:
        """Write ``manifest.json`` into the root."""
        target = self.root / MANIFEST_NAME
        target.write_text(json.dumps(self.to_json(), indent=1, sort_keys=False) + "\n", encoding="utf-8")
        return target

    @classmethod
    def load(cls, root: Path) -> DemoManifest:
        """Read ``root/manifest.json`` (``root`` may also be the manifest file itself)."""
        path = root if root.is_file() else root / MANIFEST_NAME
        data = json.loads(path.read_text(encoding="utf-8"))
        if data.get("version") != MANIFEST_VERSION:
            raise ValueError(f"{path}: manifest version {data.get('version')!r}, expected {MANIFEST_VERSION}")
        entries = tuple(DemoEntry.from_json(item) for item in data["entries"])
        return cls(root=path.parent, entries=entries, seed=int(data.get("seed", 0)))


__all__ = ["MANIFEST_NAME", "MANIFEST_VERSION", "DemoEntry", "DemoManifest", "EntryFormat", "ModelType"]
