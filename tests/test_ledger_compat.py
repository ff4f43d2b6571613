"""The ledger's storage layer (SQLAlchemy Core) against ledgers made by the code before it, the
names it stores (one definition, used by the code that writes them), and its read-only mode.

``OLD_SCHEMA`` below is the DDL text the ledger ran until the SQLAlchemy tables replaced it
(SQLite spelling; on PostgreSQL it went through a textual rewrite, kept here as
``_old_pg_ddl``): a ledger created with it must be read and written by today's code.
"""

from __future__ import annotations

import ast
import contextlib
import datetime as dt
import json
import multiprocessing
import re
import sqlite3
from pathlib import Path

import pytest
import sqlalchemy as sa

from iris_tasks.orchestration import ledger as ledger_mod
from iris_tasks.orchestration.ledger import (
    CLAIMED,
    DONE,
    FAILED,
    OPEN_STATUSES,
    PROCESSING,
    QUARANTINED,
    SUPERSEDED,
    TERMINAL_STATUSES,
    ArrivalOutcome,
    FrameLedger,
    FrameStatus,
    LedgerMissing,
    Stage,
    isotime,
)

# test_ledger_postgres holds the PostgreSQL fixtures (a fresh schema per test).
# It also puts plugins/ on sys.path (through test_plugin_support), as Airflow does.
from test_ledger_postgres import pg_schema, pg_url  # noqa: F401, I001  # isort: skip

ROOT = Path(__file__).resolve().parents[1]

OLD_SCHEMA = """
CREATE TABLE IF NOT EXISTS meta (
    key   TEXT PRIMARY KEY,
    value TEXT NOT NULL
);
CREATE TABLE IF NOT EXISTS arrivals (
    id          INTEGER PRIMARY KEY AUTOINCREMENT,
    source_uri  TEXT NOT NULL,
    size        INTEGER NOT NULL,
    mtime       REAL NOT NULL,
    etag        TEXT,
    seen_at     TEXT NOT NULL,
    seen_by     TEXT NOT NULL,
    claimed_by  TEXT,
    claimed_at  TEXT,
    frame_id    TEXT,
    outcome     TEXT,
    UNIQUE (source_uri, size, mtime)
);
CREATE TABLE IF NOT EXISTS frames (
    frame_id         TEXT PRIMARY KEY,
    sha256           TEXT NOT NULL UNIQUE,
    filename         TEXT NOT NULL,
    source_uri       TEXT,
    raw_path         TEXT,
    landed_at        TEXT NOT NULL,
    claimed_at       TEXT,
    status           TEXT NOT NULL,
    night            TEXT,
    detector         TEXT,
    obstype          TEXT,
    obsname          TEXT,
    kind             TEXT,
    mode             TEXT,
    filter           TEXT,
    readpatt         TEXT,
    deadline_seconds REAL,
    deadline_at      TEXT,
    finished_at      TEXT,
    latency_seconds  REAL,
    deadline_missed  INTEGER NOT NULL DEFAULT 0,
    crds_context     TEXT,
    dag_id           TEXT,
    run_id           TEXT,
    duplicates       INTEGER NOT NULL DEFAULT 0,
    error            TEXT,
    updated_at       TEXT NOT NULL
);
CREATE INDEX IF NOT EXISTS frames_night ON frames (night, kind);
CREATE INDEX IF NOT EXISTS frames_run ON frames (run_id);
CREATE TABLE IF NOT EXISTS stages (
    id               INTEGER PRIMARY KEY AUTOINCREMENT,
    frame_id         TEXT NOT NULL,
    stage            TEXT NOT NULL,
    status           TEXT NOT NULL,
    started_at       TEXT NOT NULL,
    ended_at         TEXT,
    duration_seconds REAL,
    dag_id           TEXT,
    run_id           TEXT,
    try_number       INTEGER,
    detail           TEXT
);
CREATE INDEX IF NOT EXISTS stages_frame ON stages (frame_id);
CREATE TABLE IF NOT EXISTS products (
    id           INTEGER PRIMARY KEY AUTOINCREMENT,
    frame_id     TEXT NOT NULL,
    kind         TEXT NOT NULL,
    path         TEXT,
    key          TEXT,
    url          TEXT,
    sha256       TEXT,
    size         INTEGER,
    crds_context TEXT,
    version      INTEGER NOT NULL,
    current      INTEGER NOT NULL DEFAULT 1,
    created_at   TEXT NOT NULL,
    run_id       TEXT
);
CREATE INDEX IF NOT EXISTS products_frame ON products (frame_id, kind);
CREATE TABLE IF NOT EXISTS alerts (
    id         INTEGER PRIMARY KEY AUTOINCREMENT,
    kind       TEXT NOT NULL,
    frame_id   TEXT,
    dag_id     TEXT,
    run_id     TEXT,
    created_at TEXT NOT NULL,
    message    TEXT NOT NULL,
    detail     TEXT,
    delivered  TEXT
);
CREATE TABLE IF NOT EXISTS landing_ignored (
    source_uri  TEXT PRIMARY KEY,
    name        TEXT NOT NULL,
    size        INTEGER,
    reason      TEXT NOT NULL,
    first_seen  TEXT NOT NULL,
    last_seen   TEXT NOT NULL,
    gone_at     TEXT
);
CREATE TABLE IF NOT EXISTS calibrations (
    id               INTEGER PRIMARY KEY AUTOINCREMENT,
    night            TEXT NOT NULL,
    context          TEXT,
    previous_context TEXT,
    status           TEXT NOT NULL,
    created_at       TEXT NOT NULL,
    dag_id           TEXT,
    run_id           TEXT,
    masters          TEXT,
    qa               TEXT
);
"""
# Ledgers from before the landing_ignored table: the same DDL without it.
OLDER_SCHEMA = re.sub(r"CREATE TABLE IF NOT EXISTS landing_ignored \(.*?\);\n", "", OLD_SCHEMA,
                      flags=re.DOTALL)
