"""The install service's interface: resolve a source to a plan, install it into a model root.

Errors are the :mod:`modelkeeper.install.errors` family. ``install`` is synchronous and blocking:
a job runs it on a thread and cancels it through the ``cancel`` event; ``progress`` is called on
that thread. Registering the result in the registry is the caller's part.
"""

from __future__ import annotations

import threading
from abc import ABC, abstractmethod
from collections.abc import Callable
from pathlib import Path

from modelkeeper.install.plan import InstallPlan, InstallProgress, InstallResult

__all__ = ["ModelInstaller", "ProgressCallback"]

ProgressCallback = Callable[[InstallProgress], None]


class ModelInstaller(ABC):
    @abstractmethod
    def resolve(
        self,
        source: str,
        *,
        model_type: str | None = None,
        name: str | None = None,
        sha256: str | None = None,
    ) -> InstallPlan:
        """What installing ``source`` would fetch, and under which name and type; nothing is written.

        Raises InvalidSource / UnsafeSource (bad text or listing), AccessDenied (401/403),
        RemoteNotFound (404), DownloadFailed (the server cannot be reached).
        """

    @abstractmethod
    def install(
        self,
        source: str,
        root: Path,
        *,
        model_type: str | None = None,
        name: str | None = None,
        sha256: str | None = None,
        progress: ProgressCallback | None = None,
        cancel: threading.Event | None = None,
    ) -> InstallResult:
        """Fetch ``source`` into ``root`` (folder by type), verified; return what was written.

        ``model_type`` overrides the type the source suggests (it picks the folder); ``name`` the
        file or folder name; ``sha256`` declares the checksum of a plain URL's file. Besides the
        errors of :meth:`resolve`: DestinationExists, InsufficientDisk, ChecksumMismatch,
        SizeMismatch, DownloadFailed and InstallCancelled (these two keep the partial download,
        so installing again resumes it). On any error nothing is left at the destination.
        """
