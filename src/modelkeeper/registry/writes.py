"""What the scanner and the hasher write: files, models, components, moves, hashes.

This implements discovery's port, :class:`modelkeeper.discovery.ports.CatalogWriter`."""

from __future__ import annotations

import json
import os
import sqlite3
import time
from collections.abc import Mapping, Sequence
from typing import Any

from modelkeeper.discovery.ports import CatalogWriter, FileRow, HashTask
from modelkeeper.discovery.records import ComponentInfo, Identification
from modelkeeper.discovery.rules.known_files import apply_known, known_file
from modelkeeper.registry import locations
from modelkeeper.registry.base import Store, new_model_id


class ScanWrites(Store, CatalogWriter):
    """The registry's side of discovery's port (``modelkeeper.discovery.ports.CatalogWriter``)."""

    def file_rows(self, roots: Sequence[str]) -> dict[str, FileRow]:
        """Known paths under ``roots`` (all when empty) with what a rescan compares."""
        sql = (
            "SELECT id, path, root, kind, status, size, mtime_ns, inode, device, rules_version, model_id, error_code, error"
            " FROM files"
        )
        where, params = under(roots)
        if where:
            sql += " WHERE " + where
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
        content_key: str | None = None,
    ) -> tuple[str, bool]:
        """Insert or update the file at ``path`` and its model; returns (model id, created).

        A new file with the content of a known one (same device and inode, or same size and
        ``content_key``; a present file first, else a missing one) becomes a location of its model.
        A known file that changed keeps its model, unless its content changed while another
        location of the model is present: then it leaves for a new model (the id stays with the
        content). The id never goes to a missing location while a live file had it."""
        now = time.time() if now is None else now
        size, mtime_ns, inode, _device = fingerprint
        ident = identification
        model_id = existing.model_id if existing is not None else None
        left: str | None = None  # the model a changed copy leaves
        with self.transaction() as c:
            if existing is None:
                twin = locations.twin_of(c, path, fingerprint, content_key)
                if twin is not None:
                    self._add_location(
                        twin, path, root, rel, kind, fingerprint, rules_version, ident, content_key, now
                    )
                    return twin, False
            elif (
                model_id is not None
                and (existing.size, existing.mtime_ns, existing.inode) != (size, mtime_ns, inode)
                and not self._same_content(existing.id, size, content_key)
                and locations.present_elsewhere(c, model_id, existing.id)
            ):
                left, model_id = model_id, None  # this copy changed: it is another model now
            created = model_id is None
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
            values = _ok_file_values(fingerprint, rules_version, model_id, ident)
            if existing is None:
                self._insert_file(path, root, rel, kind, values, content_key, now)
            else:
                c.execute(
                    "UPDATE files SET status=?, error_code=?, error=?, size=?, mtime_ns=?, inode=?, device=?,"
                    " rules_version=?, model_id=?, format=?, root=?, rel=?, kind=?, last_seen=?, content_key=?"
                    " WHERE id=?",
                    (*values, root, rel, kind, now, content_key, existing.id),
                )
            if left is not None:
                locations.refresh_status(c, left, now)
            self._drop_missing(model_id, now)
            if existing is not None:
                self._apply_known(existing.id, now)  # still hashed: the table still applies
        return model_id, created

    def _insert_file(
        self,
        path: str,
        root: str,
        rel: str,
        kind: str,
        values: tuple[Any, ...],
        content_key: str | None,
        now: float,
    ) -> None:
        self._conn.execute(
            "INSERT INTO files (path, root, rel, kind, status, error_code, error, size, mtime_ns, inode, device,"
            " rules_version, model_id, format, content_key, first_seen, last_seen)"
            " VALUES (?,?,?,?,?,?,?,?,?,?,?,?,?,?,?,?,?)",
            (path, root, rel, kind, *values, content_key, now, now),
        )

    def _same_content(self, file_id: int, size: int, content_key: str | None) -> bool:
        """Whether the file ``file_id`` still holds what it held (same size and content key): a file
        rewritten with the same bytes, touched, or copied back over itself."""
        row = self._conn.execute("SELECT size, content_key FROM files WHERE id=?", (file_id,)).fetchone()
        return content_key is not None and row is not None and tuple(row) == (size, content_key)

    def _drop_missing(self, model_id: str, now: float) -> None:
        """Forget the missing locations of a model that has a present one (``locations.drop_missing``)."""
        for gone in locations.drop_missing(self._conn, model_id):
            self._log(model_id, gone, "scan.location_removed", {}, now)

    def _add_location(
        self,
        model_id: str,
        path: str,
        root: str,
        rel: str,
        kind: str,
        fingerprint: tuple[int, int, int, int],
        rules_version: int,
        ident: Identification,
        content_key: str | None,
        now: float,
    ) -> None:
        values = _ok_file_values(fingerprint, rules_version, model_id, ident)
        self._insert_file(path, root, rel, kind, values, content_key, now)
        locations.refresh_status(self._conn, model_id, now)
        self._log(model_id, path, "scan.location", {}, now)
        self._drop_missing(model_id, now)

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
                    locations.refresh_status(c, existing.model_id, now)
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
        """Files gone from the disk. A model with a location still present keeps its id and simply
        loses the gone paths; a model none of whose locations is left is ``missing`` (its paths kept,
        for a move or a restored file to find it again)."""
        now = time.time() if now is None else now
        with self.transaction() as c:
            c.executemany("UPDATE files SET status='missing' WHERE id=?", [(r.id,) for r in rows])
            for model_id in sorted({r.model_id for r in rows if r.model_id}):
                locations.refresh_status(c, model_id, now)
                self._drop_missing(model_id, now)
            for r in rows:
                if r.model_id and c.execute("SELECT 1 FROM files WHERE id=?", (r.id,)).fetchone():
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

    def pending_hashes(self, roots: Sequence[str] = ()) -> list[HashTask]:
        """Files present and identified, under ``roots`` (all when empty), whose hashes are missing
        or stale (size or mtime changed). A file that shares its device and inode with a hashed one
        (a symlink, a hard link) is listed once: its hashes are recorded for every path of it."""
        sql = (
            "SELECT id, path, kind, size, mtime_ns, model_id, device, inode FROM files"
            " WHERE status='ok' AND model_id IS NOT NULL"
            " AND (blake3 IS NULL OR hashed_size IS NOT size OR hashed_mtime_ns IS NOT mtime_ns)"
        )
        where, params = under(roots)
        rows = self._rows(sql + (f" AND ({where})" if where else "") + " ORDER BY size", params)
        tasks = []
        listed: set[tuple[int, int, int, int]] = set()
        for r in rows:
            if r["kind"] == "file" and r["inode"] is not None:
                same = (r["device"], r["inode"], r["size"], r["mtime_ns"])
                if same in listed:
                    continue
                listed.add(same)
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
        """Store the hashes of ``task`` (the cache key is its size and mtime at hashing time), and
        of the files that are the same file (a symlink or a hard link: same device and inode)."""
        now = time.time() if now is None else now
        with self.transaction() as c:
            c.execute(
                "UPDATE files SET blake3=?, sha256=?, autov2=?, hashed_size=?, hashed_mtime_ns=?, hashed_at=?"
                " WHERE id=? OR (kind='file' AND size=? AND mtime_ns=? AND (device, inode) ="
                " (SELECT device, inode FROM files WHERE id=? AND kind='file' AND inode IS NOT NULL))",
                (
                    blake3,
                    sha256,
                    sha256[:10] if sha256 else None,
                    task.size,
                    task.mtime_ns,
                    now,
                    task.file_id,
                    task.size,
                    task.mtime_ns,
                    task.file_id,
                ),
            )
            c.executemany(
                "UPDATE components SET content_id=? WHERE id=?",
                [(cid, rid) for rid, cid in component_ids.items()],
            )
            self._apply_known(task.file_id, now)

    def _apply_known(self, file_id: int, now: float) -> None:
        """Settle the identification of a hashed file's model by the known-file table
        (``discovery/rules/known_files.py``): an SDXL VAE is filed sdxl, which shapes cannot tell."""
        row = self._conn.execute(
            "SELECT f.sha256, f.model_id, f.path, m.identification FROM files AS f JOIN models AS m"
            " ON m.id = f.model_id WHERE f.id=? AND f.hashed_size IS f.size AND f.hashed_mtime_ns IS f.mtime_ns",
            (file_id,),
        ).fetchone()
        known = known_file(row["sha256"]) if row is not None else None
        if row is None or known is None:
            return
        before = Identification.model_validate_json(row["identification"])
        ident = apply_known(before, known)
        if ident == before:
            return
        self._conn.execute(
            "UPDATE models SET identification=?, base=?, encoder=?, rule=?, confidence=?, updated_at=? WHERE id=?",
            (
                ident.model_dump_json(),
                ident.base.value,
                ident.encoder.value if ident.encoder else None,
                ident.rule,
                ident.confidence,
                now,
                row["model_id"],
            ),
        )
        self._conn.execute(
            "UPDATE components SET base=?, encoder=COALESCE(?, encoder) WHERE model_id=? AND kind=?",
            (
                known.base.value,
                known.encoder.value if known.encoder else None,
                row["model_id"],
                known.type.value,
            ),
        )
        self._log(row["model_id"], row["path"], "identify.known_file", {"file": known.name}, now)

    def reconcile_moves(self, now: float | None = None) -> list[tuple[str, str]]:
        """Settle identities by content hash, after hashing:

        - a moved file: a new file with the BLAKE3 of a missing one takes its model (id and
          metadata); the new file's provisional model is dropped;
        - copies: present files with one BLAKE3 under several models become one model, the oldest;
        - a provisional copy that was not one (same content key, another BLAKE3) gets a model of its own.

        Returns (kept model id, new path) for each move found."""
        now = time.time() if now is None else now
        with self.transaction() as c:
            moved = self._moves(c, now)
            self._merge_copies(c)
            self._split_differing(c)
        return moved

    def _moves(self, c: sqlite3.Connection, now: float) -> list[tuple[str, str]]:
        pairs = c.execute(
            "SELECT old.id AS old_file, old.model_id AS old_model, old.path AS old_path, new.id AS new_file,"
            " new.model_id AS new_model, new.path AS new_path FROM files AS old JOIN files AS new"
            " ON old.blake3 = new.blake3 AND old.id != new.id"
            " WHERE old.status='missing' AND new.status='ok' AND old.model_id IS NOT NULL AND new.model_id IS NOT NULL"
            " AND old.model_id != new.model_id AND new.first_seen >= old.last_seen"
            " AND NOT EXISTS (SELECT 1 FROM files AS o WHERE o.model_id = new.model_id AND o.id != new.id)"
            " AND NOT EXISTS (SELECT 1 FROM files AS o WHERE o.model_id = old.model_id AND o.id != old.id)"
        ).fetchall()
        moved: list[tuple[str, str]] = []
        done: set[int] = set()
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
            c.execute("UPDATE components SET model_id=? WHERE model_id=?", (p["old_model"], p["new_model"]))
            c.execute("UPDATE files SET model_id=? WHERE id=?", (p["old_model"], p["new_file"]))
            c.execute("DELETE FROM files WHERE id=?", (p["old_file"],))
            c.execute("DELETE FROM models WHERE id=?", (p["new_model"],))
            c.execute("UPDATE history SET model_id=? WHERE model_id=?", (p["old_model"], p["new_model"]))
            self._log(
                p["old_model"], p["new_path"], "scan.moved", {"from": p["old_path"], "by": "blake3"}, now
            )
            moved.append((p["old_model"], p["new_path"]))
        return moved

    @staticmethod
    def _merge_copies(c: sqlite3.Connection) -> None:
        groups = c.execute(
            "SELECT f.blake3, group_concat(DISTINCT f.model_id) FROM files AS f"
            " WHERE f.status='ok' AND f.blake3 IS NOT NULL AND f.model_id IS NOT NULL"
            " GROUP BY f.blake3 HAVING COUNT(DISTINCT f.model_id) > 1"
        ).fetchall()
        for _, ids in groups:
            alive = [
                r[0]
                for r in c.execute(
                    f"SELECT id FROM models WHERE id IN ({','.join('?' * len(ids.split(',')))})"
                    " ORDER BY created_at, id",
                    ids.split(","),
                )
            ]
            if len(alive) > 1:
                locations.merge_models(c, alive[0], alive[1:])

    def _split_differing(self, c: sqlite3.Connection) -> None:
        models = c.execute(
            "SELECT model_id FROM files WHERE status='ok' AND blake3 IS NOT NULL AND model_id IS NOT NULL"
            " GROUP BY model_id HAVING COUNT(DISTINCT blake3) > 1"
        ).fetchall()
        for (model_id,) in models:
            rows = c.execute(
                "SELECT id, path, blake3 FROM files WHERE model_id=? AND status='ok' AND blake3 IS NOT NULL"
                " ORDER BY id",
                (model_id,),
            ).fetchall()
            keep = rows[0]["blake3"]  # the first location found keeps the model
            others: dict[str, list[sqlite3.Row]] = {}
            for r in rows:
                if r["blake3"] != keep:
                    others.setdefault(r["blake3"], []).append(r)
            for group in others.values():
                name = os.path.splitext(os.path.basename(group[0]["path"]))[0]
                new_id = self._free_model_id(c)
                locations.split_model(c, model_id, [r["id"] for r in group], name, new_id)

    @staticmethod
    def _free_model_id(c: sqlite3.Connection) -> str:
        while True:
            model_id = new_model_id()
            if c.execute("SELECT 1 FROM models WHERE id=?", (model_id,)).fetchone() is None:
                return model_id


def _ok_file_values(
    fingerprint: tuple[int, int, int, int], rules_version: int, model_id: str, ident: Identification
) -> tuple[Any, ...]:
    """The columns of a file row that identified fine (status .. format, in ``_insert_file``'s order)."""
    size, mtime_ns, inode, device = fingerprint
    return ("ok", None, None, size, mtime_ns, inode, device, rules_version, model_id, ident.format.value)


def under(roots: Sequence[str], column: str = "path") -> tuple[str, list[str]]:
    """SQL that holds for a path under one of ``roots`` (none: empty SQL), and its parameters.
    By path, not by recorded root: a root may lie inside another one scanned before."""
    params: list[str] = []
    for root in roots:
        base = root.rstrip("/")
        params += [base, base + "/", base + "0"]  # "0" follows "/": everything under base/
    clause = f"({column} = ? OR ({column} > ? AND {column} < ?))"
    return " OR ".join([clause] * len(roots)), params