T0 = "2026-11-24T07:00:00.000+00:00"
SHA = "5a" * 32
# Rows as the old code wrote them (its INSERT statements, SQLite spelling).
OLD_ROWS = [
    ("INSERT INTO meta (key, value) VALUES ('schema_version', '1')", ()),
    ("INSERT INTO arrivals (source_uri, size, mtime, etag, seen_at, seen_by, claimed_by, claimed_at, "
     "frame_id, outcome) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
     ("s3://landing/old.fits", 3 * 2**31, 1764000000.25, None, T0, "trigger", "run-0", T0,
      SHA[:16], "new")),
    ("INSERT INTO frames (frame_id, sha256, filename, source_uri, landed_at, claimed_at, status, "
     "night, detector, deadline_seconds, deadline_at, finished_at, latency_seconds, "
     "deadline_missed, dag_id, run_id, updated_at) "
     "VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
     (SHA[:16], SHA, "old.fits", "s3://landing/old.fits", T0, T0, "done", "2026-11-23", "IMG1",
      30, T0, T0, 12.5, 0, "iris_realtime", "run-0", T0)),
    ("INSERT INTO stages (frame_id, stage, status, started_at, ended_at, duration_seconds, dag_id, "
     "run_id, try_number, detail) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
     (SHA[:16], "readout", "success", T0, T0, 3.0, "iris_realtime", "run-0", 1, '{"n": 3}')),
    ("INSERT INTO products (frame_id, kind, key, sha256, size, version, current, created_at) "
     "VALUES (?, ?, ?, ?, ?, 1, 1, ?)", (SHA[:16], "cal", "products/old_cal.fits", "c1", 7, T0)),
    ("INSERT INTO calibrations (night, status, created_at, masters) VALUES (?, ?, ?, ?)",
     ("2026-11-23", "published", T0, '["/m/dark.fits"]')),
]


