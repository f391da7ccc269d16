"""A fake CivitAI: the subset of CivitAI's public REST API that an install uses, served from local files.

- ``GET /api/v1/model-versions/{id}``: ``id``, ``modelId``, ``name``, ``model`` (``name``,
  ``type``) and ``files`` (``name``, ``sizeKB``, ``type``, ``primary``, ``hashes.SHA256``,
  ``downloadUrl``).
- ``GET /api/v1/models/{id}``: ``id``, ``name``, ``type``, ``modelVersions`` (newest first).
- ``GET /api/download/models/{version id}``: a ``307`` to ``/storage/{version id}/{file name}``
  on another host name (``localhost``: CivitAI sends downloads to its storage host), which serves the bytes with ``Range``. A version
  marked ``token_required`` answers ``401`` without ``Authorization: Bearer`` :attr:`FakeCivitai.token`.

Faults (:class:`~modelkeeper.testing.httpserver.Faults`) are set per file name.
"""

from __future__ import annotations

from dataclasses import dataclass
from http.server import BaseHTTPRequestHandler
from pathlib import Path
from urllib.parse import quote, unquote

from modelkeeper.testing.httpserver import Faults, Request, TestServer
from modelkeeper.testing.hubserver import sha256_of

__all__ = ["CivitaiVersion", "FakeCivitai"]


@dataclass
class CivitaiVersion:
    version_id: int
    model_id: int
    local: Path
    file_name: str
    model_type: str
    sha256: str
    token_required: bool = False


class FakeCivitai(TestServer):
    """The fake CivitAI (see the module docstring); :meth:`add_version` publishes a file."""

    token = "civitai_fake_token_never_shown"

    def __init__(self) -> None:
        super().__init__()
        self.versions: dict[int, CivitaiVersion] = {}

    def add_version(
        self,
        version_id: int,
        local: Path,
        *,
        model_id: int | None = None,
        model_type: str = "Checkpoint",
        file_name: str | None = None,
        sha256: str | None = None,
        token_required: bool = False,
    ) -> CivitaiVersion:
        """Publish ``local`` as the one file of model version ``version_id`` (``sha256``: a declared
        hash other than the file's, for tests of a wrong declaration)."""
        version = CivitaiVersion(
            version_id,
            model_id if model_id is not None else version_id * 10,
            local,
            file_name or local.name,
            model_type,
            sha256 or sha256_of(local),
            token_required,
        )
        self.versions[version_id] = version
        return version

    def fault(self, file_name: str) -> Faults:
        return self.faults.setdefault(file_name, Faults())

    def route(self, handler: BaseHTTPRequestHandler, request: Request) -> None:
        parts = [unquote(p) for p in request.path.split("/")[1:]]
        if parts[:3] == ["api", "v1", "model-versions"] and len(parts) == 4 and parts[3].isdigit():
            version = self.versions.get(int(parts[3]))
            if version is None:
                self.send_json(handler, {"error": f"No model version with id {parts[3]}"}, status=404)
            else:
                self.send_json(handler, self._version_json(version))
        elif parts[:3] == ["api", "v1", "models"] and len(parts) == 4 and parts[3].isdigit():
            model_id = int(parts[3])
            versions = sorted(
                (v for v in self.versions.values() if v.model_id == model_id), key=lambda v: -v.version_id
            )
            if not versions:
                self.send_json(handler, {"error": f"No model with id {model_id}"}, status=404)
            else:
                body = {
                    "id": model_id,
                    "name": f"model {model_id}",
                    "type": versions[0].model_type,
                    "modelVersions": [self._version_json(v) for v in versions],
                }
                self.send_json(handler, body)
        elif parts[:3] == ["api", "download", "models"] and len(parts) == 4 and parts[3].isdigit():
            self._download(handler, request, int(parts[3]))
        elif parts[:1] == ["storage"] and len(parts) == 3 and parts[1].isdigit():
            version = self.versions.get(int(parts[1]))
            if version is None or version.file_name != parts[2]:
                self.send_json(handler, {"error": "no such object"}, status=404)
            else:
                self.send_file(handler, request, version.file_name, version.local)
        else:
            self.send_json(handler, {"error": "not found"}, status=404)

    def _download(self, handler: BaseHTTPRequestHandler, request: Request, version_id: int) -> None:
        version = self.versions.get(version_id)
        if version is None:
            self.send_json(handler, {"error": "not found"}, status=404)
        elif version.token_required and request.bearer != self.token:
            self.send_json(handler, {"error": "Unauthorized: this model requires login"}, status=401)
        else:
            faults = self.faults.get(version.file_name)
            target = faults.redirect_to if faults is not None and faults.redirect_to else None
            handler.send_response(307)
            storage = self.url.replace("127.0.0.1", "localhost")  # another host, as CivitAI's storage is
            handler.send_header(
                "Location", target or f"{storage}/storage/{version_id}/{quote(version.file_name)}"
            )
            handler.send_header("Content-Length", "0")
            handler.end_headers()

    def _version_json(self, version: CivitaiVersion) -> dict[str, object]:
        size = version.local.stat().st_size
        return {
            "id": version.version_id,
            "modelId": version.model_id,
            "name": f"v{version.version_id}",
            "model": {"name": f"model {version.model_id}", "type": version.model_type},
            "files": [
                {
                    "id": version.version_id * 100,
                    "name": version.file_name,
                    "sizeKB": size / 1024,
                    "type": "Model",
                    "primary": True,
                    "hashes": {"SHA256": version.sha256.upper()},
                    "downloadUrl": f"{self.url}/api/download/models/{version.version_id}",
                }
            ],
        }
