"""Errors of the RAM cache.

Hierarchy::

    ProtocolError (modelkeeper.protocol)
    └── CacheError                      INTERNAL: a segment could not be created or filled
        ├── CacheFull                   INSUFFICIENT_MEMORY: does not fit the budget even after eviction (recoverable)
        ├── SegmentNotFound             MODEL_NOT_FOUND: no segment with that component id or prefix (the HTTP API: 404 NOT_FOUND)
        ├── AmbiguousSegment            INVALID_REQUEST: a prefix of several segments' ids (``details["matches"]``)
        └── SegmentInUse                BUSY: a worker is loading from it (recoverable)

File problems raise the FormatError family of :mod:`modelkeeper.formats.errors`, among them::

    InvalidModelFile (modelkeeper.formats)  INVALID_MODEL_FILE
    └── SourceChanged                       the source was truncated, rewritten or replaced while it
                                            was copied (recoverable: rescan, then load again)
"""

from __future__ import annotations

from modelkeeper.formats.errors import InvalidModelFile
from modelkeeper.protocol.errors import ErrorCode, ProtocolError


class CacheError(ProtocolError):
    code = ErrorCode.INTERNAL


class CacheFull(CacheError):
    code = ErrorCode.INSUFFICIENT_MEMORY


class SegmentNotFound(CacheError):
    code = ErrorCode.MODEL_NOT_FOUND


class AmbiguousSegment(CacheError):
    code = ErrorCode.INVALID_REQUEST


class SegmentInUse(CacheError):
    code = ErrorCode.BUSY


class SourceChanged(InvalidModelFile):
    """A source file changed (size, mtime, ctime, inode) or ended early while it was copied."""
