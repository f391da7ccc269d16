"""Configs of the known base models, shipped inside the package.

Nothing is fetched from a model hub at run time, so the diffusers / transformers configs of the
bases that identification and assembly need live here as small JSON files, one folder per base:

    configs/index.json                    base -> family, variant, source repository
    configs/<base>/model_index.json       the pipeline's model_index.json
    configs/<base>/<component>.json       unet / transformer / vae / text_encoder[_2|_3] / scheduler

Each file is the official Hugging Face file of the source repository with its bookkeeping keys
removed (``BOOKKEEPING_KEYS``: versions of the saving library, the saver's local path, the dtype the
weights happened to be uploaded in); everything that decides the architecture or the schedule is kept
as published. A diffusers config names its class in ``_class_name``, a transformers config in
``architectures[0]``, so a caller can build the module (on the meta device, say) from the config alone.

Every function returns a fresh copy: callers may mutate what they get.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from functools import cache
from importlib import resources
from importlib.resources.abc import Traversable
from typing import Any

__all__ = [
    "BOOKKEEPING_KEYS",
    "KnownBase",
    "UnknownConfigError",
    "known_base",
    "known_bases",
    "known_components",
    "load_known_config",
    "model_index",
]

BOOKKEEPING_KEYS = frozenset({"_diffusers_version", "_name_or_path", "transformers_version", "torch_dtype"})
"""Keys of the published files that are not shipped: they describe the upload, not the model."""

_PACKAGE = "modelkeeper.formats"
_CONFIG_DIR = "configs"
_INDEX_FILE = "index.json"
_MODEL_INDEX = "model_index"
_SUFFIX = ".json"


class UnknownConfigError(KeyError):
    """No shipped config for that base or component; the message lists the known ones.

    A ``KeyError`` so that a caller treating the configs as a mapping can catch it as one.
    """

    def __init__(self, message: str) -> None:
        super().__init__(message)
        self.message = message

    def __str__(self) -> str:
        return self.message


@dataclass(frozen=True, slots=True)
class KnownBase:
    """A base whose configs ship with the package.

    ``family`` is the base as identification names it (``sd1``, ``sd2``, ``sdxl``, ``sdxl_refiner``,
    ``sd3``, ``flux``); ``variant`` tells apart bases of one family (``inpaint``, ``768-v``, ``dev``);
    ``repo`` is the Hugging Face repository the configs come from.
    """

    name: str
    family: str
    variant: str | None
    repo: str
    components: tuple[str, ...]


def known_bases() -> list[str]:
    """Names of the bases with shipped configs, sorted."""
    return sorted(_catalogue())


def known_base(base: str) -> KnownBase:
    """The description of one known base; ``UnknownConfigError`` if there is none."""
    return _entry(base)


def known_components(base: str) -> list[str]:
    """Components of ``base`` with a shipped config (``unet``, ``vae``, ``scheduler`` ...), sorted.

    The pipeline's ``model_index.json`` is not a component: read it with ``model_index``.
    """
    return list(_entry(base).components)


def load_known_config(base: str, component: str) -> dict[str, Any]:
    """A fresh copy of the config of ``component`` of ``base``.

    Raises ``UnknownConfigError`` (a ``KeyError``) naming the base or component asked for and
    listing the known ones.
    """
    entry = _entry(base)
    if component not in entry.components:
        raise UnknownConfigError(
            f"base {base!r} has no known config for component {component!r}; "
            f"its components are: {', '.join(entry.components)}"
        )
    return _load(base, component)


def model_index(base: str) -> dict[str, Any]:
    """A fresh copy of the ``model_index.json`` of ``base``'s diffusers pipeline."""
    _entry(base)
    return _load(base, _MODEL_INDEX)


def _entry(base: str) -> KnownBase:
    catalogue = _catalogue()
    try:
        return catalogue[base]
    except KeyError:
        raise UnknownConfigError(
            f"no known configs for base {base!r}; known bases are: {', '.join(sorted(catalogue))}"
        ) from None


def _root() -> Traversable:
    return resources.files(_PACKAGE).joinpath(_CONFIG_DIR)


def _load(base: str, name: str) -> dict[str, Any]:
    # json.loads of the cached text hands every caller its own copy.
    return _as_object(json.loads(_read_text(base, name)), f"{base}/{name}{_SUFFIX}")


@cache
def _read_text(base: str, name: str) -> str:
    return _root().joinpath(base, name + _SUFFIX).read_text(encoding="utf-8")


@cache
def _catalogue() -> dict[str, KnownBase]:
    root = _root()
    index = _as_object(json.loads(root.joinpath(_INDEX_FILE).read_text(encoding="utf-8")), _INDEX_FILE)
    catalogue: dict[str, KnownBase] = {}
    for name, raw in index.items():
        info = _as_object(raw, f"{_INDEX_FILE}[{name!r}]")
        folder = root.joinpath(name)
        components = tuple(
            sorted(
                item.name.removesuffix(_SUFFIX)
                for item in folder.iterdir()
                if item.is_file() and item.name.endswith(_SUFFIX) and item.name != _MODEL_INDEX + _SUFFIX
            )
        )
        variant = info.get("variant")
        catalogue[name] = KnownBase(
            name=name,
            family=str(info["family"]),
            variant=None if variant is None else str(variant),
            repo=str(info["repo"]),
            components=components,
        )
    return catalogue


def _as_object(value: object, where: str) -> dict[str, Any]:
    if not isinstance(value, dict):
        raise TypeError(f"shipped config {where} is not a JSON object")
    return value