def _old_pg_ddl(sql: str) -> str:
    """The rewrite the old code applied to ``OLD_SCHEMA`` for PostgreSQL."""
    sql = sql.replace("INTEGER PRIMARY KEY AUTOINCREMENT",
                      "BIGINT GENERATED BY DEFAULT AS IDENTITY PRIMARY KEY")
    sql = re.sub(r"\bINTEGER\b", "BIGINT", sql)
    sql = re.sub(r"\bREAL\b", "DOUBLE PRECISION", sql)
    return re.sub(r"\bTEXT\b", 'TEXT COLLATE "C"', sql)


def _make_old_ledger(backend: str, ddl: str, tmp_path: Path, pg: str | None) -> str | Path:
    """A ledger as the old code left it: its DDL and its rows, written without SQLAlchemy."""
    if backend == "sqlite":
        path = tmp_path / "old.sqlite"
        with contextlib.closing(sqlite3.connect(path)) as conn:
            conn.execute("PRAGMA journal_mode = WAL")
            conn.executescript(ddl)
            for sql, args in OLD_ROWS:
                conn.execute(sql, args)
            conn.commit()
        return path
    import psycopg2

    loc = ledger_mod.parse_location(pg)
    with contextlib.closing(psycopg2.connect(loc.dsn)) as conn, conn.cursor() as cur:
        cur.execute(f"CREATE SCHEMA {loc.schema}")
        cur.execute(f"SET search_path = {loc.schema}")
        cur.execute(_old_pg_ddl(ddl))
        for sql, args in OLD_ROWS:
            cur.execute(sql.replace("?", "%s"), args)
        conn.commit()
    return pg


@pytest.fixture(params=["sqlite", "postgresql"])
def backend(request: pytest.FixtureRequest) -> str:
    return request.param


@pytest.mark.parametrize("ddl", [OLD_SCHEMA, OLDER_SCHEMA], ids=["old", "before-landing_ignored"])
def test_a_ledger_made_by_the_old_code_is_read_and_written(
        backend: str, ddl: str, tmp_path: Path, request: pytest.FixtureRequest):
    pg = request.getfixturevalue("pg_url") if backend == "postgresql" else None
    target = _make_old_ledger(backend, ddl, tmp_path, pg)
    # Read-only first: everything the page reads, and nothing created (not even the table
    # that is missing from the older ledger).
    ro = FrameLedger(target, readonly=True)
    with ro.reader() as r:
        assert r.nights() == ["2026-11-23"]
        (frame,) = r.frames_of_night("2026-11-23")
        assert r.ignored() == []
        assert r.flexure_of([SHA[:16]]) == {}  # no frame_flexure table: nothing, no error
        assert r.first_seen([SHA[:16]]) == {SHA[:16]: T0}
    assert frame["frame_id"] == SHA[:16] and frame["status"] == DONE
    assert isinstance(frame["deadline_seconds"], float) and frame["deadline_seconds"] == 30.0
    assert isinstance(frame["latency_seconds"], float) and frame["deadline_missed"] == 0
    if backend == "sqlite":
        with contextlib.closing(sqlite3.connect(target)) as conn:
            tables = {n for (n,) in conn.execute("SELECT name FROM sqlite_master WHERE type='table'")}
        assert ("landing_ignored" in tables) == (ddl is OLD_SCHEMA)

    led = FrameLedger(target)
    (arrival,) = led.arrivals()
    assert arrival["size"] == 3 * 2**31 and arrival["mtime"] == 1764000000.25
    assert isinstance(arrival["id"], int) and arrival["outcome"] == "new"
    assert led.arrival_keys() == {("s3://landing/old.fits", 3 * 2**31, 1764000000.25)}
    (stage,) = led.stages(SHA[:16])
    assert (stage["stage"], stage["try_number"], json.loads(stage["detail"])) == ("readout", 1, {"n": 3})
    # Writes go on from the old rows: ids continue, versions count on, outcomes as before.
    assert led.add_product(SHA[:16], "cal", key="products/old_cal.v2.fits", sha256="c2") == 2
    assert [(p["key"], p["current"]) for p in led.products(SHA[:16])] == [
        ("products/old_cal.fits", 0), ("products/old_cal.v2.fits", 1)]
    again, outcome = led.claim(sha256=SHA, filename="old.fits", source_uri="s3://x",
                               landed_at=isotime())
    assert outcome == ArrivalOutcome.DUPLICATE and again["duplicates"] == 1
    new, outcome = led.claim(sha256="6b" * 32, filename="new.fits", source_uri="s3://y",
                             landed_at=isotime())
    assert outcome == "new" and new["status"] == CLAIMED
    second = led.record_arrival("s3://landing/new.fits", 10, 2.0)
    assert second["id"] == arrival["id"] + 1
    led.note_ignored([("s3://landing/x.fits.gz", "x.fits.gz", 5, "compressed frame")],
                     scope="s3://landing/")
    assert [i["name"] for i in led.ignored()] == ["x.fits.gz"]
    assert len(led.calibrations("2026-11-23")) == 1
    led.record_calibration("2026-11-24", status="nothing-published")
    assert [c["id"] for c in led.calibrations()] == [1, 2]
    # the IFS flexure table is added to the old ledger on first write use
    assert led.flexure(SHA[:16]) is None and led.snapshot(SHA[:16])["frames"][0]["flexure"] is None
    led.record_flexure(SHA[:16], dx=0.1, dy=-0.2, method="LIT+OH", dx_measured=True,
                       dy_measured=True, night="2026-11-23", obs_time=T0)
    assert led.flexure(SHA[:16])["dy"] == -0.2
    # ... and the old code's own SQL still reads what the new code wrote.
    if backend == "sqlite":
        with contextlib.closing(sqlite3.connect(target)) as conn:
            assert conn.execute("SELECT status, duplicates FROM frames WHERE sha256 = ?",
                                (SHA,)).fetchone() == ("done", 1)
            assert conn.execute("SELECT COUNT(*) FROM landing_ignored").fetchone() == (1,)


