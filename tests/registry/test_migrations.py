"""Numbered migrations, each tested on an in-memory database."""

from __future__ import annotations

import re
import sqlite3
from collections.abc import Iterator
from pathlib import Path

import pytest

from modelkeeper.registry import migrations
from modelkeeper.registry.errors import MigrationError
from modelkeeper.registry.migrations import LATEST, MIGRATIONS, Migration, current_version, migrate
from modelkeeper.registry.store import Registry


@pytest.fixture
def conn() -> Iterator[sqlite3.Connection]:
    c = sqlite3.connect(":memory:", isolation_level=None)
    c.execute("PRAGMA foreign_keys=ON")
    yield c
    c.close()


def _tables(conn: sqlite3.Connection) -> set[str]:
    return {r[0] for r in conn.execute("SELECT name FROM sqlite_master WHERE type='table'")}


def _columns(conn: sqlite3.Connection, table: str) -> set[str]:
    return {r[1] for r in conn.execute(f"PRAGMA table_info({table})")}


def test_migrations_are_numbered_in_order() -> None:
    assert [m.version for m in MIGRATIONS] == list(range(1, len(MIGRATIONS) + 1))
    folder = Path(migrations.__file__).parent
    modules = sorted(p.stem for p in folder.glob("m[0-9][0-9][0-9][0-9]_*.py"))
    assert [int(re.match(r"m(\d{4})_", m)[1]) for m in modules] == [m.version for m in MIGRATIONS]  # type: ignore[index]


def test_m0001_initial(conn: sqlite3.Connection) -> None:
    assert migrate(conn, target=1) == [1]
    assert current_version(conn) == 1
    assert {"files", "models", "components"} <= _tables(conn)
    assert {"path", "size", "mtime_ns", "inode", "blake3", "sha256", "autov2", "status"} <= _columns(
        conn, "files"
    )
    assert {"id", "type", "base", "variant", "rule", "confidence", "identification"} <= _columns(
        conn, "models"
    )
    assert {"content_id", "tensor_count", "parameters", "bytes", "dtypes"} <= _columns(conn, "components")
    conn.execute(
        "INSERT INTO models (id, name, type, base, variant, format, layout, rule, confidence, identification,"
        " created_at, updated_at) VALUES ('m-1', 'x', 'vae', 'sd1', 'normal', 'safetensors', 'original', 'r', 1, '{}', 0, 0)"
    )
    conn.execute(
        "INSERT INTO components (model_id, name, kind, layout) VALUES ('m-1', 'vae', 'vae', 'original')"
    )
    conn.execute("DELETE FROM models WHERE id='m-1'")
    assert conn.execute("SELECT COUNT(*) FROM components").fetchone()[0] == 0  # cascades


def test_m0002_user_metadata(conn: sqlite3.Connection) -> None:
    migrate(conn, target=1)
    conn.execute(
        "INSERT INTO models (id, name, type, base, variant, format, layout, rule, confidence, identification,"
        " created_at, updated_at) VALUES ('m-1', 'x', 'vae', 'sd1', 'normal', 'safetensors', 'original', 'r', 1, '{}', 0, 0)"
    )
    assert migrate(conn, target=2) == [2]
    assert {"model_meta", "model_tags", "history"} <= _tables(conn)
    assert (
        conn.execute("SELECT name_source FROM models WHERE id='m-1'").fetchone()[0] == "file"
    )  # existing rows kept
    conn.execute("INSERT INTO model_tags VALUES ('m-1', 'Style')")
    assert (
        conn.execute("SELECT COUNT(*) FROM model_tags WHERE tag='style'").fetchone()[0] == 1
    )  # case-insensitive


def _model(conn: sqlite3.Connection, model_id: str, created: float) -> None:
    conn.execute(
        "INSERT INTO models (id, name, type, base, variant, format, layout, rule, confidence, identification,"
        " created_at, updated_at) VALUES (?, ?, 'vae', 'sd1', 'normal', 'safetensors', 'original', 'r', 1, '{}', ?, ?)",
        (model_id, model_id, created, created),
    )


