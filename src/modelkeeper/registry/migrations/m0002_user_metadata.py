"""User metadata (description, tags, trigger words, source, license, default settings) and history."""

from __future__ import annotations

import sqlite3

VERSION = 2
DESCRIPTION = "user metadata, tags, history"

SCHEMA = """
ALTER TABLE models ADD COLUMN name_source TEXT NOT NULL DEFAULT 'file';
CREATE TABLE model_meta (
    model_id         TEXT PRIMARY KEY REFERENCES models(id) ON DELETE CASCADE,
    description      TEXT,
    trigger_words    TEXT NOT NULL DEFAULT '[]',
    source_url       TEXT,
    license          TEXT,
    default_settings TEXT NOT NULL DEFAULT '{}',
    found            TEXT NOT NULL DEFAULT '{}',
    updated_at       REAL NOT NULL
);
CREATE TABLE model_tags (
    model_id TEXT NOT NULL REFERENCES models(id) ON DELETE CASCADE,
    tag      TEXT NOT NULL COLLATE NOCASE,
    PRIMARY KEY (model_id, tag)
);
CREATE INDEX model_tags_tag ON model_tags(tag);
CREATE TABLE history (
    id       INTEGER PRIMARY KEY,
    model_id TEXT,
    path     TEXT,
    at       REAL NOT NULL,
    op       TEXT NOT NULL,
    data     TEXT NOT NULL DEFAULT '{}'
);
CREATE INDEX history_model ON history(model_id, at);
"""


def up(conn: sqlite3.Connection) -> None:
    for statement in SCHEMA.split(";"):
        if statement.strip():
            conn.execute(statement)
