"""Errors of the registry.

Hierarchy::

    ProtocolError (modelkeeper.protocol)
    └── RegistryError                   INTERNAL: the registry cannot do what was asked
        ├── ModelNotFound               MODEL_NOT_FOUND: no model answers to that id, name, path or hash
        ├── AmbiguousReference          INVALID_REQUEST: several models answer; ``details["matches"]`` lists them
        ├── InvalidMetadata             INVALID_REQUEST: an unknown metadata key or a value of the wrong shape
        ├── InvalidFilter               INVALID_REQUEST: a listing filter (type, base, format, status) with
        │                               an unknown value; ``details``: field, value, valid, aliases
        └── MigrationError              INTERNAL: the database is newer than this code, or a migration failed

``ModelNotFound``, ``AmbiguousReference``, ``InvalidMetadata`` and ``InvalidFilter`` are the caller's to fix (another
reference, another value); ``MigrationError`` needs an upgrade or a new database file.
"""

from __future__ import annotations

from modelkeeper.protocol.errors import ErrorCode, ProtocolError

__all__ = [
    "AmbiguousReference",
    "InvalidFilter",
    "InvalidMetadata",
    "MigrationError",
    "ModelNotFound",
    "RegistryError",
]


class RegistryError(ProtocolError):
    code = ErrorCode.INTERNAL


class ModelNotFound(RegistryError):
    code = ErrorCode.MODEL_NOT_FOUND


class AmbiguousReference(RegistryError):
    code = ErrorCode.INVALID_REQUEST


class InvalidMetadata(RegistryError):
    code = ErrorCode.INVALID_REQUEST


class InvalidFilter(RegistryError):
    code = ErrorCode.INVALID_REQUEST


class MigrationError(RegistryError):
    code = ErrorCode.INTERNAL
