"""Walking model roots: which files and folders are model candidates.

Candidates are weight files (``.safetensors``/``.sft``, ``.ckpt``/``.pt``/``.pth``/``.bin``,
``.gguf``) and diffusers folders: a pipeline (``model_index.json``) or one component
(``config.json`` next to its weights). A diffusers folder is one candidate; the walk does not
descend into it.

A Hugging Face Hub cache (``models--org--name/{blobs,refs,snapshots}``) is walked as one model
per repo: only the snapshot ``refs/main`` names (else the newest) is entered, and
:func:`hub_origin` / :func:`hub_model_name` tell the repo and revision of what lies in it. An
install's staging folder (``INSTALL_STAGING_DIR``) is never entered.

Symlinks are followed safely: every folder is entered once (by device and inode), a link back to
a folder being walked is reported as a loop, and a link that leaves the roots is reported (or
followed, with ``allow_outside_roots``). Problems become *rejected* candidates carrying their
error; the walk always completes.
"""

from __future__ import annotations

import errno
import os
from collections.abc import Iterator
from dataclasses import dataclass, field
from enum import StrEnum

from modelkeeper.discovery.errors import (
    BrokenSymlink,
    FileVanished,
    OutsideRoots,
    RootNotFound,
    SymlinkLoop,
    UnreadableFile,
)
from modelkeeper.discovery.records import ModelFormat
from modelkeeper.formats.conventions import FOLDER_WEIGHT_STEMS, INSTALL_STAGING_DIR
from modelkeeper.formats.errors import FormatError

#: File suffix (lowercase) -> format.
WEIGHT_SUFFIXES: dict[str, ModelFormat] = {
    ".safetensors": ModelFormat.SAFETENSORS,
    ".sft": ModelFormat.SAFETENSORS,
    ".ckpt": ModelFormat.PICKLE,
    ".pt": ModelFormat.PICKLE,
    ".pth": ModelFormat.PICKLE,
    ".bin": ModelFormat.PICKLE,
    ".gguf": ModelFormat.GGUF,
}
_FOLDER_WEIGHT_SUFFIXES = (".safetensors", ".bin", ".safetensors.index.json", ".bin.index.json")


class CandidateKind(StrEnum):
    FILE = "file"
    PIPELINE = "pipeline"  # folder with model_index.json
    COMPONENT = "component"  # folder with config.json and weights


@dataclass(frozen=True)
class Fingerprint:
    """What tells an unchanged candidate from a changed one without opening it."""

    size: int
    mtime_ns: int
    inode: int
    device: int


@dataclass
class Candidate:
    path: str  # absolute, as reached from the root (links not resolved)
    root: str  # the root, absolute
    rel: str  # path relative to the root
    kind: CandidateKind
    format: ModelFormat
    fingerprint: Fingerprint | None = None
    folders: tuple[str, ...] = ()  # folders between the root and the candidate, for hints
    siblings: frozenset[str] = field(default_factory=frozenset)  # names next to it, for sidecars
    names: frozenset[str] = field(default_factory=frozenset)  # for folders: their own entries
    error: FormatError | None = None


_HUB_REPO_PREFIX = "models--"


@dataclass(frozen=True)
class HubOrigin:
    """Where a candidate lies in a Hub cache: the repo, the snapshot's revision, the path inside it."""

    repo_id: str
    revision: str
    inner: str  # "" for the snapshot folder itself


def hub_origin(rel: str) -> HubOrigin | None:
    """The Hub cache origin of the path ``rel`` (``.../models--org--name/snapshots/<rev>/...``), if any."""
    parts = rel.split(os.sep)
    for i, part in enumerate(parts[:-2]):
        if part.startswith(_HUB_REPO_PREFIX) and parts[i + 1] == "snapshots":
            repo_id = part[len(_HUB_REPO_PREFIX) :].replace("--", "/", 1)  # Hub names never hold "--"
            return HubOrigin(repo_id, parts[i + 2], "/".join(parts[i + 3 :]))
    return None


def hub_model_name(candidate: Candidate) -> str | None:
    """``org/name`` for a Hub cache snapshot, or for the one weight file at its top; ``org/name:<path>``
    for anything else in it; None outside a Hub cache."""
    origin = hub_origin(candidate.rel)
    if origin is None:
        return None
    if not origin.inner:
        return origin.repo_id
    if candidate.kind is CandidateKind.FILE:
        weights = [n for n in candidate.siblings if os.path.splitext(n)[1].lower() in WEIGHT_SUFFIXES]
        if "/" not in origin.inner and len(weights) == 1:
            return origin.repo_id
        return f"{origin.repo_id}:{os.path.splitext(origin.inner)[0]}"
    return f"{origin.repo_id}:{origin.inner}"


