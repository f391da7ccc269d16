"""Errors of the orchestrator.

Hierarchy::

    ProtocolError (modelkeeper.protocol)
    └── OrchestratorError            INTERNAL: the service cannot do what was asked
        ├── DeviceNotFound           INVALID_REQUEST: no worker runs on that device
        ├── InvalidReference         INVALID_REQUEST: a model reference no path can hold (a NUL byte)
        ├── JobNotFound              INVALID_REQUEST: no job of that id
        ├── IncompatiblePart         INVALID_REQUEST: a part pinned for a transformer does not fit it
        ├── LeaseNotFound            INVALID_REQUEST: no lease of that id (or it expired)
        ├── LoadedDifferently        ALREADY_LOADED: loaded (or loading) in another dtype, storage or
        │                            offload than a load asks for; unload it first or pass reload
        ├── NotLoadable              INVALID_REQUEST: a LoRA, an embedding...: the model is no model to load
        ├── MissingPart              INVALID_REQUEST: no model in the registry fits a part a transformer needs
        ├── ModelInUse               BUSY: a lease or a running operation holds the model; retry or use force
        ├── NotLoaded                NOT_LOADED: the operation needs the model loaded on a device
        ├── NotPlaceable             INSUFFICIENT_MEMORY: no device has room, even after allowed evictions
        ├── PathOutsideRoots         INVALID_REQUEST: a path resolves outside every model root
        └── ServiceNotReady          BUSY: the service is starting or stopping
            └── DeviceNotReady       BUSY: no worker runs on the device (it did not start, or
                                     gave up restarting); the message says why

Errors of the registry, the cache and the workers pass through unchanged: every one carries its
protocol ``code``; the API maps codes (and these classes) to HTTP statuses.
"""

from __future__ import annotations

from modelkeeper.protocol.errors import ErrorCode, ProtocolError

__all__ = [
    "DeviceNotFound",
    "DeviceNotReady",
    "IncompatiblePart",
    "InvalidReference",
    "JobNotFound",
    "LeaseNotFound",
    "LoadedDifferently",
    "MissingPart",
    "ModelInUse",
    "NotLoadable",
    "NotLoaded",
    "NotPlaceable",
    "OrchestratorError",
    "PathOutsideRoots",
    "ServiceNotReady",
]


class OrchestratorError(ProtocolError):
    code = ErrorCode.INTERNAL


class DeviceNotFound(OrchestratorError):
    code = ErrorCode.INVALID_REQUEST


class InvalidReference(OrchestratorError):
    code = ErrorCode.INVALID_REQUEST


class JobNotFound(OrchestratorError):
    code = ErrorCode.INVALID_REQUEST


class LeaseNotFound(OrchestratorError):
    code = ErrorCode.INVALID_REQUEST


class IncompatiblePart(OrchestratorError):
    code = ErrorCode.INVALID_REQUEST


class MissingPart(OrchestratorError):
    code = ErrorCode.INVALID_REQUEST


class LoadedDifferently(OrchestratorError):
    code = ErrorCode.ALREADY_LOADED


class NotLoadable(OrchestratorError):
    code = ErrorCode.INVALID_REQUEST


class ModelInUse(OrchestratorError):
    code = ErrorCode.BUSY


class NotLoaded(OrchestratorError):
    code = ErrorCode.NOT_LOADED


class NotPlaceable(OrchestratorError):
    code = ErrorCode.INSUFFICIENT_MEMORY


class PathOutsideRoots(OrchestratorError):
    code = ErrorCode.INVALID_REQUEST


class ServiceNotReady(OrchestratorError):
    code = ErrorCode.BUSY


class DeviceNotReady(ServiceNotReady):
    """The API answers it as NOT_READY (503), as the service not ready: this device is not."""
