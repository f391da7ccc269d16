"""Installing models: fetch from the Hugging Face Hub (huggingface_hub), plain URLs and CivitAI
(httpx) into a model root, resumable and verified, never half-written.

``Installer().install("org/name", root, progress=..., cancel=event)`` returns an
:class:`InstallResult` (the path to register, its files with sizes and SHA-256, the revision);
registering it is the caller's part. See docs/INSTALL.md.
"""

from modelkeeper.install.base import ModelInstaller, ProgressCallback
from modelkeeper.install.civitai import CivitaiResolver
from modelkeeper.install.errors import (
    AccessDenied,
    ChecksumMismatch,
    DestinationExists,
    DownloadFailed,
    InstallCancelled,
    InstallError,
    InsufficientDisk,
    IntegrityError,
    InvalidSource,
    RemoteNotFound,
    SizeMismatch,
    SourceUnreachable,
    UnsafeSource,
    redact_url,
)
from modelkeeper.install.hub import HubResolver
from modelkeeper.install.installer import PARTIAL_DIR, Installer, KnownFiles
from modelkeeper.install.plan import (
    DEFAULT_FOLDERS,
    InstalledFile,
    InstallPlan,
    InstallProgress,
    InstallResult,
    RemoteFile,
    SecretHeaders,
    folder_for,
)
from modelkeeper.install.sources import CivitaiSource, HubSource, Source, UrlSource, parse_source
from modelkeeper.install.urls import UrlResolver

__all__ = [
    "DEFAULT_FOLDERS",
    "PARTIAL_DIR",
    "AccessDenied",
    "ChecksumMismatch",
    "CivitaiResolver",
    "CivitaiSource",
    "DestinationExists",
    "DownloadFailed",
    "HubResolver",
    "HubSource",
    "InstallCancelled",
    "InstallError",
    "InstallPlan",
    "InstallProgress",
    "InstallResult",
    "InstalledFile",
    "Installer",
    "InsufficientDisk",
    "IntegrityError",
    "InvalidSource",
    "KnownFiles",
    "ModelInstaller",
    "ProgressCallback",
    "RemoteFile",
    "RemoteNotFound",
    "SecretHeaders",
    "SizeMismatch",
    "Source",
    "SourceUnreachable",
    "UnsafeSource",
    "UrlResolver",
    "UrlSource",
    "folder_for",
    "parse_source",
    "redact_url",
]
