"""Errors of reading model files.

Hierarchy::

    ProtocolError (modelkeeper.protocol)
    └── FormatError                 a file cannot be used as a model file
        ├── ModelFileNotFound       FILE_NOT_FOUND: missing path or required file
        ├── UnsupportedFormat       UNSUPPORTED_FORMAT: a format or layout this version cannot read
        ├── InvalidModelFile        INVALID_MODEL_FILE: broken header, truncated data, bad keys/shapes
        └── UnsafePickle            UNSAFE_PICKLE: a pickle that references globals off the allowlist

None of them is recoverable by retrying: the file must change. Each message names the file.
"""

from __future__ import annotations

from modelkeeper.protocol.errors import ErrorCode, ProtocolError


class FormatError(ProtocolError):
    code = ErrorCode.INVALID_MODEL_FILE


class ModelFileNotFound(FormatError):
    code = ErrorCode.FILE_NOT_FOUND


class UnsupportedFormat(FormatError):
    code = ErrorCode.UNSUPPORTED_FORMAT


class InvalidModelFile(FormatError):
    code = ErrorCode.INVALID_MODEL_FILE


class UnsafePickle(FormatError):
    code = ErrorCode.UNSAFE_PICKLE
