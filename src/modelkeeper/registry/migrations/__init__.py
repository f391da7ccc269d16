"""Numbered schema migrations: ``m0001_initial``, ``m0002_user_metadata``...

Each module has ``VERSION``, ``DESCRIPTION`` and ``up(conn)``. :func:`migrate` applies, in order,
those above the database's ``PRAGMA user_version``, each in its own transaction, and sets the
version after each. A database newer than the code is refused (MigrationError), never touched.
"""

from __future__ import annotations

import sqlite3
from collections.abc import Callable
from dataclasses import dataclass
from types import ModuleType

from modelkeeper.registry.errors import MigrationError
from modelkeeper.registry.migrations import (
    m0001_initial,
    m0002_user_metadata,
    m0003_locations,
    m0004_model_bases,
    m0005_live_ids,
)


@dataclass(frozen=True)
class Migration:
    version: int
    description: str
    up: Callable[[sqlite3.Connection], None]


def _migration(module: ModuleType) -> Migration:
    return Migration(int(module.VERSION), str(module.DESCRIPTION), module.up)


MIGRATIONS: tuple[Migration, ...] = tuple(
    _migration(m)
    for m in (
        m0001_initial,
        m0002_user_metadata,
        m0003_locations,
        m0004_model_bases,
        m0005_live_ids,
    )
)
LATEST = MIGRATIONS[-1].version


def current_version(conn: sqlite3.Connection) -> int:
    return int(conn.execute("PRAGMA user_version").fetchone()[0])


def migrate(conn: sqlite3.Connection, target: int | None = None) -> list[int]:
    """Bring ``conn`` to ``target`` (default: the latest); returns the versions applied."""
    target = LATEST if target is None else target
    version = current_version(conn)
    if version > LATEST:
        raise MigrationError(f"database schema version {version} is newer than this modelkeeper ({LATEST})")
    applied: list[int] = []
    for m in MIGRATIONS:
        if version < m.version <= target:
            try:
                conn.execute("BEGIN IMMEDIATE")
                m.up(conn)
                conn.execute(f"PRAGMA user_version = {m.version:d}")
                conn.execute("COMMIT")
            except sqlite3.Error as exc:
                conn.execute("ROLLBACK")
                raise MigrationError(f"migration {m.version} ({m.description}) failed: {exc}") from exc
            applied.append(m.version)
    return applied
