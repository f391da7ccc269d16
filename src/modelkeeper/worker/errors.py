"""Errors of the worker.

Hierarchy::

    ProtocolError (modelkeeper.protocol)
    ├── FormatError and subclasses (modelkeeper.formats.errors)   the file cannot be loaded
    └── WorkerError                                              the request cannot be served now
        ├── InvalidRequest        INVALID_REQUEST   a field is wrong or missing (names the field)
        ├── WorkerModelNotFound   MODEL_NOT_FOUND   no loaded model of that name (info)
        ├── WorkerNotLoaded       NOT_LOADED        unload of a name that is not loaded
        ├── AlreadyLoaded         ALREADY_LOADED    a model of that name is loaded (use replace)
        ├── InsufficientMemory    INSUFFICIENT_MEMORY  does not fit the budget   (recoverable)
        ├── Cancelled             CANCELLED         control.cancel stopped it  (recoverable)
        └── Busy                  BUSY              the worker is stopping     (recoverable)

Anything else raised while serving a request becomes INTERNAL with the exception's text; the
worker keeps serving.
"""

from __future__ import annotations

from modelkeeper.protocol.errors import ErrorCode, ProtocolError


class WorkerError(ProtocolError):
    code = ErrorCode.INTERNAL


class InvalidRequest(WorkerError):
    code = ErrorCode.INVALID_REQUEST


class WorkerModelNotFound(WorkerError):
    """No loaded model of that name (the registry's ``ModelNotFound`` is about model references)."""

    code = ErrorCode.MODEL_NOT_FOUND


class WorkerNotLoaded(WorkerError):
    code = ErrorCode.NOT_LOADED


class AlreadyLoaded(WorkerError):
    code = ErrorCode.ALREADY_LOADED


class InsufficientMemory(WorkerError):
    code = ErrorCode.INSUFFICIENT_MEMORY


class Cancelled(WorkerError):
    code = ErrorCode.CANCELLED


class Busy(WorkerError):
    code = ErrorCode.BUSY
