"""What an install will fetch and where it will put it: the plan a resolver makes from a source,
the folder by model type, and the result an install returns.

Where files go: ``<root>/<folder of the type>/<file>`` for a single file, and
``<root>/<folder for diffusers folders>/<name>/...`` for a folder (a diffusers pipeline or
component). The folders by type follow the ComfyUI-style layout the demo set uses
(:data:`DEFAULT_FOLDERS`); a caller passes its own mapping to change any of them.
"""

from __future__ import annotations

import posixpath
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

__all__ = [
    "DEFAULT_FOLDERS",
    "FOLDER_KEY",
    "InstallPlan",
    "InstallProgress",
    "InstallResult",
    "InstalledFile",
    "RemoteFile",
    "SecretHeaders",
    "SourceKind",
    "folder_for",
    "guess_type",
]

SourceKind = Literal["hub", "url", "civitai"]

#: The key of :data:`DEFAULT_FOLDERS` used for every folder install (diffusers layout).
FOLDER_KEY = "diffusers"

#: Model type (as the registry names them) -> folder under the model root.
DEFAULT_FOLDERS: Mapping[str, str] = {
    "main": "checkpoints",
    "unet": "unet",
    "transformer": "unet",
    "vae": "vae",
    "text_encoder": "clip",
    "lora": "loras",
    "controlnet": "controlnet",
    "textual_inversion": "embeddings",
    "upscaler": "upscale_models",
    "other": "other",
    FOLDER_KEY: "diffusers",
}

# Words in a file name that tell its type when the source says nothing (first match wins).
_NAME_HINTS: tuple[tuple[str, str], ...] = (
    ("lora", "lora"),
    ("locon", "lora"),
    ("lycoris", "lora"),
    ("controlnet", "controlnet"),
    ("vae", "vae"),
    ("embedding", "textual_inversion"),
)


def guess_type(file_name: str) -> str:
    """The model type a file name suggests (``main`` when nothing does)."""
    lowered = file_name.lower()
    return next((kind for word, kind in _NAME_HINTS if word in lowered), "main")


def folder_for(model_type: str, *, is_folder: bool, folders: Mapping[str, str] | None = None) -> str:
    """The folder under the model root for ``model_type`` (or for folder installs)."""
    table = {**DEFAULT_FOLDERS, **(folders or {})}
    key = FOLDER_KEY if is_folder else model_type
    return table.get(key, table["other"])


class SecretHeaders:
    """Request headers that may carry a token. Shown as ``***`` however a plan is printed or
    serialised (``repr``, ``str``, ``dataclasses.asdict`` then JSON with ``default=str``); only
    :meth:`reveal` gives the values, to the code that sends the request."""

    __slots__ = ("_values",)

    def __init__(self, values: Mapping[str, str] | None = None) -> None:
        self._values = dict(values or {})

    def reveal(self) -> dict[str, str]:
        return dict(self._values)

    def __repr__(self) -> str:
        return f"SecretHeaders({', '.join(self._values)}: ***)"

    def __deepcopy__(self, memo: dict[int, object]) -> SecretHeaders:
        return self


@dataclass(frozen=True)
class RemoteFile:
    """One file to fetch: its place in the model (``relative``), where from and what it must be.

    ``sha256`` (lowercase hex) is the checksum the source declares (Hub LFS, CivitAI); ``git_sha1``
    the Hub's git blob id of a small non-LFS file; ``etag`` a validator for resuming a plain URL.
    ``headers`` may carry credentials: :class:`SecretHeaders`, never shown.
    """

    relative: str
    url: str
    size: int | None
    sha256: str | None = None
    git_sha1: str | None = None
    etag: str | None = None
    headers: SecretHeaders = field(default_factory=SecretHeaders, repr=False, compare=False)


@dataclass(frozen=True)
class InstallPlan:
    """What a resolver found: the files of the model and how to name and place it.

    ``revision`` is the resolved commit for the Hub, the version id for CivitAI, ``None`` for a
    URL. ``is_folder``: the files make one folder (``name``); else ``files`` has exactly one entry,
    placed as ``name``.
    """

    source: str
    kind: SourceKind
    revision: str | None
    name: str
    model_type: str
    is_folder: bool
    files: tuple[RemoteFile, ...]
    repo_id: str | None = None  # Hub sources: where the Hub cache may already hold the blobs

    @property
    def declared_bytes(self) -> int:
        return sum(f.size or 0 for f in self.files)

    def destination(self, root: Path, folders: Mapping[str, str] | None = None) -> Path:
        """Where the model will be: a file or a folder under ``root``."""
        return root / folder_for(self.model_type, is_folder=self.is_folder, folders=folders) / self.name


@dataclass(frozen=True)
class InstalledFile:
    """One file written (or found already present) by an install."""

    path: Path
    relative: str  # inside the model folder; the file name for a single file
    size: int
    sha256: str
    transferred_bytes: int  # bytes received over the network for it (0 when reused)
    reused: bool  # the same content was already on disk: linked or copied, not downloaded


@dataclass(frozen=True)
class InstallResult:
    """What an install wrote: ``path`` is the model (file or folder) to register."""

    source: str  # canonical, without credentials
    kind: SourceKind
    revision: str | None
    model_type: str
    path: Path
    files: tuple[InstalledFile, ...]
    elapsed_s: float

    @property
    def size(self) -> int:
        return sum(f.size for f in self.files)

    @property
    def transferred_bytes(self) -> int:
        return sum(f.transferred_bytes for f in self.files)


@dataclass(frozen=True)
class InstallProgress:
    """A progress report: ``phase`` is ``resolve``, ``download``, ``verify``, ``finalize`` or ``done``.

    ``done_bytes``/``total_bytes`` count the whole install (already present bytes included);
    ``file`` is the file being fetched (relative name), with its own counts.
    """

    phase: str
    done_bytes: int
    total_bytes: int
    file: str | None = None
    file_done_bytes: int = 0
    file_total_bytes: int | None = None


def join_relative(base: str, name: str) -> str:
    """``name`` inside ``base`` (a relative folder in a repo; empty for its root)."""
    return posixpath.join(base, name) if base else name
