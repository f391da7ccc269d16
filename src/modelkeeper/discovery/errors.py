"""Errors of discovery: scanning roots, identifying files, hashing.

Hierarchy::

    ProtocolError (modelkeeper.protocol)
    ├── FormatError (modelkeeper.formats)       a file cannot be used as a model file
    │   ├── ModelFileNotFound                   FILE_NOT_FOUND
    │   │   ├── FileVanished                    deleted (or unmounted) while the scan ran
    │   │   ├── BrokenSymlink                   a link whose target does not exist
    │   │   ├── SymlinkLoop                     a link that leads back to a folder being walked
    │   │   └── OutsideRoots                    a link that leaves the scan roots (not allowed)
    │   ├── UnsupportedFormat                   UNSUPPORTED_FORMAT
    │   └── InvalidModelFile                    INVALID_MODEL_FILE
    │       ├── UnreadableFile                  permission denied or an I/O error
    │       ├── EmptyFile                       zero bytes
    │       ├── FileChanged                     truncated, rewritten or replaced while it was read
    │       └── BrokenConfig                    config.json / model_index.json is not valid JSON
    └── DiscoveryError                          INVALID_REQUEST: the scan itself cannot run
        └── RootNotFound                        a scan root does not exist or is not a folder

Every FormatError raised while scanning is caught by the scanner and recorded as a *rejected*
entry with its code and message; the scan goes on. ``DiscoveryError`` stops a scan before it
starts. None of them is recoverable by retrying: the file, the link or the arguments must change;
but ``FileChanged`` says that they did (a copy over the file still running): reading the file
again once its writer is done succeeds.

``NotAMatch`` is not an error a caller sees: a rule raises it to say "this rule does not apply",
and the identification engine tries the next rule.
"""

from __future__ import annotations

from modelkeeper.formats.errors import InvalidModelFile, ModelFileNotFound
from modelkeeper.protocol.errors import ErrorCode, ProtocolError

__all__ = [
    "BrokenConfig",
    "BrokenSymlink",
    "DiscoveryError",
    "EmptyFile",
    "FileChanged",
    "FileVanished",
    "NotAMatch",
    "OutsideRoots",
    "RootNotFound",
    "SymlinkLoop",
    "UnreadableFile",
]


class DiscoveryError(ProtocolError):
    code = ErrorCode.INVALID_REQUEST


class RootNotFound(DiscoveryError):
    pass


class FileVanished(ModelFileNotFound):
    pass


class BrokenSymlink(ModelFileNotFound):
    pass


class SymlinkLoop(ModelFileNotFound):
    pass


class OutsideRoots(ModelFileNotFound):
    pass


class UnreadableFile(InvalidModelFile):
    pass


class EmptyFile(InvalidModelFile):
    pass


class FileChanged(InvalidModelFile):
    """The file's size, mtime, ctime or inode changed, or it ended early, while it was read."""


class BrokenConfig(InvalidModelFile):
    pass


class NotAMatch(Exception):
    """Raised by a rule that does not apply; carries the reason for debugging."""