def test_postgres_columns_keep_the_old_types(pg_url: str):  # noqa: F811
    FrameLedger(pg_url).frames()
    loc = ledger_mod.parse_location(pg_url)
    import psycopg2

    with contextlib.closing(psycopg2.connect(loc.dsn)) as conn, conn.cursor() as cur:
        cur.execute("SELECT table_name, column_name, data_type, collation_name, is_identity "
                    "FROM information_schema.columns WHERE table_schema = %s", (loc.schema,))
        cols = {(t, c): (d, coll, ident) for t, c, d, coll, ident in cur.fetchall()}
    assert cols[("arrivals", "id")] == ("bigint", None, "YES")
    assert cols[("arrivals", "size")][0] == "bigint"
    assert cols[("arrivals", "mtime")][0] == "double precision"
    assert cols[("frames", "landed_at")] == ("text", "C", "NO")
    assert cols[("landing_ignored", "source_uri")] == ("text", "C", "NO")
    assert {t for t, _ in cols} == set(ledger_mod.metadata.tables)


# -- the names --------------------------------------------------------------------------------
def test_status_constants_are_the_enum_members():
    assert (CLAIMED, PROCESSING, DONE, QUARANTINED, FAILED, SUPERSEDED) == tuple(FrameStatus)
    assert set(OPEN_STATUSES) | set(TERMINAL_STATUSES) == set(FrameStatus)
    assert not set(OPEN_STATUSES) & set(TERMINAL_STATUSES)
    assert FAILED == "failed" and {"done": 1}[DONE] == 1 and json.dumps([DONE]) == '["done"]'
    assert FrameStatus.PROCESSING.is_open and not FrameStatus.DONE.is_open
    assert Stage.REDUCE.reprocessed() == "reprocess.reduce"
    with pytest.raises(ValueError):
        Stage.ARCHIVE.reprocessed()


