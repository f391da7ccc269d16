"""The port discovery writes through: :class:`CatalogWriter`, and the rows it reads back.

The scanner and the hasher keep a catalog of files and models in step with the disk, but discovery
does not know where that catalog lives: it owns this interface, and the registry
(``modelkeeper.registry.Registry``) implements it. So the registry may import discovery (its
records, this port) and discovery never imports the registry; the import-linter contracts of
``pyproject.toml`` hold that direction.

Interface (what :class:`~modelkeeper.discovery.scanner.Scanner` and
:class:`~modelkeeper.discovery.hasher.Hasher` call, nothing more):

- scanning: ``file_rows`` (what is known under the roots), ``record_model``, ``record_rejected``,
  ``move_file``, ``set_roots``, ``mark_missing``, ``scan_summaries``, inside ``transaction()``;
- hashing: ``pending_hashes``, ``record_hashes``, ``reconcile_moves``.

Errors are the implementation's; the registry raises subclasses of ``RegistryError``.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from contextlib import AbstractContextManager
from typing import Any, NamedTuple, Protocol

from modelkeeper.discovery.records import Identification

Fingerprint = tuple[int, int, int, int]
"""(size, mtime_ns, inode, device) of a file or folder when it was identified."""


class FileRow(NamedTuple):
    """The columns a rescan compares, per known path."""

    id: int
    path: str
    root: str
    kind: str
    status: str
    size: int | None
    mtime_ns: int | None
    inode: int | None
    device: int | None
    rules_version: int | None
    model_id: str | None
    error_code: str | None = None
    error: str | None = None


class HashTask(NamedTuple):
    """A file or folder whose hashes are pending, with its components (to give them content ids)."""

    file_id: int
    path: str
    kind: str
    size: int
    mtime_ns: int
    components: list[tuple[int, str, str, str | None]]  # (row id, name, prefix, subfolder)


class CatalogWriter(Protocol):
    """Where the scanner and the hasher read what is known and write what they found."""

    def transaction(self) -> AbstractContextManager[object]:
        """One write unit: the writes inside all happen or none does; nested calls join the outer one."""
        ...

    def file_rows(self, roots: Sequence[str]) -> dict[str, FileRow]:
        """Known paths under ``roots`` (all when empty) with what a rescan compares."""
        ...

    def record_model(
        self,
        *,
        path: str,
        root: str,
        rel: str,
        kind: str,
        fingerprint: Fingerprint,
        identification: Identification,
        rules_version: int,
        existing: FileRow | None,
        default_name: str,
        user_defaults: Mapping[str, Any] | None = None,
        found: Mapping[str, Any] | None = None,
        now: float | None = None,
    ) -> tuple[str, bool]:
        """Insert or update the file at ``path`` and its model; returns (model id, created)."""
        ...

    def record_rejected(
        self,
        *,
        path: str,
        root: str,
        rel: str,
        kind: str,
        fmt: str,
        fingerprint: Fingerprint | None,
        error_code: str,
        error: str,
        existing: FileRow | None,
        rules_version: int,
        now: float | None = None,
    ) -> None:
        """Record that the file at ``path`` is not a usable model, and why."""
        ...

    def move_file(
        self, row: FileRow, *, path: str, root: str, rel: str, fingerprint: Fingerprint, now: float
    ) -> None:
        """The known file ``row`` now lies at ``path`` (same device and inode): it keeps its model."""
        ...

    def set_roots(self, changes: Sequence[tuple[int, str, str]]) -> None:
        """(file id, root, relative path) for known files now reached through another root."""
        ...

    def mark_missing(self, rows: Sequence[FileRow], now: float | None = None) -> None:
        """These known files are gone from the disk."""
        ...

    def scan_summaries(self, file_ids: Sequence[int]) -> dict[int, dict[str, Any]]:
        """What a scan reports for files it did not reopen: file id -> stored answer."""
        ...

    def pending_hashes(self) -> list[HashTask]:
        """Files present and identified whose hashes are missing or stale (size or mtime changed)."""
        ...

    def record_hashes(
        self,
        task: HashTask,
        *,
        blake3: str,
        sha256: str | None,
        component_ids: Mapping[int, str],
        now: float | None = None,
    ) -> None:
        """Store a file's hashes and its components' content ids (by component row id)."""
        ...

    def reconcile_moves(self, now: float | None = None) -> list[tuple[str, str]]:
        """Give a new file the model of a missing file with the same BLAKE3; returns (kept model id,
        new path) for each move found."""
        ...
