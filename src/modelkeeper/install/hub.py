"""The Hugging Face Hub: what a repo holds, through ``huggingface_hub``.

One ``HfApi.model_info(repo, revision=..., files_metadata=True)`` call (``GET
/api/models/{repo}/revision/{rev}?blobs=true``) gives the commit the revision points at and every
file with its size and checksum: the LFS SHA-256 of weight files, the git blob id of small files.
``HF_ENDPOINT`` and ``HF_TOKEN`` (or the token ``hf auth login`` saved) apply as everywhere else
``huggingface_hub`` is used; so do its error classes, mapped here to install errors.

The files themselves are not fetched with ``hf_hub_download``: it writes into the Hub cache (or a
``local_dir`` with its own ``.cache`` bookkeeping) and hashes nothing, while an install must write a
partial file beside its destination in the model root, hash it while it arrives, refuse
redirects to other schemes and bodies longer than declared, report progress and stop on a cancel.
So the resolve URLs that ``hf_hub_url`` builds (pinned to the commit) are streamed by
:mod:`modelkeeper.install.transfer`, with the headers ``build_hf_headers`` makes (token and user
agent). What the Hub cache already holds is still used: a blob there with the declared SHA-256
is linked or copied instead of downloaded.
"""

from __future__ import annotations

import posixpath
from collections.abc import Callable
from pathlib import Path
from typing import TypeVar
from urllib.parse import urlsplit

from huggingface_hub import HfApi, constants, hf_hub_url
from huggingface_hub.errors import (
    GatedRepoError,
    HfHubHTTPError,
    RemoteEntryNotFoundError,
    RepositoryNotFoundError,
    RevisionNotFoundError,
)
from huggingface_hub.hf_api import ModelInfo, RepoSibling
from huggingface_hub.utils._headers import build_hf_headers

from modelkeeper.install.errors import (
    AccessDenied,
    DownloadFailed,
    InstallError,
    RemoteNotFound,
    SourceUnreachable,
    unreachable,
)
from modelkeeper.install.plan import InstallPlan, RemoteFile, SecretHeaders, guess_type
from modelkeeper.install.sources import HubSource, safe_relative

__all__ = ["HubResolver", "select_files"]

_WEIGHT_SUFFIXES = (".safetensors", ".sft", ".bin", ".ckpt", ".pt", ".pth", ".gguf")
_SKIPPED_SUFFIXES = (
    ".md",
    ".png",
    ".jpg",
    ".jpeg",
    ".gif",
    ".webp",
    ".mp4",
    ".msgpack",
    ".h5",
    ".onnx",
    ".onnx_data",
)
_VARIANT_MARKS = (".fp16.", ".bf16.", ".ema.", ".non_ema.", ".fp32.")

T = TypeVar("T")


def _is_weight(name: str) -> bool:
    return name.lower().endswith(_WEIGHT_SUFFIXES)


def _is_variant(name: str) -> bool:
    return any(mark in posixpath.basename(name) for mark in _VARIANT_MARKS)


def select_files(names: list[str]) -> list[str]:
    """The files of a diffusers folder worth fetching: configs, tokenizers and one weight form per
    folder (safetensors over pickles, no fp16/ema variants when a plain file exists); a root-level
    single-file checkpoint beside a ``model_index.json`` is the same model again and is skipped."""
    kept = [
        n
        for n in names
        if not posixpath.basename(n).startswith(".") and not n.lower().endswith(_SKIPPED_SUFFIXES)
    ]
    if "model_index.json" in kept:
        kept = [n for n in kept if "/" in n or not _is_weight(n)]
    by_folder: dict[str, list[str]] = {}
    for n in kept:
        by_folder.setdefault(posixpath.dirname(n), []).append(n)
    selected: list[str] = []
    for files in by_folder.values():
        weights = [n for n in files if _is_weight(n)]
        plain = [n for n in weights if not _is_variant(n)]
        weights = plain or weights
        if any(n.endswith(".safetensors") for n in weights):
            weights = [n for n in weights if n.endswith(".safetensors")]
        kinds = {(posixpath.splitext(n)[1], _is_variant(n)) for n in weights}
        indexes = [  # the shard index of the kept weight form
            n
            for n in files
            if n.endswith(".index.json")
            and (posixpath.splitext(n[: -len(".index.json")])[1], _is_variant(n)) in kinds
        ]
        selected += [
            n for n in files if (not _is_weight(n) and not n.endswith(".index.json")) or n in weights
        ]
        selected += indexes
    return sorted(selected)


