"""Give back the ids that an earlier scanner moved onto deleted files.

Before this version, a file rewritten (even with the same bytes) while its model still listed a
deleted copy left that model for a new one: the old id, its user metadata, history and pins stayed
on the dead path (``missing``) and the live file got a fresh, empty id. This migration finds such
pairs, a missing model and a later model of a present file with the content of one of its
locations (same BLAKE3 while both hashes hold, or same size and content key), and merges the later
model into the older one (``locations.merge_models``: the older id, name and user metadata kept, the
later one's tags added and history moved); the dead paths of the model, present again, are dropped.
Each repair is recorded in the model's history (``registry.id_restored``).
"""

from __future__ import annotations

import json
import sqlite3
import time

from modelkeeper.registry.locations import drop_missing, merge_models

VERSION = 5
DESCRIPTION = "ids back on live files"

#: (older missing model, later model of a present file of its content), oldest first.
_PAIRS = """
SELECT mo.created_at, mo.id, mn.created_at, mn.id FROM files AS old
JOIN models AS mo ON mo.id = old.model_id AND mo.status = 'missing'
JOIN files AS new ON new.status = 'ok' AND new.model_id IS NOT NULL AND new.model_id != old.model_id
JOIN models AS mn ON mn.id = new.model_id AND mn.created_at > mo.created_at
WHERE old.status = 'missing' AND ({same})
"""
_SAME_HASH = (
    "new.blake3 = old.blake3 AND new.hashed_size IS new.size AND new.hashed_mtime_ns IS new.mtime_ns"
    " AND old.hashed_size IS old.size AND old.hashed_mtime_ns IS old.mtime_ns"
)
_SAME_KEY = "new.content_key = old.content_key AND new.size = old.size"


def up(conn: sqlite3.Connection) -> None:
    pairs = {tuple(row) for same in (_SAME_HASH, _SAME_KEY) for row in conn.execute(_PAIRS.format(same=same))}
    merged: set[str] = set()
    now = time.time()
    for _, keep, _, other in sorted(pairs):  # the oldest missing model first
        if keep in merged or other in merged:
            continue
        merge_models(conn, keep, [other])
        merged.add(other)
        dropped = drop_missing(conn, keep)
        conn.execute(
            "INSERT INTO history (model_id, path, at, op, data) VALUES (?, NULL, ?, 'registry.id_restored', ?)",
            (keep, now, json.dumps({"merged": other, "dropped": dropped})),
        )
