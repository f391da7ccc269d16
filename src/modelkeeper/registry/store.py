"""The registry: one SQLite file (WAL mode) of files, models, components, user metadata and history.

Interface (all methods are thread-safe; one connection, one lock):

- ``Registry.open(path)`` / ``close()``: open (creating and migrating) or close the database.
- ``resolve(ref)``: a model by id, name, path or hash prefix (BLAKE3, SHA-256, AutoV2).
  Raises ModelNotFound or AmbiguousReference.
- ``get(model_id)``, ``search(...)``, ``history(model_id)``: read.
- ``set_meta(model_id, values)``: user metadata; raises InvalidMetadata.
- ``worker_spec(model_id, component)``: what a worker needs to load it (see ``mapping.py``).
- The scanner and the hasher write through discovery's port, ``CatalogWriter``
  (``modelkeeper.discovery.ports``), which the registry implements (``writes.py``): ``record_model``,
  ``record_rejected``, ``move_file``, ``mark_missing``, ``record_hashes``, ``reconcile_moves``...

Model ids are stable: a model keeps its id, name and metadata across rescans, renames and moves
(a move is recognised by device and inode during a scan, or by content hash after hashing).
"""

from __future__ import annotations

import json
import sqlite3
import time
from collections.abc import Mapping, Sequence
from typing import Any

from modelkeeper.discovery.records import Identification
from modelkeeper.registry import mapping, search
from modelkeeper.registry.base import DEFAULT_DB_ENV, default_db_path, new_model_id
from modelkeeper.registry.errors import AmbiguousReference, InvalidMetadata, ModelNotFound
from modelkeeper.registry.records import (
    META_KEYS,
    FileRecord,
    FileStatus,
    Hashes,
    HistoryEntry,
    ModelRecord,
    SearchPage,
    UserMeta,
)
from modelkeeper.registry.writes import ScanWrites

__all__ = ["DEFAULT_DB_ENV", "Registry", "default_db_path", "new_model_id"]


class Registry(ScanWrites):
    """The model registry; see the module docstring."""

    # ------------------------------------------------------------------ reading

    def get(self, model_id: str) -> ModelRecord:
        with self._lock:
            row = self._conn.execute("SELECT * FROM models WHERE id=?", (model_id,)).fetchone()
            if row is None:
                raise ModelNotFound(f"no model with id {model_id!r}", model_id=model_id)
            file_row = self._conn.execute(
                "SELECT * FROM files WHERE model_id=? ORDER BY status='ok' DESC, last_seen DESC LIMIT 1",
                (model_id,),
            ).fetchone()
            meta = self._conn.execute("SELECT * FROM model_meta WHERE model_id=?", (model_id,)).fetchone()
            tags = [
                r[0]
                for r in self._conn.execute(
                    "SELECT tag FROM model_tags WHERE model_id=? ORDER BY tag", (model_id,)
                )
            ]
            comps = self._conn.execute(
                "SELECT * FROM components WHERE model_id=? ORDER BY id", (model_id,)
            ).fetchall()
        ident = Identification.model_validate_json(row["identification"])
        by_name = {c.name: c for c in ident.components}
        components = []
        for c in comps:
            info = by_name.get(c["name"])
            if info is not None:
                components.append(info.model_copy(update={"content_id": c["content_id"]}))
        return ModelRecord(
            id=row["id"],
            name=row["name"],
            name_source=row["name_source"],
            type=row["type"],
            base=row["base"],
            variant=row["variant"],
            format=row["format"],
            layout=row["layout"],
            encoder=row["encoder"],
            lora_format=row["lora_format"],
            lora_rank=row["lora_rank"],
            rule=row["rule"],
            confidence=row["confidence"],
            status=row["status"],
            size=row["size"],
            created_at=row["created_at"],
            updated_at=row["updated_at"],
            file=_file_record(file_row) if file_row else None,
            components=components,
            meta=_user_meta(meta, tags),
            identification=ident,
        )

    def resolve(self, ref: str) -> ModelRecord:
        """A model by id, path, name (case-insensitive) or hash prefix (BLAKE3, SHA-256, AutoV2; 6+ hex digits)."""
        ref = ref.strip()
        if not ref:
            raise ModelNotFound("empty model reference")
        for finder in (search.by_id, search.by_path, search.by_name, search.by_hash):
            with self._lock:
                ids = finder(self._conn, ref)
            if len(ids) == 1:
                return self.get(ids[0])
            if len(ids) > 1:
                raise AmbiguousReference(f"{ref!r} matches {len(ids)} models", matches=ids[:20])
        raise ModelNotFound(f"no model matches {ref!r} (by id, path, name or hash prefix)", ref=ref)

    def search(
        self,
        *,
        type: str | None = None,
        base: str | None = None,
        format: str | None = None,
        tag: str | None = None,
        query: str | None = None,
        status: str | None = "ok",
        sort: str = "name",
        descending: bool = False,
        limit: int = 50,
        offset: int = 0,
    ) -> SearchPage:
        """Filter (type, base, format, tag, status), text query over name, description and tags, sort, paginate."""
        with self._lock:
            return search.search(
                self._conn,
                type=type,
                base=base,
                format=format,
                tag=tag,
                query=query,
                status=status,
                sort=sort,
                descending=descending,
                limit=limit,
                offset=offset,
            )

    def models_with_component(self, content_id: str) -> list[tuple[str, str]]:
        """(model id, component name) of every component with this content id: one VAE in many files."""
        rows = self._rows(
            "SELECT model_id, name FROM components WHERE content_id=? ORDER BY model_id", (content_id,)
        )
        return [(r[0], r[1]) for r in rows]

    def rejected(self, roots: Sequence[str] = ()) -> list[FileRecord]:
        sql = "SELECT * FROM files WHERE status='rejected'"
        if roots:
            sql += f" AND root IN ({','.join('?' * len(roots))})"
        return [_file_record(r) for r in self._rows(sql + " ORDER BY path", list(roots))]

    # ------------------------------------------------------------------ user metadata and history

    def set_meta(self, model_id: str, values: Mapping[str, Any]) -> ModelRecord:
        """Set user metadata (``META_KEYS``); list values may be given as comma-separated text and
        ``default_settings`` as JSON text. Raises InvalidMetadata."""
        clean = {k: _coerce_meta(k, v) for k, v in values.items()}
        now = time.time()
        with self.transaction() as c:
            if c.execute("SELECT 1 FROM models WHERE id=?", (model_id,)).fetchone() is None:
                raise ModelNotFound(f"no model with id {model_id!r}", model_id=model_id)
            for key, value in clean.items():
                if key == "name":
                    c.execute(
                        "UPDATE models SET name=?, name_source='user', updated_at=? WHERE id=?",
                        (value, now, model_id),
                    )
                elif key == "tags":
                    c.execute("DELETE FROM model_tags WHERE model_id=?", (model_id,))
                    c.executemany(
                        "INSERT OR IGNORE INTO model_tags VALUES (?, ?)", [(model_id, t) for t in value]
                    )
                else:
                    stored = json.dumps(value) if META_KEYS[key] != "text" else value
                    c.execute(
                        f"UPDATE model_meta SET {key}=?, updated_at=? WHERE model_id=?",
                        (stored, now, model_id),
                    )
            self._log(model_id, None, "meta.set", {"keys": sorted(clean)}, now)
        return self.get(model_id)

    def add_history(
        self, model_id: str | None, op: str, data: Mapping[str, Any] | None = None, path: str | None = None
    ) -> None:
        """Record an operation (a load, a validation, a benchmark result...)."""
        with self.transaction():
            self._log(model_id, path, op, dict(data or {}), time.time())

    def history(self, model_id: str, limit: int = 100) -> list[HistoryEntry]:
        rows = self._rows(
            "SELECT * FROM history WHERE model_id=? ORDER BY at DESC, id DESC LIMIT ?", (model_id, limit)
        )
        return [
            HistoryEntry(
                id=r["id"],
                model_id=r["model_id"],
                path=r["path"],
                at=r["at"],
                op=r["op"],
                data=json.loads(r["data"]),
            )
            for r in rows
        ]

    # ------------------------------------------------------------------ model-ID mapping

    def worker_spec(self, model_id: str, component: str | None = None) -> dict[str, Any]:
        """What a worker needs for ``model_id`` (or one of its components); see ``mapping.worker_spec``."""
        return mapping.worker_spec(self.get(model_id), component)


