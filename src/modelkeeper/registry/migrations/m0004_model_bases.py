"""The bases a model fits, indexed: what ``search(base=...)`` matches besides the stored base.

Shapes alone cannot tell an SD1 VAE from an SDXL one, nor does a CLIP-L belong to one base: such a
model's identification lists every base it fits (``compatible_bases``) and stores one of them (or
``any``) as its base. ``model_bases`` holds that list, one row per (base, model), so that a filter
on a base finds, through an index, the models stored under it and those that fit it; 10,000
models' identification JSON is never parsed to answer a listing.

Triggers keep the table in step with ``models.identification`` on every write (a scan, a hash
settling a known file, a move, a split or a merge), whichever code path makes it.
"""

from __future__ import annotations

import sqlite3

VERSION = 4
DESCRIPTION = "the bases a model fits, indexed"

_BASES_OF_NEW = (
    "INSERT OR IGNORE INTO model_bases (base, model_id)"
    " SELECT value, NEW.id FROM json_each(CASE WHEN json_valid(NEW.identification) THEN NEW.identification END,"
    " '$.compatible_bases') WHERE type = 'text'"
)

SCHEMA = f"""
CREATE TABLE model_bases (
    base     TEXT NOT NULL,
    model_id TEXT NOT NULL REFERENCES models(id) ON DELETE CASCADE,
    PRIMARY KEY (base, model_id)
) WITHOUT ROWID;
CREATE INDEX model_bases_model ON model_bases(model_id);
CREATE TRIGGER models_bases_inserted AFTER INSERT ON models BEGIN
    {_BASES_OF_NEW};
END;
CREATE TRIGGER models_bases_updated AFTER UPDATE OF identification ON models BEGIN
    DELETE FROM model_bases WHERE model_id = NEW.id;
    {_BASES_OF_NEW};
END;
INSERT OR IGNORE INTO model_bases (base, model_id)
    SELECT j.value, m.id FROM models AS m, json_each(m.identification, '$.compatible_bases') AS j
    WHERE json_valid(m.identification) AND j.type = 'text'
"""


def up(conn: sqlite3.Connection) -> None:
    for statement in _statements(SCHEMA):
        conn.execute(statement)


def _statements(script: str) -> list[str]:
    """The statements of ``script``: split at ``;`` outside ``BEGIN ... END`` trigger bodies."""
    out: list[str] = []
    current = ""
    for piece in script.split(";"):
        current += piece
        if sqlite3.complete_statement(current + ";"):
            if current.strip():
                out.append(current.strip())
            current = ""
        else:
            current += ";"
    if current.strip():
        out.append(current.strip())
    return out
