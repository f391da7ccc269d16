"""What the scanner and the hasher write: files, models, components, moves, hashes.

This implements discovery's port, :class:`modelkeeper.discovery.ports.CatalogWriter`."""

from __future__ import annotations

import json
import sqlite3
import time
from collections.abc import Mapping, Sequence
from typing import Any

from modelkeeper.discovery.ports import CatalogWriter, FileRow, HashTask
from modelkeeper.discovery.records import ComponentInfo, Identification
from modelkeeper.registry.base import Store, new_model_id


class ScanWrites(Store, CatalogWriter):
    """The registry's side of discovery's port (``modelkeeper.discovery.ports.CatalogWriter``)."""

    def file_rows(self, roots: Sequence[str]) -> dict[str, FileRow]:
        """Known paths under ``roots`` (all when empty) with what a rescan compares."""
        sql = (
            "SELECT id, path, root, kind, status, size, mtime_ns, inode, device, rules_version, model_id, error_code, error"
            " FROM files"
        )
        params: list[str] = []
        if roots:
            # By path, not by recorded root: a root may lie inside another one scanned before.
            sql += " WHERE " + " OR ".join(["(path = ? OR (path > ? AND path < ?))"] * len(roots))
            for root in roots:
                base = root.rstrip("/")
                params += [base, base + "/", base + "0"]  # "0" follows "/": everything under base/
        with self._lock:
            return {r[1]: FileRow(*r) for r in self._conn.execute(sql, params)}

    def record_model(
        self,
        *,
        path: str,
        root: str,
        rel: str,
        kind: str,
        fingerprint: tuple[int, int, int, int],
        identification: Identification,
        rules_version: int,
        existing: FileRow | None,
        default_name: str,
        user_defaults: Mapping[str, Any] | None = None,
        found: Mapping[str, Any] | None = None,
        now: float | None = None,
    ) -> tuple[str, bool]:
        """Insert or update the file at ``path`` and its model; returns (model id, created)."""
        now = time.time() if now is None else now
        size, mtime_ns, inode, device = fingerprint
        ident = identification
        model_id = existing.model_id if existing is not None else None
        created = model_id is None
        with self.transaction() as c:
            columns = {
                "type": ident.type.value,
                "base": ident.base.value,
                "variant": ident.variant,
                "format": ident.format.value,
                "layout": ident.layout.value,
                "encoder": ident.encoder.value if ident.encoder else None,
                "lora_format": ident.lora.format.value if ident.lora else None,
                "lora_rank": ident.lora.rank if ident.lora else None,
                "rule": ident.rule,
                "confidence": ident.confidence,
                "identification": ident.model_dump_json(),
                "status": "ok",
                "size": size,
                "updated_at": now,
            }
            if model_id is None:
                defaults = dict(user_defaults or {})
                name, source = (
                    (str(defaults["name"]), "sidecar") if defaults.get("name") else (default_name, "file")
                )
                model_id = self._insert_model(name, source, now, columns)
                self._insert_meta(model_id, defaults, found or {}, now)
                self._log(
                    model_id, path, "scan.added", {"type": ident.type.value, "base": ident.base.value}, now
                )
            else:
                c.execute(
                    f"UPDATE models SET {', '.join(f'{k} = ?' for k in columns)} WHERE id = ?",
                    (*columns.values(), model_id),
                )
                c.execute(
                    "UPDATE model_meta SET found = ? WHERE model_id = ?", (json.dumps(found or {}), model_id)
                )
                c.execute("DELETE FROM components WHERE model_id = ?", (model_id,))
                self._log(
                    model_id, path, "scan.updated", {"type": ident.type.value, "base": ident.base.value}, now
                )
            self._insert_components(model_id, ident.components)
            values = (
                "ok",
                None,
                None,
                size,
                mtime_ns,
                inode,
                device,
                rules_version,
                model_id,
                ident.format.value,
            )
            if existing is None:
                c.execute(
                    "INSERT INTO files (path, root, rel, kind, status, error_code, error, size, mtime_ns, inode, device,"
                    " rules_version, model_id, format, first_seen, last_seen) VALUES (?,?,?,?,?,?,?,?,?,?,?,?,?,?,?,?)",
                    (path, root, rel, kind, *values, now, now),
                )
            else:
                c.execute(
                    "UPDATE files SET status=?, error_code=?, error=?, size=?, mtime_ns=?, inode=?, device=?,"
                    " rules_version=?, model_id=?, format=?, root=?, rel=?, kind=?, last_seen=? WHERE id=?",
                    (*values, root, rel, kind, now, existing.id),
                )
        return model_id, created

    def _insert_model(self, name: str, source: str, now: float, columns: Mapping[str, Any]) -> str:
        sql = (
            f"INSERT INTO models (id, name, name_source, created_at, {', '.join(columns)}) "
            f"VALUES (?, ?, ?, ?, {', '.join('?' * len(columns))})"
        )
        while True:
            model_id = new_model_id()
            try:
                self._conn.execute(sql, (model_id, name, source, now, *columns.values()))
            except sqlite3.IntegrityError:
                if self._conn.execute("SELECT 1 FROM models WHERE id=?", (model_id,)).fetchone() is None:
                    raise
                continue  # drawn twice: draw again
            return model_id

    def _insert_meta(
        self, model_id: str, defaults: Mapping[str, Any], found: Mapping[str, Any], now: float
    ) -> None:
        self._conn.execute(
            "INSERT INTO model_meta (model_id, description, trigger_words, source_url, license, default_settings,"
            " found, updated_at) VALUES (?,?,?,?,?,?,?,?)",
            (
                model_id,
                defaults.get("description"),
                json.dumps(list(defaults.get("trigger_words") or [])),
                defaults.get("source_url"),
                defaults.get("license"),
                json.dumps(dict(defaults.get("default_settings") or {})),
                json.dumps(dict(found)),
                now,
            ),
        )
        tags = {str(t).strip() for t in defaults.get("tags") or [] if str(t).strip()}
        self._conn.executemany(
            "INSERT OR IGNORE INTO model_tags VALUES (?, ?)", [(model_id, t) for t in sorted(tags)]
        )

    def _insert_components(self, model_id: str, components: Sequence[ComponentInfo]) -> None:
        self._conn.executemany(
            "INSERT INTO components (model_id, name, kind, layout, prefix, subfolder, base, encoder, rule,"
            " tensor_count, parameters, bytes, dtypes) VALUES (?,?,?,?,?,?,?,?,?,?,?,?,?)",
            [
                (
                    model_id,
                    c.name,
                    c.kind.value,
                    c.layout.value,
                    c.prefix,
                    c.subfolder,
                    c.base.value,
                    c.encoder.value if c.encoder else None,
                    c.rule,
                    c.tensor_count,
                    c.parameters,
                    c.bytes,
                    json.dumps(c.dtypes),
                )
                for c in components
            ],
        )

    def record_rejected(
        self,
        *,
        path: str,
        root: str,
        rel: str,
        kind: str,
        fmt: str,
        fingerprint: tuple[int, int, int, int] | None,
        error_code: str,
        error: str,
        existing: FileRow | None,
        rules_version: int,
        now: float | None = None,
    ) -> None:
        now = time.time() if now is None else now
        size, mtime_ns, inode, device = fingerprint or (None, None, None, None)
        with self.transaction() as c:
            if existing is None:
                c.execute(
                    "INSERT INTO files (path, root, rel, kind, format, status, error_code, error, size, mtime_ns, inode,"
                    " device, rules_version, first_seen, last_seen) VALUES (?,?,?,?,?,'rejected',?,?,?,?,?,?,?,?,?)",
                    (
                        path,
                        root,
                        rel,
                        kind,
                        fmt,
                        error_code,
                        error,
                        size,
                        mtime_ns,
                        inode,
                        device,
                        rules_version,
                        now,
                        now,
                    ),
                )
            else:
                c.execute(
                    "UPDATE files SET status='rejected', error_code=?, error=?, size=?, mtime_ns=?, inode=?, device=?,"
                    " rules_version=?, format=?, last_seen=? WHERE id=?",
                    (error_code, error, size, mtime_ns, inode, device, rules_version, fmt, now, existing.id),
                )
                if existing.model_id:
                    c.execute(
                        "UPDATE models SET status='missing', updated_at=? WHERE id=?",
                        (now, existing.model_id),
                    )
                    self._log(existing.model_id, path, "scan.rejected", {"error_code": error_code}, now)

    def move_file(
        self,
        row: FileRow,
        *,
        path: str,
        root: str,
        rel: str,
        fingerprint: tuple[int, int, int, int],
        now: float,
    ) -> None:
        """A known file seen under a new path (same device and inode): keep its id, model and hashes."""
        size, mtime_ns, inode, device = fingerprint
        with self.transaction() as c:
            c.execute(
                "UPDATE files SET path=?, root=?, rel=?, status='ok', size=?, mtime_ns=?, inode=?, device=?, last_seen=?"
                " WHERE id=?",
                (path, root, rel, size, mtime_ns, inode, device, now, row.id),
            )
            if row.model_id:
                c.execute("UPDATE models SET status='ok', updated_at=? WHERE id=?", (now, row.model_id))
                self._log(row.model_id, path, "scan.moved", {"from": row.path}, now)

    def mark_missing(self, rows: Sequence[FileRow], now: float | None = None) -> None:
        now = time.time() if now is None else now
        with self.transaction() as c:
            c.executemany("UPDATE files SET status='missing' WHERE id=?", [(r.id,) for r in rows])
            for r in rows:
                if r.model_id:
                    c.execute(
                        "UPDATE models SET status='missing', updated_at=? WHERE id=?", (now, r.model_id)
                    )
                    self._log(r.model_id, r.path, "scan.missing", {}, now)

    def scan_summaries(self, file_ids: Sequence[int]) -> dict[int, dict[str, Any]]:
        """What a scan reports for files it did not reopen: file id -> stored answer."""
        if not file_ids:
            return {}
        with self._lock:
            rows = self._conn.execute(
                "SELECT f.id, f.status, f.format AS file_format, f.error_code, f.error, m.id AS model_id, m.type,"
                " m.base, m.variant, m.format, m.encoder, m.rule, m.confidence, c.kinds,"
                " json_extract(m.identification, '$.quant') AS quant"
                " FROM files AS f LEFT JOIN models AS m ON m.id = f.model_id"
                " LEFT JOIN (SELECT model_id, group_concat(kind, ',') AS kinds FROM components GROUP BY model_id)"
                " AS c ON c.model_id = m.id"
                " WHERE f.id IN (SELECT value FROM json_each(?))",
                (json.dumps(list(file_ids)),),
            ).fetchall()
        return {r["id"]: dict(r) for r in rows}

    def set_roots(self, changes: Sequence[tuple[int, str, str]]) -> None:
        """Record (file id, root, path relative to it) for files now seen under another root."""
        with self.transaction() as c:
            c.executemany(
                "UPDATE files SET root=?, rel=? WHERE id=?", [(root, rel, i) for i, root, rel in changes]
            )

    def touch(self, file_ids: Sequence[int], now: float) -> None:
        with self.transaction() as c:
            c.executemany("UPDATE files SET last_seen=? WHERE id=?", [(now, i) for i in file_ids])

    # ------------------------------------------------------------------ hashing side

    def pending_hashes(self) -> list[HashTask]:
        """Files present and identified whose hashes are missing or stale (size or mtime changed)."""
        rows = self._rows(
            "SELECT id, path, kind, size, mtime_ns, model_id FROM files WHERE status='ok' AND model_id IS NOT NULL"
            " AND (blake3 IS NULL OR hashed_size IS NOT size OR hashed_mtime_ns IS NOT mtime_ns) ORDER BY size"
        )
        tasks = []
        for r in rows:
            comps = self._rows(
                "SELECT id, name, prefix, subfolder FROM components WHERE model_id=?", (r["model_id"],)
            )
            tasks.append(
                HashTask(
                    r["id"],
                    r["path"],
                    r["kind"],
                    r["size"] or 0,
                    r["mtime_ns"] or 0,
                    [(c[0], c[1], c[2], c[3]) for c in comps],
                )
            )
        return tasks

    def record_hashes(
        self,
        task: HashTask,
        *,
        blake3: str,
        sha256: str | None,
        component_ids: Mapping[int, str],
        now: float | None = None,
    ) -> None:
        """Store the hashes of ``task`` (the cache key is its size and mtime at hashing time)."""
        now = time.time() if now is None else now
        with self.transaction() as c:
            c.execute(
                "UPDATE files SET blake3=?, sha256=?, autov2=?, hashed_size=?, hashed_mtime_ns=?, hashed_at=? WHERE id=?",
                (
                    blake3,
                    sha256,
                    sha256[:10] if sha256 else None,
                    task.size,
                    task.mtime_ns,
                    now,
                    task.file_id,
                ),
            )
            c.executemany(
                "UPDATE components SET content_id=? WHERE id=?",
                [(cid, rid) for rid, cid in component_ids.items()],
            )

    def reconcile_moves(self, now: float | None = None) -> list[tuple[str, str]]:
        """Give a new file the id and metadata of a missing file with the same BLAKE3.

        Returns (kept model id, new path) for each move found. The new file's provisional model
        (created by the scan that found it) is dropped."""
        now = time.time() if now is None else now
        pairs = self._rows(
            "SELECT old.id AS old_file, old.model_id AS old_model, old.path AS old_path, new.id AS new_file,"
            " new.model_id AS new_model, new.path AS new_path FROM files AS old JOIN files AS new"
            " ON old.blake3 = new.blake3 AND old.id != new.id"
            " WHERE old.status='missing' AND new.status='ok' AND old.model_id IS NOT NULL AND new.model_id IS NOT NULL"
            " AND old.model_id != new.model_id AND new.first_seen >= old.last_seen"
        )
        moved: list[tuple[str, str]] = []
        done: set[int] = set()
        with self.transaction() as c:
            for p in pairs:
                if p["old_file"] in done or p["new_file"] in done:
                    continue
                done.update((p["old_file"], p["new_file"]))
                ident = c.execute(
                    "SELECT identification, type, base, variant, format, layout, encoder, lora_format,"
                    " lora_rank, rule, confidence, size FROM models WHERE id=?",
                    (p["new_model"],),
                ).fetchone()
                c.execute(
                    "UPDATE models SET identification=?, type=?, base=?, variant=?, format=?, layout=?, encoder=?,"
                    " lora_format=?, lora_rank=?, rule=?, confidence=?, size=?, status='ok', updated_at=? WHERE id=?",
                    (*tuple(ident), now, p["old_model"]),
                )
                c.execute("DELETE FROM components WHERE model_id=?", (p["old_model"],))
                c.execute(
                    "UPDATE components SET model_id=? WHERE model_id=?", (p["old_model"], p["new_model"])
                )
                c.execute("UPDATE files SET model_id=? WHERE id=?", (p["old_model"], p["new_file"]))
                c.execute("DELETE FROM files WHERE id=?", (p["old_file"],))
                c.execute("DELETE FROM models WHERE id=?", (p["new_model"],))
                c.execute("UPDATE history SET model_id=? WHERE model_id=?", (p["old_model"], p["new_model"]))
                self._log(
                    p["old_model"], p["new_path"], "scan.moved", {"from": p["old_path"], "by": "blake3"}, now
                )
                moved.append((p["old_model"], p["new_path"]))
        return moved
