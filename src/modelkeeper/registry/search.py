"""Queries of the registry: resolving a reference to model ids, and the search listing."""

from __future__ import annotations

import os
import re
import sqlite3
from collections.abc import Mapping, Sequence
from typing import Any

from modelkeeper.registry.errors import InvalidMetadata
from modelkeeper.registry.records import ModelSummary, SearchPage
from modelkeeper.registry.vocabulary import normalize, squash
from modelkeeper.registry.writes import under

_HEX = re.compile(r"[0-9a-fA-F]{6,64}")
MIN_HASH_PREFIX = 6

#: Sort keys -> SQL expressions (the id breaks ties, so pages never overlap).
SORTS: dict[str, str] = {
    "name": "m.name COLLATE NOCASE",
    "type": "m.type",
    "base": "m.base",
    "size": "m.size",
    "created": "m.created_at",
    "updated": "m.updated_at",
}


def _ids(conn: sqlite3.Connection, sql: str, params: tuple[Any, ...]) -> list[str]:
    return sorted({str(r[0]) for r in conn.execute(sql, params)})


def by_id(conn: sqlite3.Connection, ref: str) -> list[str]:
    return _ids(conn, "SELECT id FROM models WHERE id = ?", (ref,))


def by_path(conn: sqlite3.Connection, ref: str) -> list[str]:
    paths = {ref, os.path.abspath(os.path.expanduser(ref))}
    found = _ids(
        conn,
        f"SELECT model_id FROM files WHERE model_id IS NOT NULL AND path IN ({','.join('?' * len(paths))})",
        tuple(paths),
    )
    return found or _ids(
        conn, "SELECT model_id FROM files WHERE model_id IS NOT NULL AND status='ok' AND rel = ?", (ref,)
    )


def by_name(conn: sqlite3.Connection, ref: str) -> list[str]:
    return _ids(conn, "SELECT id FROM models WHERE name = ? COLLATE NOCASE", (ref,))


def by_hash(conn: sqlite3.Connection, ref: str) -> list[str]:
    if not _HEX.fullmatch(ref):
        return []
    prefix = ref.lower() + "%"
    return _ids(
        conn,
        "SELECT model_id FROM files WHERE model_id IS NOT NULL AND (blake3 LIKE ? OR sha256 LIKE ?)",
        (prefix, prefix),
    )


_PARTS = re.compile(r"[^\W_]+")  # the letters and digits of a word; "_", "-", "." and "/" separate
_SQUASHED_NAME = "replace(replace(replace(replace(lower(m.name), '_', ''), '-', ''), ' ', ''), '.', '')"


def _like(part: str) -> str:
    return "%" + part.replace("\\", "\\\\").replace("%", "\\%").replace("_", "\\_") + "%"


def _word_matches(word: str) -> tuple[str, list[Any]]:
    """SQL that holds for a model matching one typed word: each of its parts (``dreamshaper_8``:
    ``dreamshaper`` and ``8``) in its name, description, tags or file paths, without case; or the
    whole word, without separators, in its name (``sdxlvae`` finds ``sdxl_vae``)."""
    parts = _PARTS.findall(word) or [word]
    each = (
        "(m.name LIKE ? ESCAPE '\\' OR mm.description LIKE ? ESCAPE '\\'"
        " OR m.id IN (SELECT model_id FROM model_tags WHERE tag LIKE ? ESCAPE '\\')"
        " OR m.id IN (SELECT model_id FROM files WHERE rel LIKE ? ESCAPE '\\'))"
    )
    sql = " AND ".join([each] * len(parts))
    params: list[Any] = [p for part in parts for p in [_like(part)] * 4]
    return f"(({sql}) OR {_SQUASHED_NAME} LIKE ? ESCAPE '\\')", [*params, _like(squash(word))]


def search(
    conn: sqlite3.Connection,
    *,
    type: str | None,
    base: str | None,
    format: str | None,
    tag: str | None,
    query: str | None,
    status: str | None,
    sort: str,
    descending: bool,
    limit: int,
    offset: int,
    roots: Sequence[str] = (),
    handles: Mapping[str, str] | None = None,
) -> SearchPage:
    if sort not in SORTS:
        raise InvalidMetadata(f"sort: unknown key {sort!r}; one of {', '.join(SORTS)}", sort=sort)
    if limit < 1 or offset < 0:
        raise InvalidMetadata("limit must be >= 1 and offset >= 0")
    where: list[str] = []
    params: list[Any] = []
    filters = (("type", type), ("format", format), ("status", status))
    for field, value in filters:
        stored = normalize(field, value)
        if stored is not None:
            where.append(f"m.{field} = ?")
            params.append(stored)
    wanted_base = normalize("base", base)
    if wanted_base is not None:
        # A model usable with that base: stored under it, or fitting it (an SD-family VAE whose
        # shapes fit SD1 and SDXL alike, a CLIP-L of base "any"): migration m0004's index.
        where.append("(m.base = ? OR m.id IN (SELECT model_id FROM model_bases WHERE base = ?))")
        params += [wanted_base, wanted_base]
    if tag:
        where.append("m.id IN (SELECT model_id FROM model_tags WHERE tag = ?)")
        params.append(tag)
    inside, inside_params = under(roots)
    if inside:
        where.append(f"m.id IN (SELECT model_id FROM files WHERE {inside})")
        params += inside_params
    for word in (query or "").split():
        sql, values = _word_matches(word)
        where.append(sql)
        params += values
    clause = f" WHERE {' AND '.join(where)}" if where else ""
    base_sql = f"FROM models AS m LEFT JOIN model_meta AS mm ON mm.model_id = m.id{clause}"
    total = int(conn.execute(f"SELECT COUNT(*) {base_sql}", params).fetchone()[0])
    order = f"{SORTS[sort]} {'DESC' if descending else 'ASC'}, m.id"
    rows = conn.execute(
        f"SELECT m.id, m.name, m.type, m.base, m.variant, m.format, m.status, m.size,"
        f" (SELECT path FROM files WHERE model_id = m.id ORDER BY status='ok' DESC, {inside or 'path IS NULL'} DESC, id"
        f" LIMIT 1) AS path,"
        f" (SELECT COUNT(*) FROM files WHERE model_id = m.id AND status='ok') AS locations,"
        f" (SELECT group_concat(tag, ',') FROM model_tags WHERE model_id = m.id) AS tags"
        f" {base_sql} ORDER BY {order} LIMIT ? OFFSET ?",
        [*inside_params, *params, limit, offset],
    ).fetchall()
    items = [
        ModelSummary(
            id=r["id"],
            handle=(handles or {}).get(r["id"], r["name"]),
            name=r["name"],
            type=r["type"],
            base=r["base"],
            variant=r["variant"],
            format=r["format"],
            status=r["status"],
            size=r["size"],
            path=r["path"],
            locations=r["locations"],
            tags=sorted(r["tags"].split(",")) if r["tags"] else [],
        )
        for r in rows
    ]
    return SearchPage(total=total, offset=offset, limit=limit, items=items)
