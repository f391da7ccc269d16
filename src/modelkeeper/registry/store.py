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
from modelkeeper.registry import handles, mapping, search
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
from modelkeeper.registry.writes import ScanWrites, under

__all__ = ["DEFAULT_DB_ENV", "Registry", "default_db_path", "new_model_id"]


class Registry(ScanWrites):
    """The model registry; see the module docstring."""

    _handles: tuple[int, dict[str, str]] | None = None

    # ------------------------------------------------------------------ reading

    def handles(self) -> dict[str, str]:
        """Model id -> handle, for every model (``handles.py`` says how they are made)."""
        with self._lock:
            if self._handles is None or self._handles[0] != self.generation:
                self._handles = (self.generation, handles.assign(handles.read_named(self._conn)))
            return self._handles[1]

    def get(self, model_id: str, roots: Sequence[str] = ()) -> ModelRecord:
        """A model by id; its ``file`` is its first present location, under ``roots`` if it has one there."""
        with self._lock:
            row = self._conn.execute("SELECT * FROM models WHERE id=?", (model_id,)).fetchone()
            if row is None:
                raise ModelNotFound(f"no model with id {model_id!r}", model_id=model_id)
            where, params = under(roots)
            file_rows = self._conn.execute(
                f"SELECT *, {where or '0'} AS inside FROM files WHERE model_id=?"
                " ORDER BY status='ok' DESC, inside DESC, id",
                (*params, model_id),
            ).fetchall()
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
        locations = [_file_record(r) for r in file_rows]
        return ModelRecord(
            id=row["id"],
            handle=self.handles().get(row["id"], row["name"]),
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
            file=locations[0] if locations else None,
            locations=locations,
            components=components,
            meta=_user_meta(meta, tags),
            identification=ident,
        )

    def resolve(self, ref: str, roots: Sequence[str] = ()) -> ModelRecord:
        """A model by id, path, handle, name (case-insensitive) or hash prefix (BLAKE3, SHA-256,
        AutoV2; 6+ hex digits), tried in this order. With ``roots``, only models with a location
        under them answer. Raises ModelNotFound, or AmbiguousReference listing each candidate's
        handle, type, format and path (``details["candidates"]``; ``details["matches"]``: their ids)."""
        ref = ref.strip()
        if not ref:
            raise ModelNotFound("empty model reference")
        ids_of_handles = {h.lower(): i for i, h in self.handles().items()}

        def by_handle(_conn: sqlite3.Connection, text: str) -> list[str]:
            found = ids_of_handles.get(text.lower())
            return [found] if found else []

        inside = self._inside(roots) if roots else None
        for finder in (search.by_id, search.by_path, by_handle, search.by_name, search.by_hash):
            with self._lock:
                ids = finder(self._conn, ref)
            if inside is not None:
                ids = [i for i in ids if i in inside]
            if len(ids) == 1:
                return self.get(ids[0], roots)
            if len(ids) > 1:
                raise self._ambiguous(ref, ids, roots)
        where = " under the model roots" if roots else ""
        raise ModelNotFound(
            f"no model matches {ref!r}{where} (by id, path, handle, name or hash prefix)", ref=ref
        )

    def _inside(self, roots: Sequence[str]) -> set[str]:
        where, params = under(roots)
        rows = self._rows(
            f"SELECT DISTINCT model_id FROM files WHERE model_id IS NOT NULL AND ({where})", params
        )
        return {r[0] for r in rows}

    def _ambiguous(self, ref: str, ids: list[str], roots: Sequence[str]) -> AmbiguousReference:
        records = [self.get(i, roots) for i in ids[:20]]
        candidates = [
            {"id": r.id, "handle": r.handle, "type": r.type, "format": r.format, "path": r.path}
            for r in records
        ]
        lines = "; ".join(f"{c['handle']} ({c['type']}, {c['format']}, {c['path']})" for c in candidates)
        return AmbiguousReference(
            f"{ref!r} matches {len(ids)} models, name one by its handle: {lines}",
            matches=ids[:20],
            candidates=candidates,
        )

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
        roots: Sequence[str] = (),
    ) -> SearchPage:
        """Filter (type, base, format, tag, status; the words users type are accepted, see
        ``vocabulary.py``; a base matches the models stored under it and those that fit it), text query over names, file paths, descriptions and tags, sort, paginate.
        With ``roots``, only models with a location under them. Raises InvalidFilter, InvalidMetadata."""
        handles_now = self.handles()
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
                roots=roots,
                handles=handles_now,
            )

    def recorded_roots(self) -> list[str]:
        """The roots that files not missing were found under."""
        return [
            r[0]
            for r in self._rows("SELECT DISTINCT root FROM files WHERE status != 'missing' ORDER BY root")
        ]

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
