"""Discovery: find model files and folders, identify them from their headers, hash them.

Services (see each module's docstring for the interface and its errors):

- :class:`Scanner` (``scanner.py``): walk roots, identify new and changed entries, keep the
  catalog in step; ``watch()`` rescans on changes.
- :class:`Hasher` (``hasher.py``): BLAKE3 + SHA-256 (AutoV2) and component content ids, in the
  background, cached by (path, size, mtime).
- :func:`examine` / :func:`identify_table`: identify one candidate / one tensor table by the rule
  tables of ``rules/``.

Both write through discovery's own port, :class:`CatalogWriter` (``ports.py``), which the registry
implements: discovery never imports the registry.

Errors: ``errors.py`` (rejections are FormatErrors with protocol error codes).
"""

from modelkeeper.discovery.errors import (
    BrokenConfig,
    BrokenSymlink,
    DiscoveryError,
    EmptyFile,
    FileChanged,
    FileVanished,
    OutsideRoots,
    RootNotFound,
    SymlinkLoop,
    UnreadableFile,
)
from modelkeeper.discovery.examine import examine
from modelkeeper.discovery.hasher import Hasher, HashJob, HashProgress, HashReport
from modelkeeper.discovery.hashing import FileHashes, hash_file
from modelkeeper.discovery.identify import RULES_VERSION, identify_table
from modelkeeper.discovery.ports import CatalogWriter, FileRow, HashTask
from modelkeeper.discovery.records import (
    Base,
    ComponentInfo,
    EncoderKind,
    Identification,
    Layout,
    LoraFormat,
    LoraInfo,
    ModelFormat,
    ModelType,
    Variant,
)
from modelkeeper.discovery.scanner import ScanEntry, Scanner, ScanProgress, ScanReport
from modelkeeper.discovery.walker import Candidate, CandidateKind, Walker

__all__ = [
    "RULES_VERSION",
    "Base",
    "BrokenConfig",
    "BrokenSymlink",
    "Candidate",
    "CandidateKind",
    "CatalogWriter",
    "ComponentInfo",
    "DiscoveryError",
    "EmptyFile",
    "EncoderKind",
    "FileChanged",
    "FileHashes",
    "FileRow",
    "FileVanished",
    "HashJob",
    "HashProgress",
    "HashReport",
    "HashTask",
    "Hasher",
    "Identification",
    "Layout",
    "LoraFormat",
    "LoraInfo",
    "ModelFormat",
    "ModelType",
    "OutsideRoots",
    "RootNotFound",
    "ScanEntry",
    "ScanProgress",
    "ScanReport",
    "Scanner",
    "SymlinkLoop",
    "UnreadableFile",
    "Variant",
    "Walker",
    "examine",
    "hash_file",
    "identify_table",
]
