"""API errors said in the command line's words.

The service answers a request it cannot validate with pydantic's locations and messages
(``body.offload.literal['none','auto']: Input should be 'none' or 'auto'``); a user typed
``--offload 1GB``. :func:`invalid_fields` names the option and what it takes instead. A model
reference the service does not know gets the close handles and names of its listing
(:func:`close_models`), as ``modelkeeper lod`` gets ``load``; a path gets the reminder that paths
are relative to the service's model roots.
"""

from __future__ import annotations

import difflib
import os
import re
from collections.abc import Iterable
from pathlib import Path
from typing import Any

#: What each request field is called on the command line, and what it takes.
OPTIONS: dict[str, tuple[str, str]] = {
    "offload": ("--offload", "none, auto or a size like 4GB"),
    "dtype": ("--dtype", "float32, float16 or bfloat16"),
    "storage_dtype": ("--storage-dtype", "float8_e4m3fn or float8_e5m2"),
    "priority": ("--priority", "low, normal, high or critical"),
    "state": ("--state", "queued, running, succeeded, failed or cancelled"),
    "sha256": ("--sha256", "64 hex digits"),
    "level": ("--level", "header, weights or functional"),
    "keep_alive": ("--keep-alive", "seconds (0: as soon as unused, -1: never)"),
    "timeout_seconds": ("--timeout", "seconds, more than 0"),
    "strength": ("strength", "a finite number"),
    "device_id": ("--device", "a device id such as cpu or cuda:0"),
    "model_type": ("--type", "a model type such as checkpoint, lora or vae"),
    "target_free_mb": ("--target-mb", "a number of MB, 0 or more"),
}
_PATTERN = re.compile(r"String should match pattern '.*'$")


def invalid_fields(errors: Iterable[dict[str, Any]]) -> list[str]:
    """One line per field of a 422's ``details.errors`` (``loc``, ``msg``), in CLI words:
    ``--offload: expected none, auto or a size like 4GB``."""
    lines: dict[str, str] = {}
    for error in errors:
        loc = [str(p) for p in error.get("loc") or []]
        if loc and loc[0] in ("body", "query", "path"):
            loc = loc[1:]
        if not loc:
            lines.setdefault("", str(error.get("msg") or "invalid request"))
            continue
        field = loc[0]
        if field in OPTIONS:
            option, wanted = OPTIONS[field]
            lines.setdefault(field, f"{option}: expected {wanted}")
        else:
            msg = _PATTERN.sub("not of the expected form", str(error.get("msg") or "invalid"))
            lines.setdefault(field, f"{field.replace('_', '-')}: {msg}")
    return list(lines.values())


def close_models(ref: str, listing: Iterable[dict[str, Any]], n: int = 3) -> list[str]:
    """Handles (else names) of ``listing`` close to ``ref``, best first."""
    choices: dict[str, str] = {}
    for item in listing:
        handle = str(item.get("handle") or item.get("name") or "")
        for word in (handle, str(item.get("name") or "")):
            if word:
                choices.setdefault(word.lower(), handle)
    found = difflib.get_close_matches(ref.lower(), list(choices), n=n * 2, cutoff=0.6)
    return list(dict.fromkeys(choices[f] for f in found))[:n]


def looks_like_path(ref: str) -> bool:
    return (
        "/" in ref or os.sep in ref or Path(ref).suffix.lower() in (".safetensors", ".sft", ".ckpt", ".gguf")
    )


def local_path(ref: str) -> str:
    """``ref`` as an absolute path where it is a relative path that exists from the current folder
    (``models/checkpoints/x.safetensors`` typed beside the model root); else ``ref`` unchanged.
    The service takes absolute paths inside its roots; relative ones are relative to a root."""
    if looks_like_path(ref) and not os.path.isabs(ref) and os.path.exists(ref):
        return os.path.abspath(ref)
    return ref
