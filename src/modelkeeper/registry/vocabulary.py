"""The words users type for a listing's filters, mapped to the registry's values.

``ls --type checkpoints``, ``--type loras``, ``--base SDXL``, ``--base sd1.5``: a filter value is
compared without case, spaces, ``-``, ``_`` or ``.``, and a trailing plural ``s`` is dropped, then
looked up among the field's values and their aliases (the names of ComfyUI's and A1111's folders,
the common abbreviations). An unknown value is refused with the list of what is taken, the values
and the aliases (:class:`~modelkeeper.registry.errors.InvalidFilter`), never answered with an
empty page.
"""

from __future__ import annotations

import re

from modelkeeper.discovery.records import Base, ModelFormat, ModelType
from modelkeeper.registry.errors import InvalidFilter

__all__ = ["ALIASES", "VALUES", "normalize", "squash"]

#: Field -> its values, as stored.
VALUES: dict[str, tuple[str, ...]] = {
    "type": tuple(t.value for t in ModelType),
    "base": tuple(b.value for b in Base),
    "format": tuple(f.value for f in ModelFormat),
    "status": ("ok", "missing"),
}

#: Field -> {word users type (squashed): value}. Plurals need no entry (a trailing "s" is dropped).
ALIASES: dict[str, dict[str, str]] = {
    "type": {
        "checkpoint": "main",
        "ckpt": "main",
        "model": "main",
        "stablediffusion": "main",
        "pipeline": "main",
        "dit": "transformer",
        "autoencoder": "vae",
        "ae": "vae",
        "te": "text_encoder",
        "clip": "text_encoder",
        "encoder": "text_encoder",
        "lycoris": "lora",
        "locon": "lora",
        "loha": "lora",
        "lokr": "lora",
        "cn": "controlnet",
        "embedding": "textual_inversion",
        "ti": "textual_inversion",
    },
    "base": {
        "sd15": "sd1",
        "sd14": "sd1",
        "sd1x": "sd1",
        "sdv15": "sd1",
        "stablediffusion15": "sd1",
        "sd20": "sd2",
        "sd21": "sd2",
        "sd2x": "sd2",
        "xl": "sdxl",
        "sdxl10": "sdxl",
        "sdxlbase": "sdxl",
        "refiner": "sdxl_refiner",
        "sd30": "sd3",
        "sd35": "sd3",
        "sd3medium": "sd3",
        "sd3large": "sd3",
        "sd35medium": "sd3",
        "sd35large": "sd3",
        "flux1": "flux",
        "fluxdev": "flux",
        "fluxschnell": "flux",
    },
    "format": {
        "sft": "safetensors",
        "ckpt": "pickle",
        "pt": "pickle",
        "pth": "pickle",
        "bin": "pickle",
        "folder": "diffusers",
    },
    "status": {"present": "ok", "gone": "missing"},
}

_SEPARATORS = re.compile(r"[\s_.\-]+")


def squash(text: str) -> str:
    """``text`` lowercased, without spaces, ``_``, ``-`` or ``.``: what a typed word is compared by."""
    return _SEPARATORS.sub("", text.lower())


def _table(field: str) -> dict[str, str]:
    table = {squash(v): v for v in VALUES[field]}
    table.update(ALIASES.get(field, {}))
    return table


def normalize(field: str, value: str | None) -> str | None:
    """The stored value ``value`` means for ``field`` (``None`` and ``""``: no filter).
    Raises InvalidFilter naming the field and its valid values."""
    if value is None or not value.strip():
        return None
    table = _table(field)
    word = squash(value)
    found = table.get(word)
    if found is None and word.endswith("s"):
        found = table.get(word[:-1])
    if found is None:
        valid = VALUES[field]
        aliases = ALIASES.get(field, {})
        also = f"; also {', '.join(aliases)} (plurals too)" if aliases else ""
        raise InvalidFilter(
            f"{field}: unknown value {value!r}; one of {', '.join(valid)}{also}",
            field=field,
            value=value,
            valid=list(valid),
            aliases=aliases,
        )
    return found
