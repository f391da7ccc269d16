"""A fake Hugging Face Hub: the subset of the Hub's HTTP API that ``huggingface_hub`` uses to list a
repo and download its files, served from local files.

Endpoints (as huggingface_hub calls them; ``HF_ENDPOINT`` or ``endpoint=`` point it here):

- ``GET /api/models/{repo}`` and ``/api/models/{repo}/revision/{rev}`` (``?blobs=true`` adds sizes
  and LFS info): ``id``, ``sha`` (the commit), ``private``, ``gated``, ``tags``, ``siblings``.
- ``GET /api/models/{repo}/tree/{rev}[/{path}]`` (``?recursive=true``): files and folders with
  ``oid``, ``size`` and ``lfs``.
- ``HEAD``/``GET /{repo}/resolve/{rev}/{path}``: small files directly, with ``ETag`` (git blob id);
  LFS files (weights, anything over 10 MB) as a ``302`` to ``/cdn/{sha256}`` on another host
  name (:attr:`FakeHub.cdn_url`) carrying
  ``X-Linked-Etag`` (the SHA-256) and ``X-Linked-Size``; both with ``X-Repo-Commit``.
- ``GET /cdn/{sha256}``: the LFS bytes, with ``Range`` and the file name in ``Content-Disposition``.

Errors carry ``X-Error-Code`` as the Hub's do (``RepoNotFound``, ``RevisionNotFound``,
``EntryNotFound``, ``GatedRepo``), so huggingface_hub raises its own error classes. A gated or
private repo needs ``Authorization: Bearer <token>`` with :attr:`FakeHub.token`. Faults
(:class:`~modelkeeper.testing.httpserver.Faults`) are set per file path in the repo.

``python -m modelkeeper.testing.hubserver REPO=FILE ...`` serves files from a process of its own
(:class:`HubProcess` starts one): a benchmark then measures a client that shares no interpreter
(and no GIL) with the server, as ``curl`` does.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import ssl
import subprocess
import sys
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler
from pathlib import Path
from urllib.parse import quote, unquote

from modelkeeper.testing.httpserver import Faults, Request, TestServer

__all__ = ["FakeHub", "HubFile", "HubProcess", "HubRepo"]

_LFS_SUFFIXES = (".safetensors", ".bin", ".ckpt", ".pt", ".pth", ".gguf", ".onnx", ".msgpack", ".h5")
_LFS_MIN_SIZE = 10 * 1024 * 1024


def git_blob_id(path: Path) -> str:
    """The git blob id (SHA-1 of ``blob <size>\\0`` + content) of a file."""
    digest = hashlib.sha1(f"blob {path.stat().st_size}\0".encode())
    with open(path, "rb") as f:
        while block := f.read(4 * 1024 * 1024):
            digest.update(block)
    return digest.hexdigest()


def sha256_of(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(4 * 1024 * 1024):
            digest.update(block)
    return digest.hexdigest()


@dataclass(frozen=True)
class HubFile:
    """One file of a fake repo: where its bytes are and what the Hub declares for it."""

    path: str
    local: Path
    size: int
    blob_id: str
    sha256: str | None  # set for LFS files

    @classmethod
    def of(cls, path: str, local: Path) -> HubFile:
        size = local.stat().st_size
        lfs = path.endswith(_LFS_SUFFIXES) or size >= _LFS_MIN_SIZE
        return cls(path, local, size, git_blob_id(local), sha256_of(local) if lfs else None)

    def listing(self) -> dict[str, object]:
        entry: dict[str, object] = {"rfilename": self.path, "size": self.size, "blobId": self.blob_id}
        if self.sha256 is not None:
            entry["lfs"] = {"size": self.size, "sha256": self.sha256, "pointerSize": 134}
        return entry


@dataclass
class HubRepo:
    """A fake repo at one commit (reachable as ``main`` and by its hash)."""

    repo_id: str
    files: dict[str, HubFile]
    commit: str
    gated: bool = False
    private: bool = False
    tags: list[str] = field(default_factory=list)
    extra_listing: list[dict[str, object]] = field(
        default_factory=list
    )  # entries with no file (hostile names)

    def siblings(self) -> list[dict[str, object]]:
        return [f.listing() for f in self.files.values()] + self.extra_listing


class FakeHub(TestServer):
    """The fake Hub (see the module docstring); :meth:`add_repo` publishes files under a repo id."""

    token = "hf_fake_token_never_shown"

    def __init__(self, *, tls: ssl.SSLContext | None = None) -> None:
        super().__init__(tls=tls)
        self.repos: dict[str, HubRepo] = {}
        self._blobs: dict[str, HubFile] = {}

    def add_repo(
        self,
        repo_id: str,
        files: Path | Mapping[str, Path],
        *,
        gated: bool = False,
        private: bool = False,
        tags: Sequence[str] = (),
    ) -> HubRepo:
        """Publish ``files`` (a folder, all its files, or repo path -> local file) as ``repo_id``."""
        if isinstance(files, Path):
            mapping = {p.relative_to(files).as_posix(): p for p in sorted(files.rglob("*")) if p.is_file()}
        else:
            mapping = dict(files)
        entries = {name: HubFile.of(name, local) for name, local in mapping.items()}
        commit = hashlib.sha1(
            (repo_id + "".join(f"{n}{e.blob_id}" for n, e in sorted(entries.items()))).encode()
        ).hexdigest()
        repo = HubRepo(repo_id, entries, commit, gated, private, list(tags))
        self.repos[repo_id] = repo
        for entry in entries.values():
            if entry.sha256 is not None:
                self._blobs[entry.sha256] = entry
        return repo

    @property
    def cdn_url(self) -> str:
        """The "CDN" that LFS downloads redirect to: this server under another host name
        (``localhost``), so that clients see a cross-host redirect as with the real Hub."""
        return self.url.replace("127.0.0.1", "localhost")

    def fault(self, path: str) -> Faults:
        """The faults of the repo file ``path`` (created empty on first use)."""
        return self.faults.setdefault(path, Faults())

    # -- routing

    def route(self, handler: BaseHTTPRequestHandler, request: Request) -> None:
        parts = [unquote(p) for p in request.path.split("/")[1:]]
        if parts[:2] == ["api", "models"] and len(parts) >= 4:
            self._api(handler, request, parts[2:])
        elif parts[:1] == ["cdn"] and len(parts) == 2 and parts[1] in self._blobs:
            entry = self._blobs[parts[1]]
            disposition = f"inline; filename*=UTF-8''{quote(entry.path.rsplit('/', 1)[-1])}"
            headers = {"ETag": f'"{entry.sha256}"', "Content-Disposition": disposition}
            self.send_file(handler, request, entry.path, entry.local, headers=headers)
        elif len(parts) >= 5 and parts[2] == "resolve":
            self._resolve(handler, request, "/".join(parts[:2]), parts[3], "/".join(parts[4:]))
        else:
            self.send_json(handler, {"error": "not found"}, status=404)

    def _repo(
        self, handler: BaseHTTPRequestHandler, request: Request, repo_id: str, rev: str
    ) -> HubRepo | None:
        repo = self.repos.get(repo_id)
        authorized = request.bearer == self.token
        if repo is None or (repo.private and not authorized):
            status = 404 if repo is None and authorized else 401
            self._error(handler, status, "RepoNotFound", "Repository not found")
            return None
        if repo.gated and not authorized:
            self._error(handler, 401, "GatedRepo", "Access to this model is restricted")
            return None
        if rev not in ("main", repo.commit):
            self._error(handler, 404, "RevisionNotFound", "Invalid rev id")
            return None
        return repo

    def _api(self, handler: BaseHTTPRequestHandler, request: Request, rest: list[str]) -> None:
        repo_id = "/".join(rest[:2])
        tail = rest[2:]
        rev = tail[1] if len(tail) >= 2 and tail[0] in ("revision", "tree") else "main"
        repo = self._repo(handler, request, repo_id, rev)
        if repo is None:
            return
        if not tail or tail[0] == "revision":
            blobs = request.query.get("blobs", ["false"])[0].lower() == "true"
            siblings = repo.siblings() if blobs else [{"rfilename": s["rfilename"]} for s in repo.siblings()]
            self.send_json(
                handler,
                {
                    "id": repo.repo_id,
                    "modelId": repo.repo_id,
                    "sha": repo.commit,
                    "private": repo.private,
                    "gated": "auto" if repo.gated else False,
                    "tags": repo.tags,
                    "siblings": siblings,
                },
            )
        elif tail[0] == "tree":
            self._tree(handler, request, repo, "/".join(tail[2:]))
        else:
            self.send_json(handler, {"error": "not found"}, status=404)

    def _tree(self, handler: BaseHTTPRequestHandler, request: Request, repo: HubRepo, base: str) -> None:
        recursive = request.query.get("recursive", ["false"])[0].lower() == "true"
        prefix = base + "/" if base else ""
        entries: list[dict[str, object]] = []
        folders: set[str] = set()
        for entry in repo.files.values():
            if not entry.path.startswith(prefix):
                continue
            rest = entry.path[len(prefix) :]
            if "/" in rest and not recursive:
                folders.add(prefix + rest.split("/")[0])
                continue
            item: dict[str, object] = {
                "type": "file",
                "path": entry.path,
                "size": entry.size,
                "oid": entry.blob_id,
            }
            if entry.sha256 is not None:
                item["lfs"] = {"oid": entry.sha256, "size": entry.size, "pointerSize": 134}
            entries.append(item)
        if base and not entries and not folders:
            self._error(handler, 404, "EntryNotFound", f"{base} does not exist on {repo.commit}")
            return
        entries += [{"type": "directory", "path": p, "oid": "0" * 40} for p in sorted(folders)]
        self.send_json(handler, entries)

    def _resolve(
        self, handler: BaseHTTPRequestHandler, request: Request, repo_id: str, rev: str, path: str
    ) -> None:
        repo = self._repo(handler, request, repo_id, rev)
        if repo is None:
            return
        entry = repo.files.get(path)
        if entry is None:
            self._error(
                handler, 404, "EntryNotFound", f"{path} does not exist", {"X-Repo-Commit": repo.commit}
            )
            return
        headers = {"X-Repo-Commit": repo.commit}
        faults = self.faults.get(path)
        if faults is not None and faults.redirect_to is not None:
            self.send_redirect(handler, faults.redirect_to, headers)
        elif entry.sha256 is not None:
            headers |= {
                "X-Linked-Etag": f'"{entry.sha256}"',
                "X-Linked-Size": str(entry.size),
                "ETag": f'"{entry.blob_id}"',
            }
            self.send_redirect(handler, f"{self.cdn_url}/cdn/{quote(entry.sha256)}", headers)
        else:
            self.send_file(
                handler, request, path, entry.local, headers={**headers, "ETag": f'"{entry.blob_id}"'}
            )

    def _error(
        self,
        handler: BaseHTTPRequestHandler,
        status: int,
        code: str,
        message: str,
        extra: dict[str, str] | None = None,
    ) -> None:
        headers = {"X-Error-Code": code, "X-Error-Message": message, **(extra or {})}
        self.send_json(handler, {"error": message}, status=status, headers=headers)


# Runs :func:`main` without the package ``modelkeeper.testing``'s ``__init__``, which imports torch,
# diffusers and transformers (seconds, tens of them on a loaded machine); the server needs none.
_BOOTSTRAP = """
import sys, types
package = types.ModuleType("modelkeeper.testing")
package.__path__ = [sys.argv.pop(1)]
sys.modules["modelkeeper.testing"] = package
from modelkeeper.testing.hubserver import main
main()
"""


class HubProcess:
    """A :class:`FakeHub` in a subprocess, publishing ``repos`` (repo id -> repo path -> local file);
    use as a context manager. :attr:`url`, :attr:`cdn_url` and :attr:`sha256` (repo path -> the
    LFS SHA-256 of each file) are known once it started; it stops when this closes its stdin."""

    def __init__(self, repos: Mapping[str, Mapping[str, Path]]) -> None:
        args = [f"{repo}:{name}={local}" for repo, files in repos.items() for name, local in files.items()]
        self._process = subprocess.Popen(
            [sys.executable, "-c", _BOOTSTRAP, str(Path(__file__).parent), *args],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            text=True,
        )
        assert self._process.stdout is not None
        line = self._process.stdout.readline()
        if not line:
            self.stop()
            raise RuntimeError(f"fake Hub process exited with {self._process.returncode} before serving")
        ready = json.loads(line)
        self.url: str = ready["url"]
        self.cdn_url: str = ready["cdn_url"]
        self.sha256: dict[str, str | None] = ready["sha256"]

    @property
    def pid(self) -> int:
        return self._process.pid

    def stop(self) -> None:
        for pipe in (self._process.stdin, self._process.stdout):
            if pipe is not None:
                pipe.close()
        self._process.wait()

    def __enter__(self) -> HubProcess:
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()


def main(argv: Sequence[str] | None = None) -> None:
    """Serve ``REPO:PATH=FILE`` arguments until stdin closes; print the URLs as one JSON line first."""
    parser = argparse.ArgumentParser(description="A fake Hugging Face Hub serving local files.")
    parser.add_argument("files", nargs="+", metavar="REPO:PATH=FILE")
    args = parser.parse_args(argv)
    repos: dict[str, dict[str, Path]] = {}
    for spec in args.files:
        where, _, local = spec.partition("=")
        repo, _, name = where.partition(":")
        if not (repo and name and local):
            parser.error(f"{spec!r}: expected REPO:PATH=FILE")
        repos.setdefault(repo, {})[name] = Path(local)
    hub = FakeHub()
    with hub:
        sha256: dict[str, str | None] = {}
        for repo, files in repos.items():
            published = hub.add_repo(repo, files)
            sha256 |= {name: entry.sha256 for name, entry in published.files.items()}
        print(json.dumps({"url": hub.url, "cdn_url": hub.cdn_url, "sha256": sha256}), flush=True)
        sys.stdin.read()  # until the parent closes it (or exits)


if __name__ == "__main__":
    main()