def _hub_snapshot(folder: str, names: set[str]) -> str | None:
    """The snapshot of a Hub cache repo folder to walk: the one ``refs/main`` names, else the newest."""
    if not os.path.basename(folder).startswith(_HUB_REPO_PREFIX) or "snapshots" not in names:
        return None
    snapshots = os.path.join(folder, "snapshots")
    try:
        revisions = os.listdir(snapshots)
    except OSError:
        return None
    if not revisions:
        return None
    try:
        with open(os.path.join(folder, "refs", "main")) as ref:
            main = ref.read().strip()
    except OSError:
        main = ""
    if main in revisions:
        return main
    return max(revisions, key=lambda r: os.stat(os.path.join(snapshots, r)).st_mtime_ns)


def _is_component_folder(names: set[str]) -> bool:
    if "config.json" not in names:
        return False
    return any(n.startswith(FOLDER_WEIGHT_STEMS) and n.endswith(_FOLDER_WEIGHT_SUFFIXES) for n in names)


def folder_fingerprint(path: str, names: set[str] | frozenset[str], depth: int = 1) -> Fingerprint:
    """Total size and latest mtime of the files of a diffusers folder (and of its component folders)."""
    st = os.stat(path)
    size, mtime = 0, st.st_mtime_ns
    with os.scandir(path) as it:
        for entry in it:
            if entry.is_file():
                est = entry.stat()
                size += est.st_size
                mtime = max(mtime, est.st_mtime_ns)
            elif depth > 0 and entry.is_dir():
                sub = folder_fingerprint(entry.path, frozenset(), depth - 1)
                size += sub.size
                mtime = max(mtime, sub.mtime_ns)
    return Fingerprint(size, mtime, st.st_ino, st.st_dev)


def _rel(path: str, root: str) -> str:
    """``path`` relative to ``root`` (cheaper than os.path.relpath, which resolves both)."""
    prefix = root if root.endswith(os.sep) else root + os.sep
    if path.startswith(prefix):
        return path[len(prefix) :]
    return "." if path == root else os.path.relpath(path, root)


def _within(real: str, real_roots: list[str]) -> bool:
    return any(real == r or real.startswith(r.rstrip(os.sep) + os.sep) for r in real_roots)


