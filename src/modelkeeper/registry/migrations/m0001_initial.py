"""Files, models and their components."""

from __future__ import annotations

import sqlite3

VERSION = 1
DESCRIPTION = "files, models, components"

SCHEMA = """
CREATE TABLE models (
    id            TEXT PRIMARY KEY,
    name          TEXT NOT NULL,
    type          TEXT NOT NULL,
    base          TEXT NOT NULL,
    variant       TEXT NOT NULL,
    format        TEXT NOT NULL,
    layout        TEXT NOT NULL,
    encoder       TEXT,
    lora_format   TEXT,
    lora_rank     INTEGER,
    rule          TEXT NOT NULL,
    confidence    REAL NOT NULL,
    identification TEXT NOT NULL,
    status        TEXT NOT NULL DEFAULT 'ok',
    size          INTEGER NOT NULL DEFAULT 0,
    created_at    REAL NOT NULL,
    updated_at    REAL NOT NULL
);
CREATE INDEX models_type ON models(type, base);
CREATE INDEX models_name ON models(name COLLATE NOCASE);

CREATE TABLE files (
    id            INTEGER PRIMARY KEY,
    path          TEXT NOT NULL UNIQUE,
    root          TEXT NOT NULL,
    rel           TEXT NOT NULL,
    kind          TEXT NOT NULL,
    format        TEXT NOT NULL,
    status        TEXT NOT NULL,
    error_code    TEXT,
    error         TEXT,
    size          INTEGER,
    mtime_ns      INTEGER,
    inode         INTEGER,
    device        INTEGER,
    rules_version INTEGER,
    model_id      TEXT REFERENCES models(id) ON DELETE SET NULL,
    blake3        TEXT,
    sha256        TEXT,
    autov2        TEXT,
    hashed_size   INTEGER,
    hashed_mtime_ns INTEGER,
    hashed_at     REAL,
    first_seen    REAL NOT NULL,
    last_seen     REAL NOT NULL
);
CREATE INDEX files_root ON files(root);
CREATE INDEX files_model ON files(model_id);
CREATE INDEX files_blake3 ON files(blake3);
CREATE INDEX files_sha256 ON files(sha256);

CREATE TABLE components (
    id            INTEGER PRIMARY KEY,
    model_id      TEXT NOT NULL REFERENCES models(id) ON DELETE CASCADE,
    name          TEXT NOT NULL,
    kind          TEXT NOT NULL,
    layout        TEXT NOT NULL,
    prefix        TEXT NOT NULL DEFAULT '',
    subfolder     TEXT,
    base          TEXT,
    encoder       TEXT,
    rule          TEXT,
    tensor_count  INTEGER NOT NULL DEFAULT 0,
    parameters    INTEGER NOT NULL DEFAULT 0,
    bytes         INTEGER NOT NULL DEFAULT 0,
    dtypes        TEXT NOT NULL DEFAULT '{}',
    content_id    TEXT,
    UNIQUE (model_id, name)
);
CREATE INDEX components_content ON components(content_id);
"""


def up(conn: sqlite3.Connection) -> None:
    for statement in SCHEMA.split(";"):
        if statement.strip():
            conn.execute(statement)