def _file(
    conn: sqlite3.Connection,
    path: str,
    model_id: str,
    *,
    blake3: str | None = None,
    inode: int | None = None,
    status: str = "ok",
) -> None:
    conn.execute(
        "INSERT INTO files (path, root, rel, kind, format, status, size, mtime_ns, inode, device, model_id, blake3,"
        " first_seen, last_seen) VALUES (?, '/r', ?, 'file', 'safetensors', ?, 10, 5, ?, 1, ?, ?, 0, 0)",
        (path, path, status, inode, model_id, blake3),
    )


def test_m0003_locations_merges_models_of_one_content(conn: sqlite3.Connection) -> None:
    migrate(conn, target=2)
    for i, model_id in enumerate(("m-old", "m-copy", "m-link", "m-other", "m-gone")):
        _model(conn, model_id, float(i))
    _file(conn, "/a/x.safetensors", "m-old", blake3="b1", inode=1)
    _file(conn, "/b/x.safetensors", "m-copy", blake3="b1", inode=2)  # a copy: same BLAKE3
    _file(conn, "/b/link.safetensors", "m-link", inode=2)  # a link to the copy: same inode, unhashed
    _file(conn, "/a/y.safetensors", "m-other", blake3="b2", inode=3)
    _file(conn, "/gone/z.safetensors", "m-gone", inode=1, status="missing")  # an inode reused: not merged
    conn.execute("INSERT INTO model_tags VALUES ('m-copy', 'kept')")
    conn.execute("INSERT INTO history (model_id, at, op) VALUES ('m-link', 0, 'load')")
    assert migrate(conn, target=3) == [3]
    assert "content_key" in _columns(conn, "files")
    owners = dict(conn.execute("SELECT path, model_id FROM files").fetchall())
    assert owners == {
        "/a/x.safetensors": "m-old",
        "/b/x.safetensors": "m-old",
        "/b/link.safetensors": "m-old",
        "/a/y.safetensors": "m-other",
        "/gone/z.safetensors": "m-gone",
    }
    models = {r[0] for r in conn.execute("SELECT id FROM models")}
    assert models == {"m-old", "m-other", "m-gone"}
    assert conn.execute("SELECT model_id, tag FROM model_tags").fetchall() == [("m-old", "kept")]
    assert conn.execute("SELECT model_id FROM history").fetchall() == [("m-old",)]


def test_m0004_model_bases_indexes_the_bases_a_model_fits(conn: sqlite3.Connection) -> None:
    migrate(conn, target=3)
    _model(conn, "m-vae", 0.0)
    _model(conn, "m-broken", 1.0)  # its identification is not JSON: no bases, no failure
    conn.execute(
        "UPDATE models SET identification=? WHERE id='m-vae'",
        ('{"compatible_bases": ["sd1", "sd2", "sdxl", "sdxl_refiner"]}',),
    )
    conn.execute("UPDATE models SET identification='not json' WHERE id='m-broken'")
    assert migrate(conn, target=4) == [4]

    def fits(model_id: str) -> list[str]:
        rows = conn.execute("SELECT base FROM model_bases WHERE model_id=? ORDER BY base", (model_id,))
        return [r[0] for r in rows]

    assert fits("m-vae") == ["sd1", "sd2", "sdxl", "sdxl_refiner"] and fits("m-broken") == []
    # Every later write keeps the table in step: an update, an insert, a delete.
    conn.execute("UPDATE models SET identification='{\"compatible_bases\": [\"sdxl\"]}' WHERE id='m-vae'")
    assert fits("m-vae") == ["sdxl"]
    conn.execute(
        "INSERT INTO models (id, name, type, base, variant, format, layout, rule, confidence, identification,"
        " created_at, updated_at) VALUES ('m-clip', 'c', 'text_encoder', 'any', 'normal', 'safetensors',"
        " 'original', 'r', 1, '{\"compatible_bases\": [\"sd1\", \"flux\"]}', 2, 2)"
    )
    assert fits("m-clip") == ["flux", "sd1"]
    conn.execute("DELETE FROM models WHERE id='m-clip'")
    assert conn.execute("SELECT COUNT(*) FROM model_bases WHERE model_id='m-clip'").fetchone()[0] == 0
    plan = " ".join(
        str(r[3])
        for r in conn.execute("EXPLAIN QUERY PLAN SELECT model_id FROM model_bases WHERE base='sdxl'")
    )
    assert "SCAN" not in plan  # found through the index


