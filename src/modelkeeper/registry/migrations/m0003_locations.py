"""One model, several locations: the same content at several paths is one model.

Adds ``files.content_key`` (what tells an unhashed copy: see ``modelkeeper.discovery.identity``),
indexes to find a file's twins (same device and inode: a symlink or a hard link; same size and
content key: a copy), and merges the models that already share content: files with the same
BLAKE3, or (present) the same device, inode, size and mtime, end under the oldest of their models (its id, name
and user metadata kept; the tags of the others added; their history moved to it).
"""

from __future__ import annotations

import sqlite3

from modelkeeper.registry.locations import merge_models

VERSION = 3
DESCRIPTION = "one model, several locations"

SCHEMA = """
ALTER TABLE files ADD COLUMN content_key TEXT;
CREATE INDEX files_content_key ON files(size, content_key);
CREATE INDEX files_inode ON files(device, inode)
"""

#: (key, model id, its created_at): files with one key hold one content.
_KEYS = """
SELECT 'b3:' || f.blake3, f.model_id, m.created_at FROM files AS f JOIN models AS m ON m.id = f.model_id
WHERE f.blake3 IS NOT NULL AND f.status != 'rejected'
UNION
SELECT 'ino:' || f.device || ':' || f.inode || ':' || f.size || ':' || f.mtime_ns, f.model_id, m.created_at
FROM files AS f JOIN models AS m ON m.id = f.model_id
WHERE f.inode IS NOT NULL AND f.status = 'ok'
"""


def up(conn: sqlite3.Connection) -> None:
    for statement in SCHEMA.split(";"):
        if statement.strip():
            conn.execute(statement)
    parent: dict[str, str] = {}

    def find(m: str) -> str:
        while parent.setdefault(m, m) != m:
            m = parent[m]
        return m

    created: dict[str, tuple[float, str]] = {}
    first_of_key: dict[str, str] = {}
    for key, model, at in conn.execute(_KEYS).fetchall():
        created[model] = (at, model)
        other = first_of_key.setdefault(key, model)
        a, b = find(model), find(other)
        if a != b:
            parent[max(a, b, key=created.__getitem__)] = min(a, b, key=created.__getitem__)
    groups: dict[str, list[str]] = {}
    for model in created:
        groups.setdefault(find(model), []).append(model)
    for root, models in groups.items():
        others = sorted(m for m in models if m != root)
        if others:
            merge_models(conn, root, others)
