"""CivitAI: which file a model version holds, through its public REST API (httpx).

``GET /api/v1/model-versions/{id}`` answers the version with its ``files``: each with ``name``,
``sizeKB``, ``type``, ``primary``, ``hashes.SHA256`` and a ``downloadUrl`` (which redirects to
the storage host). A model page without a version (``/models/{id}``) takes the first entry of
``GET /api/v1/models/{id}``'s ``modelVersions``, the newest. A token (``CIVITAI_TOKEN``) is sent as
``Authorization: Bearer``; it is dropped when the download redirects to another host.
"""

from __future__ import annotations

import contextlib
import os
from typing import Any
from urllib.parse import urlsplit

import httpx

from modelkeeper.install.errors import (
    DownloadFailed,
    InstallError,
    RemoteNotFound,
    SourceUnreachable,
    unreachable,
)
from modelkeeper.install.plan import InstallPlan, RemoteFile, SecretHeaders
from modelkeeper.install.sources import CivitaiSource, check_scheme, safe_relative
from modelkeeper.install.streams import open_stream, raise_for_status

__all__ = ["CIVITAI_ENDPOINT", "CIVITAI_TYPES", "CivitaiResolver"]

CIVITAI_ENDPOINT = "https://civitai.com"

#: CivitAI model type -> the registry's model type.
CIVITAI_TYPES: dict[str, str] = {
    "checkpoint": "main",
    "lora": "lora",
    "locon": "lora",
    "dora": "lora",
    "lycoris": "lora",
    "textualinversion": "textual_inversion",
    "vae": "vae",
    "controlnet": "controlnet",
    "upscaler": "upscaler",
}


class CivitaiResolver:
    """Plans installs from CivitAI versions (see the module docstring).

    ``endpoint``: ``None`` uses ``CIVITAI_ENDPOINT`` from the environment, else https://civitai.com.
    ``token``: ``None`` reads ``CIVITAI_TOKEN``; ``False`` sends none.
    """

    def __init__(
        self, client: httpx.Client, *, endpoint: str | None = None, token: str | bool | None = None
    ) -> None:
        self._client = client
        self.endpoint = (endpoint or os.environ.get("CIVITAI_ENDPOINT") or CIVITAI_ENDPOINT).rstrip("/")
        if token is None:
            token = os.environ.get("CIVITAI_TOKEN") or False
        self._headers = {"Authorization": f"Bearer {token}"} if isinstance(token, str) and token else {}

    @property
    def host(self) -> str:
        """``host[:port]`` of the endpoint, so that its page URLs parse as CivitAI sources."""
        return urlsplit(self.endpoint).netloc

    def plan(
        self, source: CivitaiSource, *, model_type: str | None = None, name: str | None = None
    ) -> InstallPlan:
        version_id = source.version_id
        if version_id is None:
            model = self._get(f"/api/v1/models/{source.model_id}", what=f"CivitAI model {source.model_id}")
            versions = model.get("modelVersions") or []
            if not versions:
                raise RemoteNotFound(f"CivitAI model {source.model_id}: has no versions")
            version_id = int(versions[0]["id"])
        what = f"civitai:{version_id}"
        version = self._get(f"/api/v1/model-versions/{version_id}", what=what)
        file = self._primary_file(version, what)
        file_name = safe_relative(str(file["name"]), what=what)
        if "/" in file_name:
            raise InstallError(f"{what}: file name {file_name!r} has a folder in it", file=file_name)
        url = str(file["downloadUrl"])
        check_scheme(url, what=what)
        sha256 = (file.get("hashes") or {}).get("SHA256")
        size_kb = file.get("sizeKB")
        kind = (version.get("model") or {}).get("type", "")
        return InstallPlan(
            source=what,
            kind="civitai",
            revision=str(version_id),
            name=safe_relative(name or file_name, what=what),
            model_type=model_type or CIVITAI_TYPES.get(str(kind).lower(), "other"),
            is_folder=False,
            files=(
                RemoteFile(
                    relative=file_name,
                    url=url,
                    size=round(float(size_kb) * 1024) if size_kb is not None else None,
                    sha256=str(sha256).lower() if sha256 else None,
                    headers=SecretHeaders(self._headers),
                ),
            ),
        )

    @staticmethod
    def _primary_file(version: dict[str, Any], what: str) -> dict[str, Any]:
        files = [f for f in version.get("files") or [] if isinstance(f, dict)]
        if not files:
            raise RemoteNotFound(f"{what}: the version has no files")
        primary = [f for f in files if f.get("primary")]
        models = [f for f in files if str(f.get("type", "Model")).lower() == "model"]
        return (primary or models or files)[0]

    def _get(self, path: str, *, what: str) -> dict[str, Any]:
        try:
            response = open_stream(self._client, self.endpoint + path, self._headers, what=what)
            with contextlib.closing(response):
                raise_for_status(response, what=what)
                response.read()
        except httpx.TransportError as exc:
            raise (SourceUnreachable if unreachable(exc) else DownloadFailed)(
                f"{what}: cannot reach CivitAI at {self.endpoint}: {type(exc).__name__}"
            ) from None
        try:
            data = response.json()
        except ValueError:
            raise InstallError(f"{what}: CivitAI answered something other than JSON") from None
        if not isinstance(data, dict):
            raise InstallError(f"{what}: CivitAI answered an unexpected document")
        return data
