"""The registry: SQLite (WAL) store of files, models, components, user metadata and history.

``Registry.open(path)`` is the service (``store.py``); ``worker_spec`` maps a model id to what a
worker loads (``mapping.py``); queries live in ``search.py``; the schema in numbered migrations
(``migrations/``). Errors: ``errors.py``.
"""

from modelkeeper.registry.errors import (
    AmbiguousReference,
    InvalidFilter,
    InvalidMetadata,
    MigrationError,
    ModelNotFound,
    RegistryError,
)
from modelkeeper.registry.mapping import worker_spec
from modelkeeper.registry.records import (
    META_KEYS,
    FileRecord,
    FileStatus,
    Hashes,
    HistoryEntry,
    ModelRecord,
    ModelSummary,
    SearchPage,
    UserMeta,
)
from modelkeeper.registry.store import DEFAULT_DB_ENV, Registry, default_db_path

__all__ = [
    "DEFAULT_DB_ENV",
    "META_KEYS",
    "AmbiguousReference",
    "FileRecord",
    "FileStatus",
    "Hashes",
    "HistoryEntry",
    "InvalidFilter",
    "InvalidMetadata",
    "MigrationError",
    "ModelNotFound",
    "ModelRecord",
    "ModelSummary",
    "Registry",
    "RegistryError",
    "SearchPage",
    "UserMeta",
    "default_db_path",
    "worker_spec",
]