def _file_record(r: sqlite3.Row) -> FileRecord:
    return FileRecord(
        id=r["id"],
        path=r["path"],
        root=r["root"],
        rel=r["rel"],
        kind=r["kind"],
        format=r["format"],
        status=FileStatus(r["status"]),
        error_code=r["error_code"],
        error=r["error"],
        size=r["size"],
        mtime_ns=r["mtime_ns"],
        model_id=r["model_id"],
        hashes=Hashes(blake3=r["blake3"], sha256=r["sha256"], autov2=r["autov2"]),
        first_seen=r["first_seen"],
        last_seen=r["last_seen"],
    )


def _user_meta(r: sqlite3.Row | None, tags: list[str]) -> UserMeta:
    if r is None:
        return UserMeta(tags=tags)
    return UserMeta(
        description=r["description"],
        tags=tags,
        trigger_words=json.loads(r["trigger_words"]),
        source_url=r["source_url"],
        license=r["license"],
        default_settings=json.loads(r["default_settings"]),
        found=json.loads(r["found"]),
    )


def _coerce_meta(key: str, value: Any) -> Any:
    shape = META_KEYS.get(key)
    if shape is None:
        raise InvalidMetadata(f"unknown metadata key {key!r}; known: {', '.join(sorted(META_KEYS))}", key=key)
    if shape == "text":
        if value is None:
            return None
        if not isinstance(value, str):
            raise InvalidMetadata(f"{key}: expected text", key=key)
        if key == "name" and not value.strip():
            raise InvalidMetadata("name: must not be empty", key=key)
        return value.strip() if key == "name" else value
    if shape == "list":
        items = value.split(",") if isinstance(value, str) else value
        if not isinstance(items, list | tuple) or not all(isinstance(i, str) for i in items):
            raise InvalidMetadata(f"{key}: expected a list of text or comma-separated text", key=key)
        return (
            sorted({i.strip() for i in items if i.strip()})
            if key == "tags"
            else [i.strip() for i in items if i.strip()]
        )
    if isinstance(value, str):
        try:
            value = json.loads(value)
        except json.JSONDecodeError as exc:
            raise InvalidMetadata(f"{key}: not valid JSON: {exc}", key=key) from exc
    if not isinstance(value, dict):
        raise InvalidMetadata(f"{key}: expected a JSON object", key=key)
    return value