def test_m0005_gives_ids_back_to_live_files(conn: sqlite3.Connection) -> None:
    """The state an earlier scanner left (the new-user trial): the old id missing on a deleted
    copy, the live file under a later, empty model. The later model merges into the older one."""
    migrate(conn, target=4)
    for model_id, created in (
        ("m-old", 0.0),
        ("m-new", 5.0),
        ("m-gone", 1.0),
        ("m-lone", 6.0),
        ("m-live", 2.0),
    ):
        _model(conn, model_id, created)
    conn.execute("UPDATE models SET status='missing' WHERE id IN ('m-old', 'm-gone', 'm-lone')")
    _file(conn, "/r/b.safetensors", "m-old", status="missing")  # the deleted copy holds the old id
    _file(conn, "/r/a.safetensors", "m-new")  # the live file got a fresh one
    _file(conn, "/r/gone.safetensors", "m-gone", status="missing")  # deleted, nothing alike: stays
    _file(conn, "/r/lone.safetensors", "m-lone", status="missing")  # newer than the live one: stays
    _file(conn, "/r/live.safetensors", "m-live")
    keys = {"b": "k1", "a": "k1", "gone": "k2", "lone": "k3", "live": "k3"}
    for name, key in keys.items():
        conn.execute("UPDATE files SET content_key=? WHERE path=?", (key, f"/r/{name}.safetensors"))
    conn.execute("INSERT INTO model_tags VALUES ('m-old', 'keep'), ('m-new', 'later')")
    conn.execute(
        "INSERT INTO history (model_id, at, op) VALUES ('m-old', 0, 'meta.set'), ('m-new', 5, 'load')"
    )
    assert migrate(conn) == [5]
    owners = dict(conn.execute("SELECT path, model_id FROM files").fetchall())
    assert owners == {
        "/r/a.safetensors": "m-old",  # the live file has its id back; the dead path is dropped
        "/r/gone.safetensors": "m-gone",
        "/r/lone.safetensors": "m-lone",
        "/r/live.safetensors": "m-live",
    }
    status = dict(conn.execute("SELECT id, status FROM models").fetchall())
    assert status == {"m-old": "ok", "m-gone": "missing", "m-lone": "missing", "m-live": "ok"}
    tags = conn.execute("SELECT tag FROM model_tags WHERE model_id='m-old' ORDER BY tag").fetchall()
    assert [t[0] for t in tags] == ["keep", "later"]
    ops = [r[0] for r in conn.execute("SELECT op FROM history WHERE model_id='m-old' ORDER BY at, id")]
    assert ops == ["meta.set", "load", "registry.id_restored"]


def test_migrate_is_idempotent_and_refuses_newer(conn: sqlite3.Connection) -> None:
    assert migrate(conn) == list(range(1, LATEST + 1))
    assert migrate(conn) == []
    conn.execute(f"PRAGMA user_version = {LATEST + 1}")
    with pytest.raises(MigrationError, match="newer"):
        migrate(conn)


def test_a_failing_migration_rolls_back(conn: sqlite3.Connection, monkeypatch: pytest.MonkeyPatch) -> None:
    def broken(c: sqlite3.Connection) -> None:
        c.execute("CREATE TABLE half_done (x)")
        c.execute("THIS IS NOT SQL")

    monkeypatch.setattr(migrations, "MIGRATIONS", (*MIGRATIONS, Migration(LATEST + 1, "broken", broken)))
    monkeypatch.setattr(migrations, "LATEST", LATEST + 1)
    with pytest.raises(MigrationError, match="broken"):
        migrate(conn)
    assert current_version(conn) == LATEST  # the good ones stay applied
    assert "half_done" not in _tables(conn)


def test_registry_file_is_wal_and_reopens(tmp_path: Path) -> None:
    path = tmp_path / "sub" / "r.sqlite3"
    with Registry.open(path) as reg:
        assert reg._conn.execute("PRAGMA journal_mode").fetchone()[0] == "wal"
        reg.add_history(None, "test.op", {"x": 1})
    with Registry.open(path) as reg:
        assert current_version(reg._conn) == LATEST
        assert reg._conn.execute("SELECT op FROM history").fetchone()[0] == "test.op"