def _written_stage_names() -> set[str]:
    """Stage names as literals in the code that times stages: ``frame_stage(ledger, fid,
    "name")``, ``ledger.stage(fid, "name")``, ``start_stage(fid, "name")`` and the
    reprocessing helper ``_stage("name", variant)``."""
    found: set[str] = set()
    for path in (ROOT / "iris_tasks").rglob("*.py"):
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            if not isinstance(node, ast.Call):
                continue
            func = node.func
            name = func.attr if isinstance(func, ast.Attribute) else getattr(func, "id", "")
            pos = {"frame_stage": 2, "stage": 1, "start_stage": 1, "_stage": 0}.get(name)
            if pos is None or len(node.args) <= pos:
                continue
            arg = node.args[pos]
            if isinstance(arg, ast.Constant) and isinstance(arg.value, str):
                found.add(arg.value)
                if name == "_stage":
                    found.add(f"reprocess.{arg.value}")
    return found


def test_every_stage_name_the_code_writes_is_a_stage():
    written = _written_stage_names()
    assert {s.value for s in Stage} >= written, written - {s.value for s in Stage}


def test_the_night_page_maps_stages_from_the_enum():
    from iris_ops.ledger import INGEST_STAGES, NON_COMPUTE_STAGES, REALTIME_STAGES
    from iris_ops.views import BAD_STATUSES, GOOD_STATUSES

    for names in (REALTIME_STAGES, INGEST_STAGES, NON_COMPUTE_STAGES):
        assert all(isinstance(n, Stage) for n in names)
    assert REALTIME_STAGES[Stage.CLASSIFY] == "claim"
    assert REALTIME_STAGES["ingest"] == "frame"  # looked up with the stored str
    assert GOOD_STATUSES | BAD_STATUSES <= set(TERMINAL_STATUSES)


# -- read-only ledgers and processes ------------------------------------------------------------
def test_readonly_ledger_creates_nothing_and_refuses_writes(tmp_path: Path):
    path = tmp_path / "sub" / "ledger.sqlite"
    ro = FrameLedger(path, readonly=True)
    with pytest.raises(LedgerMissing, match=r"no ledger yet at .*ledger\.sqlite"):
        ro.frames()
    assert not path.parent.exists()
    path.parent.mkdir()
    path.touch()  # a file without tables is no ledger either
    with pytest.raises(LedgerMissing):
        ro.frames()
    assert path.stat().st_size == 0
    FrameLedger(path).claim(sha256="77" * 32, filename="a.fits", source_uri="s3://a",
                            landed_at=isotime())
    assert [f["filename"] for f in ro.frames()] == ["a.fits"]
    with pytest.raises(PermissionError, match="read-only"):
        ro.update_frame("77" * 8, status="done")
    with pytest.raises(PermissionError):
        ro.claim(sha256="88" * 32, filename="b.fits", source_uri="s3://b", landed_at=isotime())
    assert ro.frame("77" * 8)["status"] == "claimed"


def _finish_in_child(led: FrameLedger, fid: str) -> str:
    return led.finish(fid, when=dt.datetime.now(dt.UTC))["status"]


def test_a_ledger_object_survives_a_fork(tmp_path: Path):
    led = FrameLedger(tmp_path / "ledger.sqlite")
    fid = led.claim(sha256="99" * 32, filename="f.fits", source_uri="s3://f",
                    landed_at=isotime())[0]["frame_id"]
    assert led.frame(fid)["status"] == "claimed"  # the engine exists in this process now
    ctx = multiprocessing.get_context("fork")
    with ctx.Pool(2) as pool:
        assert pool.apply(_finish_in_child, (led, fid)) == "done"
    assert led.frame(fid)["status"] == "done"


def test_one_engine_per_location(tmp_path: Path):
    a = FrameLedger(tmp_path / "l.sqlite")
    b = FrameLedger(f"sqlite:///{tmp_path}/l.sqlite")
    a.frames(), b.frames()
    engine = ledger_mod._engine(a.location, readonly=False)
    assert engine is ledger_mod._engine(b.location, readonly=False)
    assert isinstance(engine.pool, sa.pool.NullPool)