class HubResolver:
    """Plans installs from Hub repos (see the module docstring).

    ``endpoint``: ``None`` uses ``HF_ENDPOINT`` (default https://huggingface.co). ``token``: a token,
    ``False`` for none, ``None`` for huggingface_hub's lookup (``HF_TOKEN``, then the saved login).
    ``cache_dir``: the Hub cache searched for blobs already present (default ``HF_HUB_CACHE``).
    """

    def __init__(
        self,
        *,
        endpoint: str | None = None,
        token: str | bool | None = None,
        cache_dir: Path | None = None,
        timeout_s: float = 30.0,
    ) -> None:
        self.endpoint = (endpoint or constants.ENDPOINT).rstrip("/")
        self._token = token
        self._api = HfApi(endpoint=self.endpoint, token=token)
        self.cache_dir = cache_dir if cache_dir is not None else Path(constants.HF_HUB_CACHE)
        self.timeout_s = timeout_s

    @property
    def host(self) -> str:
        """``host[:port]`` of the endpoint, so that its page URLs parse as Hub sources."""
        return urlsplit(self.endpoint).netloc

    def plan(
        self, source: HubSource, *, model_type: str | None = None, name: str | None = None
    ) -> InstallPlan:
        what = source.canonical()
        info: ModelInfo = self._call(
            what,
            source,
            lambda: self._api.model_info(
                source.repo_id, revision=source.revision, files_metadata=True, timeout=self.timeout_s
            ),
        )
        commit = info.sha or source.revision or "main"
        siblings = {safe_relative(s.rfilename, what=what): s for s in info.siblings or []}
        base, chosen, is_folder = self._choose(what, source, list(siblings))
        headers = SecretHeaders(build_hf_headers(token=self._token))
        files = tuple(self._remote(source.repo_id, commit, n, base, siblings[n], headers) for n in chosen)
        repo_name = source.repo_id.split("/")[1]
        if is_folder:
            default_name = repo_name + (f"-{posixpath.basename(base)}" if base else "")
        else:
            default_name = posixpath.basename(chosen[0])
        kind = model_type or self._guess_type(info, chosen, is_folder)
        return InstallPlan(
            source=what,
            kind="hub",
            revision=commit,
            name=safe_relative(name or default_name, what=what),
            model_type=kind,
            is_folder=is_folder,
            files=files,
            repo_id=source.repo_id,
        )

    def cached_blob(self, repo_id: str, sha256: str) -> Path | None:
        """The Hub cache's blob for ``sha256`` of this repo, if there is one."""
        folder = "models--" + repo_id.replace("/", "--")
        blob = self.cache_dir / folder / "blobs" / sha256
        return blob if blob.is_file() else None

    # -- helpers

    @staticmethod
    def _choose(what: str, source: HubSource, names: list[str]) -> tuple[str, list[str], bool]:
        """(subfolder, files to fetch, whether they make a folder)."""
        path = source.path
        if path is not None and path in names:
            return posixpath.dirname(path), [path], False
        if path is not None:
            inside = [n for n in names if n.startswith(path + "/")]
            if not inside:
                raise RemoteNotFound(f"{what}: no file or folder {path!r} in the repo", file=path)
            return path, select_files(inside), True
        if "model_index.json" in names or (
            "config.json" in names and any(_is_weight(n) and "/" not in n for n in names)
        ):
            return "", select_files(names), True
        weights = [n for n in names if _is_weight(n)]
        safetensors = [n for n in weights if n.endswith((".safetensors", ".sft"))]
        candidates = safetensors or weights
        if len(candidates) == 1:
            return posixpath.dirname(candidates[0]), candidates, False
        if not candidates:
            raise RemoteNotFound(f"{what}: the repo holds no model weights")
        shown = ", ".join(candidates[:5]) + (" ..." if len(candidates) > 5 else "")
        raise InstallError(
            f"{what}: the repo holds {len(candidates)} weight files ({shown}); name one as {source.repo_id}:<file>",
            code=None,
            files=candidates,
        )

    def _remote(
        self, repo_id: str, commit: str, name: str, base: str, sibling: RepoSibling, headers: SecretHeaders
    ) -> RemoteFile:
        relative = posixpath.relpath(name, base) if base else name
        lfs = sibling.lfs
        return RemoteFile(
            relative=relative,
            url=hf_hub_url(repo_id, name, revision=commit, endpoint=self.endpoint),
            size=lfs.size if lfs is not None else sibling.size,
            sha256=lfs.sha256.lower() if lfs is not None else None,
            git_sha1=None if lfs is not None else sibling.blob_id,
            headers=headers,
        )

    @staticmethod
    def _guess_type(info: ModelInfo, chosen: list[str], is_folder: bool) -> str:
        if is_folder:
            return (
                "main"
                if any(posixpath.basename(n) == "model_index.json" for n in chosen)
                else guess_type(chosen[0])
            )
        if "lora" in {t.lower() for t in info.tags or []}:
            return "lora"
        return guess_type(posixpath.basename(chosen[0]))

    def _call(self, what: str, source: HubSource, fn: Callable[[], T]) -> T:
        try:
            return fn()
        except GatedRepoError:
            raise AccessDenied(
                f"{source.repo_id}: gated repo: accept its conditions on the Hub and set HF_TOKEN",
                repo=source.repo_id,
            ) from None
        except RepositoryNotFoundError as exc:
            status = exc.response.status_code if exc.response is not None else 404
            if status == 401:
                raise AccessDenied(
                    f"{source.repo_id}: not found, or private (401): set HF_TOKEN to a token with access",
                    repo=source.repo_id,
                ) from None
            raise RemoteNotFound(f"{source.repo_id}: repository not found", repo=source.repo_id) from None
        except RevisionNotFoundError:
            raise RemoteNotFound(
                f"{source.repo_id}: revision {source.revision!r} not found", repo=source.repo_id
            ) from None
        except RemoteEntryNotFoundError:
            raise RemoteNotFound(f"{what}: not found", repo=source.repo_id) from None
        except HfHubHTTPError as exc:
            status = exc.response.status_code if exc.response is not None else 0
            if status in (401, 403):
                raise AccessDenied(
                    f"{source.repo_id}: access denied ({status})", repo=source.repo_id
                ) from None
            raise DownloadFailed(f"{what}: the Hub answered {status}", repo=source.repo_id) from None
        except OSError as exc:
            raise SourceUnreachable(
                f"{what}: cannot reach the Hub at {self.endpoint}: {exc.__class__.__name__}",
                repo=source.repo_id,
            ) from None
        except Exception as exc:  # httpx2 transport errors: huggingface_hub's HTTP stack
            if type(exc).__module__.split(".")[0] in ("httpx2", "httpx", "httpcore"):
                raise (SourceUnreachable if unreachable(exc) else DownloadFailed)(
                    f"{what}: cannot reach the Hub at {self.endpoint}: {exc.__class__.__name__}",
                    repo=source.repo_id,
                ) from None
            raise