class Walker:
    """Yields the candidates under ``roots``; see the module docstring."""

    def __init__(
        self, roots: list[str], *, follow_symlinks: bool = True, allow_outside_roots: bool = False
    ) -> None:
        self.roots = [os.path.abspath(r) for r in roots]
        for r in self.roots:
            if not os.path.isdir(r):
                raise RootNotFound(f"{r}: not a folder", path=r)
        self.real_roots = [os.path.realpath(r) for r in self.roots]
        self.follow_symlinks = follow_symlinks
        self.allow_outside_roots = allow_outside_roots

    def __iter__(self) -> Iterator[Candidate]:
        visited: set[tuple[int, int]] = set()
        for root in self.roots:
            st = os.stat(root)
            if (st.st_dev, st.st_ino) in visited:
                continue
            visited.add((st.st_dev, st.st_ino))
            yield from self._walk(root, visited)

    def _reject(
        self, root: str, path: str, folders: tuple[str, ...], error: FormatError, fmt: ModelFormat
    ) -> Candidate:
        return Candidate(path, root, _rel(path, root), CandidateKind.FILE, fmt, folders=folders, error=error)

    def _walk(self, root: str, visited: set[tuple[int, int]]) -> Iterator[Candidate]:
        # (folder, folders from the root to it, names in its parent folder)
        stack: list[tuple[str, tuple[str, ...], frozenset[str]]] = [(root, (), frozenset())]
        while stack:
            folder, folders, parent_names = stack.pop()
            try:
                with os.scandir(folder) as it:
                    entries = sorted(it, key=lambda e: e.name)
            except FileNotFoundError:
                continue  # removed while walking: its files were never seen
            except OSError as exc:
                yield self._reject(
                    root,
                    folder,
                    folders,
                    UnreadableFile(f"{folder}: cannot list: {exc.strerror}"),
                    ModelFormat.DIFFUSERS,
                )
                continue
            entries = [e for e in entries if e.name != INSTALL_STAGING_DIR]
            names = {e.name for e in entries}
            if (revision := _hub_snapshot(folder, names)) is not None:
                snapshot = os.path.join(folder, "snapshots", revision)
                stack.append((snapshot, (*folders, "snapshots", revision), frozenset(names)))
                continue
            here = self._folder_candidate(root, folder, folders, names, parent_names)
            if here is not None:
                yield here
                continue
            siblings = frozenset(names)
            subfolders: list[tuple[str, tuple[str, ...]]] = []
            for entry in entries:
                yield from self._entry(
                    root, entry, folders=folders, siblings=siblings, visited=visited, subfolders=subfolders
                )
            stack.extend((path, sub, siblings) for path, sub in reversed(subfolders))

    def _folder_candidate(
        self, root: str, folder: str, folders: tuple[str, ...], names: set[str], parent_names: frozenset[str]
    ) -> Candidate | None:
        if "model_index.json" in names:
            kind = CandidateKind.PIPELINE
        elif _is_component_folder(names):
            kind = CandidateKind.COMPONENT
        else:
            return None
        rel = _rel(folder, root)
        try:
            fp = folder_fingerprint(folder, names)
        except OSError as exc:
            return self._reject(
                root, folder, folders, UnreadableFile(f"{folder}: {exc.strerror}"), ModelFormat.DIFFUSERS
            )
        return Candidate(
            folder,
            root,
            rel,
            kind,
            ModelFormat.DIFFUSERS,
            fp,
            folders[:-1] if folders else (),
            parent_names,
            frozenset(names),
        )

    def _entry(
        self,
        root: str,
        entry: os.DirEntry[str],
        *,
        folders: tuple[str, ...],
        siblings: frozenset[str],
        visited: set[tuple[int, int]],
        subfolders: list[tuple[str, tuple[str, ...]]],
    ) -> Iterator[Candidate]:
        suffix = os.path.splitext(entry.name)[1].lower()
        fmt = WEIGHT_SUFFIXES.get(suffix)
        link = entry.is_symlink()
        if link and not self.follow_symlinks:
            return
        try:
            st = entry.stat(follow_symlinks=True)
        except FileNotFoundError:
            if link and fmt is not None:
                yield self._reject(
                    root, entry.path, folders, BrokenSymlink(f"{entry.path}: link target does not exist"), fmt
                )
            elif fmt is not None:
                yield self._reject(
                    root, entry.path, folders, FileVanished(f"{entry.path}: deleted during the scan"), fmt
                )
            return
        except OSError as exc:
            if exc.errno == errno.ELOOP:
                yield self._reject(
                    root,
                    entry.path,
                    folders,
                    SymlinkLoop(f"{entry.path}: symlink loop"),
                    fmt or ModelFormat.SAFETENSORS,
                )
            elif fmt is not None:
                yield self._reject(
                    root, entry.path, folders, UnreadableFile(f"{entry.path}: {exc.strerror}"), fmt
                )
            return
        is_dir = entry.is_dir(follow_symlinks=True)
        if (
            link
            and not self.allow_outside_roots
            and not _within(os.path.realpath(entry.path), self.real_roots)
        ):
            if is_dir or fmt is not None:
                yield self._reject(
                    root,
                    entry.path,
                    folders,
                    OutsideRoots(
                        f"{entry.path}: link leaves the scan roots (to {os.path.realpath(entry.path)}); "
                        "scan that folder too, or follow such links with --allow-outside-roots "
                        "(the service: allow_outside_roots, MODELKEEPER_ALLOW_OUTSIDE_ROOTS=1)",
                        setting="allow_outside_roots",
                    ),
                    fmt or ModelFormat.DIFFUSERS,
                )
            return
        if is_dir:
            key = (st.st_dev, st.st_ino)
            if key in visited:
                # A link back to a folder above it is a loop; a second way to a folder walked
                # elsewhere is an alias, walked once.
                target = os.path.realpath(entry.path)
                parent = os.path.realpath(os.path.dirname(entry.path))
                if link and (parent == target or parent.startswith(target.rstrip(os.sep) + os.sep)):
                    error = SymlinkLoop(f"{entry.path}: link to a folder above it ({target})")
                    yield self._reject(root, entry.path, folders, error, ModelFormat.DIFFUSERS)
                return
            visited.add(key)
            subfolders.append((entry.path, (*folders, entry.name)))
            return
        if fmt is None or not entry.is_file(follow_symlinks=True):
            return
        fp = Fingerprint(st.st_size, st.st_mtime_ns, st.st_ino, st.st_dev)
        yield Candidate(
            entry.path,
            root,
            _rel(entry.path, root),
            CandidateKind.FILE,
            fmt,
            fp,
            folders,
            siblings,
        )
