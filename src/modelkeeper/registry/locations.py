"""One model, several locations: merging the models of one content, splitting a model whose
locations turned out to differ.

What makes two files one content, strongest first: the same device and inode (a symlink or a hard
link: certain); the same BLAKE3 once hashed (certain); before hashing, the same size and content
key (``modelkeeper.discovery.identity.content_key``: the header and samples of the data; a
provisional answer that hashing confirms or undoes, see :func:`split_model`).

A model's id follows its live files: a location that goes while another one of its model is
present is dropped (:func:`drop_missing`); a model keeps missing locations only while none is
present, so that a copy of its content found later (a move, a file restored) takes it back
(:func:`twin_of`).
"""

from __future__ import annotations

import sqlite3
import time

__all__ = ["drop_missing", "merge_models", "present_elsewhere", "split_model", "twin_of"]


def merge_models(conn: sqlite3.Connection, keep: str, others: list[str]) -> None:
    """Move the files, tags and history of ``others`` to ``keep`` (its name and user metadata
    stay) and drop them. ``keep`` is ok when any of its files is."""
    for other in others:
        conn.execute("UPDATE files SET model_id=? WHERE model_id=?", (keep, other))
        conn.execute(
            "INSERT OR IGNORE INTO model_tags (model_id, tag) SELECT ?, tag FROM model_tags WHERE model_id=?",
            (keep, other),
        )
        conn.execute("UPDATE history SET model_id=? WHERE model_id=?", (keep, other))
        conn.execute("DELETE FROM models WHERE id=?", (other,))
    refresh_status(conn, keep)


def refresh_status(conn: sqlite3.Connection, model_id: str, now: float | None = None) -> None:
    """A model is ok while one of its locations is; missing when none is."""
    ok = conn.execute("SELECT 1 FROM files WHERE model_id=? AND status='ok' LIMIT 1", (model_id,)).fetchone()
    conn.execute(
        "UPDATE models SET status=?, updated_at=? WHERE id=?",
        ("ok" if ok else "missing", time.time() if now is None else now, model_id),
    )


def present_elsewhere(conn: sqlite3.Connection, model_id: str, file_id: int) -> bool:
    """Whether a location of ``model_id`` other than the file ``file_id`` is present."""
    row = conn.execute(
        "SELECT 1 FROM files WHERE model_id=? AND id!=? AND status='ok' LIMIT 1", (model_id, file_id)
    ).fetchone()
    return row is not None


def drop_missing(conn: sqlite3.Connection, model_id: str) -> list[str]:
    """Forget the missing locations of ``model_id`` when one of its locations is present (a copy
    deleted, a file moved away): the paths are gone and the model lives on elsewhere. Returns the
    paths dropped."""
    if (
        conn.execute("SELECT 1 FROM files WHERE model_id=? AND status='ok' LIMIT 1", (model_id,)).fetchone()
        is None
    ):
        return []
    gone = conn.execute(
        "SELECT id, path FROM files WHERE model_id=? AND status='missing' ORDER BY path", (model_id,)
    ).fetchall()
    conn.executemany("DELETE FROM files WHERE id=?", [(r[0],) for r in gone])
    return [str(r[1]) for r in gone]


def twin_of(
    conn: sqlite3.Connection,
    path: str,
    fingerprint: tuple[int, int, int, int],
    content_key: str | None,
) -> str | None:
    """The model of a file with the same content as the new file at ``path``, if any: a present
    file of the same device, inode, size and mtime first (a link; the mtime guards against an inode
    reused by a new file), then a present file of the same size and content key, then a missing one
    (the file moved or restored: its model, id and metadata come back)."""
    size, mtime_ns, inode, device = fingerprint
    row = conn.execute(
        "SELECT model_id FROM files WHERE device=? AND inode=? AND size=? AND mtime_ns=? AND status='ok'"
        " AND model_id IS NOT NULL AND path != ? ORDER BY id LIMIT 1",
        (device, inode, size, mtime_ns, path),
    ).fetchone()
    if row is None and content_key is not None:
        row = conn.execute(
            "SELECT model_id FROM files WHERE size=? AND content_key=? AND status IN ('ok', 'missing')"
            " AND model_id IS NOT NULL AND path != ? ORDER BY status = 'ok' DESC, id LIMIT 1",
            (size, content_key, path),
        ).fetchone()
    return str(row[0]) if row else None


def split_model(conn: sqlite3.Connection, model_id: str, file_ids: list[int], name: str, new_id: str) -> None:
    """Give the files ``file_ids`` of ``model_id`` a model of their own, ``new_id``, identified as
    ``model_id`` is (its components copied; no user metadata: it is another model)."""
    now = time.time()
    conn.execute(
        "INSERT INTO models (id, name, name_source, type, base, variant, format, layout, encoder, lora_format,"
        " lora_rank, rule, confidence, identification, status, size, created_at, updated_at)"
        " SELECT ?, ?, 'file', type, base, variant, format, layout, encoder, lora_format, lora_rank, rule,"
        " confidence, identification, status, size, ?, ? FROM models WHERE id=?",
        (new_id, name, now, now, model_id),
    )
    conn.execute(
        "INSERT INTO model_meta (model_id, updated_at) VALUES (?, ?)",
        (new_id, now),
    )
    conn.execute(
        "INSERT INTO components (model_id, name, kind, layout, prefix, subfolder, base, encoder, rule,"
        " tensor_count, parameters, bytes, dtypes) SELECT ?, name, kind, layout, prefix, subfolder, base,"
        " encoder, rule, tensor_count, parameters, bytes, dtypes FROM components WHERE model_id=?",
        (new_id, model_id),
    )
    conn.executemany("UPDATE files SET model_id=? WHERE id=?", [(new_id, f) for f in file_ids])
    refresh_status(conn, new_id, now)
    refresh_status(conn, model_id, now)
