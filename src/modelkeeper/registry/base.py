"""The registry's connection, lock and transactions, shared by its parts."""

from __future__ import annotations

import json
import os
import random
import sqlite3
import threading
from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Self

from modelkeeper.registry.migrations import migrate

DEFAULT_DB_ENV = "MODELKEEPER_DB"


def default_db_path() -> Path:
    """``$MODELKEEPER_DB``, else ``~/.local/share/modelkeeper/registry.sqlite3``."""
    env = os.environ.get(DEFAULT_DB_ENV)
    if env:
        return Path(env).expanduser()
    return Path.home() / ".local" / "share" / "modelkeeper" / "registry.sqlite3"


_IDS = random.Random(int.from_bytes(os.urandom(16), "big"))  # ids need uniqueness, not secrecy


def new_model_id() -> str:
    """``m-`` and 12 random hex digits; an insert that meets a taken id draws again."""
    return f"m-{_IDS.getrandbits(48):012x}"


class Store:
    """One SQLite connection behind one lock; ``transaction()`` nests."""

    def __init__(self, conn: sqlite3.Connection, path: str) -> None:
        self._conn = conn
        self._lock = threading.RLock()
        self._depth = 0
        self.path = path

    # ------------------------------------------------------------------ lifecycle

    @classmethod
    def open(cls, path: str | os.PathLike[str] | None = None) -> Self:
        """Open (or create) the registry at ``path`` (``":memory:"`` for a throwaway one)."""
        spath = str(default_db_path() if path is None else path)
        if spath != ":memory:":
            Path(spath).parent.mkdir(parents=True, exist_ok=True)
        conn = sqlite3.connect(spath, isolation_level=None, check_same_thread=False, timeout=30.0)
        conn.row_factory = sqlite3.Row
        if spath != ":memory:":
            conn.execute("PRAGMA journal_mode=WAL")
        conn.execute("PRAGMA synchronous=NORMAL")
        conn.execute("PRAGMA cache_size=-32000")
        conn.execute("PRAGMA foreign_keys=ON")
        migrate(conn)
        return cls(conn, spath)

    def close(self) -> None:
        with self._lock:
            self._conn.close()

    def __enter__(self) -> Self:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    @contextmanager
    def transaction(self) -> Iterator[sqlite3.Connection]:
        """One write transaction; nested calls join the outer one."""
        with self._lock:
            if self._depth == 0:
                self._conn.execute("BEGIN IMMEDIATE")
            self._depth += 1
            try:
                yield self._conn
            except BaseException:
                self._depth -= 1
                if self._depth == 0:
                    self._conn.execute("ROLLBACK")
                raise
            self._depth -= 1
            if self._depth == 0:
                self._conn.execute("COMMIT")

    def _rows(self, sql: str, params: Sequence[Any] = ()) -> list[sqlite3.Row]:
        with self._lock:
            return list(self._conn.execute(sql, params).fetchall())

    def _log(
        self, model_id: str | None, path: str | None, op: str, data: Mapping[str, Any], now: float
    ) -> None:
        self._conn.execute(
            "INSERT INTO history (model_id, path, at, op, data) VALUES (?,?,?,?,?)",
            (model_id, path, now, op, json.dumps(data)),
        )
