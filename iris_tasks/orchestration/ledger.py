"""The frame ledger: one database recording what happened to every raw frame.

It is the memory the DAGs share with each other and with operators: the landing trigger
records arrivals, the real-time DAG claims frames by content hash (so a duplicate arrival is
recognised and not processed twice) and times every stage, ingest records product keys, the
deadline checks record misses, the nightly DAG finds the night's calibration frames here and
the reprocessing DAG finds the frames a new CRDS context affects. The operations UI reads the
same tables (schema: docs/airflow.md, "Frame ledger"; ``SCHEMA_VERSION`` below).

Two backends, chosen by where the ledger is (``IRIS_LEDGER_URL``, see config.py):

* a filesystem path, or ``sqlite:///relative/path`` / ``sqlite:////absolute/path`` (SQLAlchemy's
  spelling): a SQLite file in WAL mode with a busy timeout, so parallel task processes on one
  host write safely. The embedded default, ``<IRIS_STATE_DIR>/ledger.sqlite``.
* ``postgresql://user[:password]@host:5432/dbname`` (also ``postgres://`` and
  ``postgresql+<driver>://`` as Airflow/SQLAlchemy write it), optionally ``?schema=name`` for
  the tables to live in their own schema (created on first use); any other query parameter
  goes to libpq (``sslmode``, ``connect_timeout``, ``options``...). For task processes on
  several hosts (Kubernetes), where a SQLite file cannot be shared. Needs psycopg2.

Each call opens its own short connection and transaction, so a ledger object can be shared
freely (and survives a fork). The SQL is written once, in SQLite's spelling; the PostgreSQL
side of :class:`LedgerConnection` rewrites the few places where the two differ. Times are ISO
8601 UTC strings with millisecond precision (``2026-11-24T07:15:02.120+00:00``) on both, so
both return the same rows: dicts with the same keys, ints as int, reals as float.
"""

from __future__ import annotations

import contextlib
import datetime as dt
import functools
import json
import logging
import os
import re
import sqlite3
import urllib.parse
import zlib
from collections.abc import Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

log = logging.getLogger(__name__)

SCHEMA_VERSION = 1

# Frame status values, in the order a frame normally goes through them. A frame is open
# while CLAIMED or PROCESSING; every other status is terminal and comes with a reason in
# `error` (but DONE). SUPERSEDED: a later frame with the same file name and other bytes (a
# corrected re-send) was processed after this one.
CLAIMED, PROCESSING, DONE = "claimed", "processing", "done"
QUARANTINED, FAILED, SUPERSEDED = "quarantined", "failed", "superseded"
STATUSES = (CLAIMED, PROCESSING, DONE, QUARANTINED, FAILED, SUPERSEDED)
OPEN_STATUSES = (CLAIMED, PROCESSING)
TERMINAL_STATUSES = (DONE, QUARANTINED, FAILED, SUPERSEDED)

_SCHEMA = """
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
_TABLES = frozenset({"meta", "arrivals", "frames", "stages", "products", "alerts", "calibrations",
                     "landing_ignored"})
# The table added last: where it is missing (a ledger made by older code) the DDL, all
# CREATE ... IF NOT EXISTS, runs again and adds what is new.
_NEWEST_TABLE = "landing_ignored"
_VERSION_SQL = "SELECT value FROM meta WHERE key = 'schema_version'"


# -- where the ledger is ----------------------------------------------------------------------
class LedgerConnectionError(ConnectionError):
    """The ledger database cannot be reached; the message names it (password masked) and the
    cause."""


_URL = re.compile(r"^[A-Za-z][A-Za-z0-9+.-]*://")
# Unquoted PostgreSQL identifiers only: the name goes into libpq's `options` and into DDL, and
# a lower-case plain name means the same thing in both without any quoting.
_SCHEMA_NAME = re.compile(r"^[a-z_][a-z0-9_]{0,62}$")


@dataclass(frozen=True)
class LedgerLocation:
    """A parsed ledger address: a SQLite file, or a PostgreSQL database (+ schema)."""

    backend: str  # "sqlite" or "postgresql"
    display: str  # for messages and the UI: the path, or the URL with the password masked
    path: Path | None = None
    dsn: str | None = None  # libpq URI without our `schema`/`options` parameters
    schema: str | None = None
    options: str = ""  # libpq `options` from the URL (server settings such as -c ...)
    params: tuple[str, ...] = ()  # libpq parameter names the URL sets itself

    @property
    def is_postgres(self) -> bool:
        return self.backend == "postgresql"


def redact_url(url: str) -> str:
    """``url`` with its password (user info or ``password=`` parameter) replaced by ``***``."""
    try:
        parts = urllib.parse.urlsplit(url)
    except ValueError:
        return "<unparsable URL>"
    netloc = parts.netloc
    if parts.password is not None:
        userinfo, _, hostport = netloc.rpartition("@")
        netloc = f"{userinfo.split(':', 1)[0]}:***@{hostport}"
    query = parts.query
    if "password=" in query:
        pairs = urllib.parse.parse_qsl(query, keep_blank_values=True)
        query = urllib.parse.urlencode(
            [(k, "***" if k == "password" else v) for k, v in pairs], safe="*/:%")
    return urllib.parse.urlunsplit(parts._replace(netloc=netloc, query=query))


def parse_location(target: str | os.PathLike[str] | LedgerLocation) -> LedgerLocation:
    """Where a ledger is, from a path or a URL (see the module docstring for the forms)."""
    if isinstance(target, LedgerLocation):
        return target
    text = os.fspath(target)
    if not _URL.match(text):
        return LedgerLocation("sqlite", display=text, path=Path(text))
    scheme, rest = text.split("://", 1)
    base = scheme.lower().split("+", 1)[0]
    if base == "sqlite":
        path = rest.split("?", 1)[0]
        if not path.startswith("/") or path == "/":
            raise ValueError(f"no file in ledger URL {text!r}: use sqlite:///relative or sqlite:////absolute")
        return LedgerLocation("sqlite", display=path[1:], path=Path(path[1:]))
    if base not in ("postgresql", "postgres"):
        raise ValueError(f"unsupported ledger URL {redact_url(text)}: give a path, sqlite:///... "
                         "or postgresql://...")
    # libpq knows neither the SQLAlchemy driver suffix nor our `schema` parameter.
    parts = urllib.parse.urlsplit("postgresql://" + rest)
    query = urllib.parse.parse_qsl(parts.query, keep_blank_values=True)
    schema = next((v for k, v in reversed(query) if k == "schema"), None) or None
    if schema is not None and not _SCHEMA_NAME.match(schema):
        raise ValueError(f"ledger schema {schema!r} must be a lower-case identifier ([a-z_][a-z0-9_]*)")
    options = " ".join(v for k, v in query if k == "options")
    if schema is None:
        # The libpq way of choosing a schema (options=-csearch_path%3Dname) means the same.
        m = re.search(r"-c\s*search_path=([a-z_][a-z0-9_]{0,62})(?:\s|$)", options)
        schema = m.group(1) if m else None
    kept = [(k, v) for k, v in query if k not in ("schema", "options")]
    dsn = urllib.parse.urlunsplit(parts._replace(query=urllib.parse.urlencode(kept)))
    return LedgerLocation("postgresql", display=redact_url(text), dsn=dsn, schema=schema,
                          options=options, params=tuple(k for k, _ in kept))


def connect_postgres(loc: LedgerLocation, *, readonly: bool = False) -> Any:
    """A psycopg2 connection to the ledger database at ``loc`` (search_path set to its schema).

    ``readonly`` (the operations UI): every transaction is READ ONLY and REPEATABLE READ, so a
    page is one consistent snapshot and can never write. Otherwise READ COMMITTED, whatever the
    server default: the claim logic below relies on each statement seeing rows that other
    transactions committed meanwhile (under REPEATABLE READ an ``ON CONFLICT DO NOTHING``
    against a row committed after the snapshot is a serialization error instead).
    Raises :class:`LedgerConnectionError` when the server cannot be reached.
    """
    try:
        import psycopg2
    except ImportError as exc:
        raise LedgerConnectionError(
            f"the frame ledger at {loc.display} needs psycopg2 (pip install psycopg2-binary)") from exc
    options = [loc.options] if loc.options else []
    if loc.schema:
        options.append(f"-c search_path={loc.schema}")
    kwargs: dict[str, Any] = {}
    if options:
        kwargs["options"] = " ".join(options)
    # An unreachable host must fail a task in seconds, not after the kernel's TCP timeout.
    if "connect_timeout" not in loc.params:
        kwargs["connect_timeout"] = 10
    if "application_name" not in loc.params:
        kwargs["application_name"] = "iris-drs-ledger"
    try:
        conn = psycopg2.connect(loc.dsn, **kwargs)
    except psycopg2.Error as exc:
        cause = " ".join(str(exc).split()) or type(exc).__name__
        raise LedgerConnectionError(f"cannot connect to the frame ledger at {loc.display}: {cause}") from exc
    if readonly:
        conn.set_session(isolation_level="REPEATABLE READ", readonly=True)
    else:
        conn.set_session(isolation_level="READ COMMITTED", readonly=False)
    return conn


# -- the dialect layer ------------------------------------------------------------------------
@functools.lru_cache(maxsize=512)
def _pg_sql(sql: str) -> str:
    """SQLite spelling -> psycopg2: ``IS ?`` (NULL-safe equality) becomes ``IS NOT DISTINCT
    FROM``, ``?`` becomes ``%s`` (a literal ``%`` is doubled first). The ledger's SQL has no
    ``?`` or ``%`` inside string literals, which is what makes this textual rewrite safe."""
    sql = sql.replace("%", "%%")
    sql = re.sub(r"\bIS\s+\?", "IS NOT DISTINCT FROM ?", sql)
    return sql.replace("?", "%s")


def _pg_ddl(sql: str) -> str:
    """The SQLite schema in PostgreSQL types.

    SQLite's INTEGER is 64-bit and its REAL a double: BIGINT / DOUBLE PRECISION keep values
    (file sizes above 2 GiB, mtimes to the microsecond) identical. Text compares byte-wise in
    SQLite; COLLATE "C" makes ORDER BY and range tests on the ISO times, nights and ids give
    the same answers whatever the database's locale.
    """
    sql = sql.replace("INTEGER PRIMARY KEY AUTOINCREMENT",
                      "BIGINT GENERATED BY DEFAULT AS IDENTITY PRIMARY KEY")
    sql = re.sub(r"\bINTEGER\b", "BIGINT", sql)
    sql = re.sub(r"\bREAL\b", "DOUBLE PRECISION", sql)
    return re.sub(r"\bTEXT\b", 'TEXT COLLATE "C"', sql)


class LedgerConnection:
    """One open transaction on either backend.

    ``execute`` takes SQL in SQLite's spelling (``?`` placeholders, ``IS ?``) and returns a
    cursor whose rows index by position and by column name and convert with ``dict(row)``.
    """

    def __init__(self, raw: Any, *, postgres: bool):
        self.raw = raw
        self.postgres = postgres
        if postgres:
            import psycopg2.extras

            self._cursor_factory = psycopg2.extras.DictCursor

    @property
    def for_update(self) -> str:
        """Suffix locking the selected rows until commit (SQLite: the write lock already does)."""
        return " FOR UPDATE" if self.postgres else ""

    def execute(self, sql: str, params: Sequence[Any] = ()) -> Any:
        if not self.postgres:
            return self.raw.execute(sql, params)
        cur = self.raw.cursor(cursor_factory=self._cursor_factory)
        # psycopg2 would send a bool as boolean, which PostgreSQL refuses for a BIGINT column;
        # SQLite stores it as 0/1, so do the same.
        cur.execute(_pg_sql(sql), [int(p) if isinstance(p, bool) else p for p in params])
        return cur

    def insert(self, sql: str, params: Sequence[Any] = ()) -> int:
        """Run an INSERT into a table with an ``id`` column and return the new row's id."""
        if not self.postgres:
            return int(self.raw.execute(sql, params).lastrowid)
        return int(self.execute(sql + " RETURNING id", params).fetchone()[0])

    def lock(self, table: str) -> None:
        """Serialize this transaction against every other writer of ``table`` (readers go on).

        SQLite needs nothing: BEGIN IMMEDIATE already holds the database's only write lock.
        PostgreSQL: SHARE ROW EXCLUSIVE conflicts with itself and with the ROW EXCLUSIVE lock
        that INSERT/UPDATE take, but not with plain SELECTs.
        """
        if table not in _TABLES:
            raise ValueError(f"not a ledger table: {table!r}")
        if self.postgres:
            self.raw.cursor().execute(f"LOCK TABLE {table} IN SHARE ROW EXCLUSIVE MODE")


def utcnow() -> dt.datetime:
    return dt.datetime.now(dt.UTC)


def isotime(when: dt.datetime | None = None) -> str:
    """ISO 8601 UTC with milliseconds, the only time format stored in the ledger."""
    when = when or utcnow()
    if when.tzinfo is None:
        when = when.replace(tzinfo=dt.UTC)
    return when.astimezone(dt.UTC).isoformat(timespec="milliseconds")


def parse_time(text: str) -> dt.datetime:
    when = dt.datetime.fromisoformat(text)
    return when if when.tzinfo else when.replace(tzinfo=dt.UTC)


def frame_id_for(sha256: str) -> str:
    """Frame id: the first 16 hex digits of the raw file's SHA-256 (content identity)."""
    return sha256[:16]


class FrameLedger:
    """Access to the ledger at ``target``: a SQLite file path or a database URL (see the module
    docstring). Tables are created on first use.

    ``path`` is the SQLite file (a :class:`~pathlib.Path`), or for PostgreSQL the URL with the
    password masked (a str): what messages and snapshots show.
    """

    def __init__(self, target: str | os.PathLike[str] | LedgerLocation):
        self.location = parse_location(target)
        self.path: Path | str = self.location.path or self.location.display
        self._ready = False

    def __repr__(self) -> str:
        return f"FrameLedger({str(self.path)!r})"

    @property
    def backend(self) -> str:
        """``sqlite`` or ``postgresql``."""
        return self.location.backend

    # -- plumbing ---------------------------------------------------------------------------
    @contextlib.contextmanager
    def connect(self, *, write: bool = False) -> Iterator[LedgerConnection]:
        """A connection in a transaction, committed when the block ends (rolled back on an
        exception). SQLite: ``write=True`` takes the write lock up front (BEGIN IMMEDIATE) so
        read-then-write sequences such as a claim are atomic. PostgreSQL: each method takes the
        row or table locks its sequence needs (see ``claim``, ``take_arrival``, ``add_product``)."""
        if self.location.is_postgres:
            with self._connect_postgres() as conn:
                yield conn
            return
        if not self._ready:
            self._init_sqlite()
        raw = sqlite3.connect(self.location.path, timeout=60.0, isolation_level=None)
        raw.row_factory = sqlite3.Row
        try:
            raw.execute("PRAGMA busy_timeout = 60000")
            raw.execute("BEGIN IMMEDIATE" if write else "BEGIN")
            try:
                yield LedgerConnection(raw, postgres=False)
            except BaseException:
                raw.execute("ROLLBACK")
                raise
            raw.execute("COMMIT")
        finally:
            raw.close()

    @contextlib.contextmanager
    def _connect_postgres(self) -> Iterator[LedgerConnection]:
        import psycopg2

        raw = connect_postgres(self.location)
        try:
            conn = LedgerConnection(raw, postgres=True)
            if not self._ready:
                self._init_postgres(conn)
            try:
                yield conn
            except BaseException:
                with contextlib.suppress(psycopg2.Error):
                    raw.rollback()
                raise
            raw.commit()
        finally:
            raw.close()

    def _init_sqlite(self) -> None:
        self.location.path.parent.mkdir(parents=True, exist_ok=True)
        conn = sqlite3.connect(self.location.path, timeout=60.0)
        try:
            conn.execute("PRAGMA busy_timeout = 60000")
            # WAL: readers (the ops UI) never block the task processes that write.
            conn.execute("PRAGMA journal_mode = WAL")
            conn.executescript(_SCHEMA)
            conn.execute(
                "INSERT OR IGNORE INTO meta (key, value) VALUES ('schema_version', ?)",
                (str(SCHEMA_VERSION),),
            )
            conn.commit()
            self._check_version(conn.execute(_VERSION_SQL).fetchone())
        finally:
            conn.close()
        self._ready = True

    def _init_postgres(self, conn: LedgerConnection) -> None:
        """Create schema and tables unless ``meta`` exists (one query on the common path), then
        commit, leaving ``conn`` ready for the caller's transaction."""
        cur = conn.raw.cursor()
        cur.execute(f"SELECT to_regclass('{_NEWEST_TABLE}')")
        if cur.fetchone()[0] is None:
            # Concurrent CREATE TABLE IF NOT EXISTS of the same table can still collide in the
            # catalog (unique violation on pg_type): first users serialize on an advisory lock
            # for this schema. The DDL is one transaction, so where `meta` exists every table
            # does.
            key = zlib.crc32(f"iris_tasks.ledger:{self.location.schema or ''}".encode())
            cur.execute("SELECT pg_advisory_xact_lock(%s)", (key,))
            if self.location.schema:
                cur.execute("SELECT 1 FROM pg_namespace WHERE nspname = %s", (self.location.schema,))
                if cur.fetchone() is None:
                    cur.execute(f"CREATE SCHEMA IF NOT EXISTS {self.location.schema}")
            cur.execute(_pg_ddl(_SCHEMA))
            cur.execute("INSERT INTO meta (key, value) VALUES ('schema_version', %s) "
                        "ON CONFLICT (key) DO NOTHING", (str(SCHEMA_VERSION),))
            log.info("created the frame ledger tables (those missing) in %s",
                     self.location.display)
        cur.execute(_VERSION_SQL)
        self._check_version(cur.fetchone())
        conn.raw.commit()
        self._ready = True

    def _check_version(self, row: Sequence[Any] | None) -> None:
        found = row[0] if row else None
        if found != str(SCHEMA_VERSION):
            log.warning("frame ledger %s has schema version %s, this code writes %s",
                        self.path, found, SCHEMA_VERSION)

    @staticmethod
    def _row(row: Any) -> dict[str, Any] | None:
        return dict(row) if row is not None else None

    # -- arrivals ---------------------------------------------------------------------------
    def record_arrival(
        self, source_uri: str, size: int, mtime: float, *, etag: str | None = None,
        seen_by: str = "scan", seen_at: str | None = None,
    ) -> dict[str, Any]:
        """Record that ``source_uri`` (with this size/mtime) is in the landing area; return the
        arrival row (the existing one if this exact version was seen before)."""
        with self.connect(write=True) as conn:
            # PostgreSQL: a concurrent insert of the same key makes this one wait for it to
            # commit and then do nothing, so the SELECT below finds exactly one row either way.
            conn.execute(
                "INSERT INTO arrivals (source_uri, size, mtime, etag, seen_at, seen_by) "
                "VALUES (?, ?, ?, ?, ?, ?) ON CONFLICT (source_uri, size, mtime) DO NOTHING",
                (source_uri, int(size), float(mtime), etag, seen_at or isotime(), seen_by),
            )
            row = conn.execute(
                "SELECT * FROM arrivals WHERE source_uri = ? AND size = ? AND mtime = ?",
                (source_uri, int(size), float(mtime)),
            ).fetchone()
        return dict(row)

    def arrival_keys(self) -> set[tuple[str, int, float]]:
        """(uri, size, mtime) of every arrival ever recorded (the trigger's memory)."""
        with self.connect() as conn:
            rows = conn.execute("SELECT source_uri, size, mtime FROM arrivals").fetchall()
        return {(r[0], int(r[1]), float(r[2])) for r in rows}

    def take_arrival(self, arrival_id: int, claimer: str) -> bool:
        """Reserve an arrival for one claimer (a task run); False if another claimer has it or
        it was already dealt with. The same claimer may take it again (a task retry)."""
        with self.connect(write=True) as conn:
            # One conditional UPDATE is the whole claim. PostgreSQL (READ COMMITTED) makes a
            # second UPDATE of the row wait for the first to commit and then re-test the WHERE
            # clause on the new version, where claimed_by is the winner: no extra lock needed.
            cur = conn.execute(
                "UPDATE arrivals SET claimed_by = ?, claimed_at = ? WHERE id = ? AND outcome IS NULL "
                "AND (claimed_by IS NULL OR claimed_by = ?)",
                (claimer, isotime(), arrival_id, claimer),
            )
            return cur.rowcount == 1

    def release_arrival(self, arrival_id: int) -> None:
        """Give an arrival back (its claim failed half-way): any later run may take it."""
        with self.connect(write=True) as conn:
            conn.execute("UPDATE arrivals SET claimed_by = NULL, claimed_at = NULL "
                         "WHERE id = ? AND outcome IS NULL", (arrival_id,))

    def close_arrival(self, arrival_id: int, *, frame_id: str | None, outcome: str) -> None:
        """Record what became of an arrival: new, retry, duplicate or vanished."""
        with self.connect(write=True) as conn:
            conn.execute(
                "UPDATE arrivals SET claimed_at = ?, frame_id = ?, outcome = ? WHERE id = ?",
                (isotime(), frame_id, outcome, arrival_id),
            )

    def arrivals(self, *, open_only: bool = False) -> list[dict[str, Any]]:
        sql = "SELECT * FROM arrivals" + (" WHERE outcome IS NULL" if open_only else "")
        with self.connect() as conn:
            return [dict(r) for r in conn.execute(sql + " ORDER BY id").fetchall()]

    # -- what the landing area holds but the DRS does not take ----------------------------
    def note_ignored(self, entries: Iterable[tuple[str, str, int, str]], *, scope: str) -> None:
        """Record the ignored entries ``(uri, name, size, reason)`` seen now under ``scope``
        (the landing area's URI prefix); those of the scope no longer seen are marked gone."""
        now = isotime()
        seen = []
        with self.connect(write=True) as conn:
            for uri, name, size, reason in entries:
                seen.append(uri)
                conn.execute(
                    "INSERT INTO landing_ignored (source_uri, name, size, reason, first_seen, "
                    "last_seen) VALUES (?, ?, ?, ?, ?, ?) ON CONFLICT (source_uri) DO UPDATE SET "
                    "name = excluded.name, size = excluded.size, reason = excluded.reason, "
                    "last_seen = excluded.last_seen, gone_at = NULL",
                    (uri, name, int(size), reason, now, now),
                )
            rows = conn.execute(
                "SELECT source_uri FROM landing_ignored WHERE gone_at IS NULL AND "
                "substr(source_uri, 1, ?) = ?", (len(scope), scope)).fetchall()
            for (uri,) in rows:
                if uri not in seen:
                    conn.execute("UPDATE landing_ignored SET gone_at = ? WHERE source_uri = ?",
                                 (now, uri))

    def ignored(self, *, current_only: bool = True) -> list[dict[str, Any]]:
        """Entries of the landing area that the DRS does not take (still there, by default)."""
        sql = "SELECT * FROM landing_ignored" + (" WHERE gone_at IS NULL" if current_only else "")
        with self.connect() as conn:
            return [dict(r) for r in conn.execute(sql + " ORDER BY first_seen, name").fetchall()]

    # -- frames -----------------------------------------------------------------------------
    def claim(
        self, *, sha256: str, filename: str, source_uri: str, landed_at: str,
        dag_id: str | None = None, run_id: str | None = None,
    ) -> tuple[dict[str, Any], str]:
        """Claim a frame by content; return (frame row, outcome).

        outcome ``new``: first time these bytes are seen, the caller processes the frame.
        ``retry``: seen before but the earlier attempt failed, the caller processes it again.
        ``duplicate``: already claimed, processed or quarantined; the caller does nothing.
        """
        fid = frame_id_for(sha256)
        now = isotime()
        select = "SELECT * FROM frames WHERE sha256 = ?"
        with self.connect(write=True) as conn:
            # SQLite: BEGIN IMMEDIATE makes this whole block exclusive. PostgreSQL: the row
            # lock (FOR UPDATE) serializes claims of known bytes, so only one claimer turns a
            # failed frame into a retry; for new bytes the unique sha256 decides: a concurrent
            # INSERT waits for the first one to commit and then inserts nothing, and that
            # claimer goes on with the (now visible) row as a duplicate. Row locks rather than
            # a table lock: claims of different frames never wait for each other.
            row = conn.execute(select + conn.for_update, (sha256,)).fetchone()
            inserted = False
            if row is None:
                inserted = conn.execute(
                    "INSERT INTO frames (frame_id, sha256, filename, source_uri, landed_at, "
                    "claimed_at, status, dag_id, run_id, updated_at) "
                    # No conflict target: a racing insert of the same bytes may trip the
                    # frame_id primary key (derived from the sha256) before the sha256 index,
                    # and either way it is the same frame.
                    "VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?) ON CONFLICT DO NOTHING",
                    (fid, sha256, filename, source_uri, landed_at, now, CLAIMED, dag_id, run_id, now),
                ).rowcount == 1
                if not inserted:  # lost the race for new bytes (PostgreSQL only)
                    row = conn.execute(select + conn.for_update, (sha256,)).fetchone()
                    if row is None:
                        raise ValueError(
                            f"{filename}: frame id {fid} is already taken by other bytes "
                            f"(a 64-bit prefix collision of sha256 {sha256})")
            if inserted:
                outcome = "new"
            elif row["status"] == FAILED:
                # A failed frame arriving again gets a fresh attempt and a fresh deadline.
                conn.execute(
                    "UPDATE frames SET status = ?, claimed_at = ?, landed_at = ?, dag_id = ?, "
                    "run_id = ?, error = NULL, finished_at = NULL, latency_seconds = NULL, "
                    "deadline_missed = 0, updated_at = ? WHERE frame_id = ?",
                    (CLAIMED, now, landed_at, dag_id, run_id, now, row["frame_id"]),
                )
                outcome = "retry"
            else:
                conn.execute(
                    "UPDATE frames SET duplicates = duplicates + 1, updated_at = ? WHERE frame_id = ?",
                    (now, row["frame_id"]),
                )
                outcome = "duplicate"
            frame = conn.execute(select, (sha256,)).fetchone()
        return dict(frame), outcome

    def update_frame(self, frame_id: str, **fields: Any) -> None:
        """Set columns of one frame (unknown column names raise)."""
        if not fields:
            return
        fields["updated_at"] = isotime()
        cols = ", ".join(f"{_column(k)} = ?" for k in fields)
        with self.connect(write=True) as conn:
            cur = conn.execute(f"UPDATE frames SET {cols} WHERE frame_id = ?", (*fields.values(), frame_id))
            if cur.rowcount != 1:
                raise KeyError(f"no frame {frame_id!r} in {self.path}")

    def frame(self, frame_id: str) -> dict[str, Any] | None:
        with self.connect() as conn:
            row = conn.execute("SELECT * FROM frames WHERE frame_id = ?", (frame_id,)).fetchone()
        return self._row(row)

    def frame_by_sha(self, sha256: str) -> dict[str, Any] | None:
        with self.connect() as conn:
            row = conn.execute("SELECT * FROM frames WHERE sha256 = ?", (sha256,)).fetchone()
        return self._row(row)

    def frames(
        self, *, night: str | None = None, nights: tuple[str, str] | None = None,
        status: str | Iterable[str] | None = None, kind: str | Iterable[str] | None = None,
        run_id: str | None = None,
    ) -> list[dict[str, Any]]:
        """Frames matching every given filter, oldest landing first."""
        where, args = [], []
        if night is not None:
            where.append("night = ?")
            args.append(night)
        if nights is not None:
            where.append("night BETWEEN ? AND ?")
            args.extend(nights)
        for col, value in (("status", status), ("kind", kind)):
            if value is None:
                continue
            values = [value] if isinstance(value, str) else list(value)
            where.append(f"{col} IN ({', '.join('?' * len(values))})")
            args.extend(values)
        if run_id is not None:
            where.append("run_id = ?")
            args.append(run_id)
        sql = "SELECT * FROM frames" + (" WHERE " + " AND ".join(where) if where else "")
        with self.connect() as conn:
            rows = conn.execute(sql + " ORDER BY landed_at, frame_id", args).fetchall()
        return [dict(r) for r in rows]

    # -- stages -----------------------------------------------------------------------------
    def start_stage(
        self, frame_id: str, stage: str, *, dag_id: str | None = None, run_id: str | None = None,
        try_number: int | None = None,
    ) -> int:
        with self.connect(write=True) as conn:
            return conn.insert(
                "INSERT INTO stages (frame_id, stage, status, started_at, dag_id, run_id, try_number) "
                "VALUES (?, ?, 'running', ?, ?, ?, ?)",
                (frame_id, stage, isotime(), dag_id, run_id, try_number),
            )

    def end_stage(self, stage_id: int, status: str, detail: Mapping[str, Any] | None = None) -> None:
        now = utcnow()
        with self.connect(write=True) as conn:
            row = conn.execute("SELECT started_at FROM stages WHERE id = ?", (stage_id,)).fetchone()
            duration = (now - parse_time(row[0])).total_seconds() if row else None
            conn.execute(
                "UPDATE stages SET status = ?, ended_at = ?, duration_seconds = ?, detail = ? WHERE id = ?",
                (status, isotime(now), duration, json.dumps(detail, default=str) if detail else None,
                 stage_id),
            )

    @contextlib.contextmanager
    def stage(
        self, frame_id: str, stage: str, **where: Any
    ) -> Iterator[dict[str, Any]]:
        """Time one stage: yields a dict the caller may fill with details for the record.
        An exception marks the stage failed (and propagates)."""
        stage_id = self.start_stage(frame_id, stage, **where)
        detail: dict[str, Any] = {}
        try:
            yield detail
        except BaseException as exc:
            detail.setdefault("error", f"{type(exc).__name__}: {exc}")
            status = "skipped" if type(exc).__name__ == "AirflowSkipException" else "failed"
            self.end_stage(stage_id, status, detail)
            raise
        self.end_stage(stage_id, "success", detail)

    def stages(self, frame_id: str) -> list[dict[str, Any]]:
        with self.connect() as conn:
            rows = conn.execute("SELECT * FROM stages WHERE frame_id = ? ORDER BY id", (frame_id,)).fetchall()
        return [dict(r) for r in rows]

    # -- products ---------------------------------------------------------------------------
    def add_product(
        self, frame_id: str, kind: str, *, path: str | None = None, key: str | None = None,
        url: str | None = None, sha256: str | None = None, size: int | None = None,
        crds_context: str | None = None, run_id: str | None = None,
    ) -> int:
        """Record a product; returns its version (1 + the previous version of this kind for
        this frame). A new version of a kind becomes ``current`` and the older ones stop being;
        re-recording the same key with the same checksum is a no-op (idempotent retries)."""
        with self.connect(write=True) as conn:
            # Read-then-write with a computed version and no unique key to hang an ON CONFLICT
            # on, and the first version of a kind has no row to lock: PostgreSQL serializes the
            # product writers on the table (a few short writes per frame; readers go on).
            conn.lock("products")
            same = conn.execute(
                "SELECT version FROM products WHERE frame_id = ? AND kind = ? AND key IS ? "
                "AND sha256 IS ? AND path IS ?",
                (frame_id, kind, key, sha256, path),
            ).fetchone()
            if same is not None:
                return int(same[0])
            prev = conn.execute(
                "SELECT MAX(version) FROM products WHERE frame_id = ? AND kind = ?", (frame_id, kind)
            ).fetchone()[0]
            version = int(prev or 0) + 1
            conn.execute("UPDATE products SET current = 0 WHERE frame_id = ? AND kind = ?", (frame_id, kind))
            conn.execute(
                "INSERT INTO products (frame_id, kind, path, key, url, sha256, size, crds_context, "
                "version, current, created_at, run_id) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, 1, ?, ?)",
                (frame_id, kind, path, key, url, sha256, size, crds_context, version, isotime(), run_id),
            )
        return version

    def products(self, frame_id: str, *, current_only: bool = False) -> list[dict[str, Any]]:
        sql = "SELECT * FROM products WHERE frame_id = ?" + (" AND current = 1" if current_only else "")
        with self.connect() as conn:
            rows = conn.execute(sql + " ORDER BY id", (frame_id,)).fetchall()
        return [dict(r) for r in rows]

    # -- deadlines and alerts ---------------------------------------------------------------
    def finish(self, frame_id: str, *, status: str = DONE, when: dt.datetime | None = None) -> dict[str, Any]:
        """Close a frame: status, finished_at, latency since landing and whether the deadline
        was missed. Returns the updated frame row."""
        when = when or utcnow()
        with self.connect(write=True) as conn:
            # FOR UPDATE: a deadline flag set meanwhile (record_alert) must not be overwritten.
            row = conn.execute("SELECT * FROM frames WHERE frame_id = ?" + conn.for_update,
                               (frame_id,)).fetchone()
            if row is None:
                raise KeyError(f"no frame {frame_id!r} in {self.path}")
            latency = (when - parse_time(row["landed_at"])).total_seconds()
            missed = bool(row["deadline_missed"]) or (
                row["deadline_at"] is not None and when > parse_time(row["deadline_at"])
            )
            conn.execute(
                "UPDATE frames SET status = ?, finished_at = ?, latency_seconds = ?, "
                "deadline_missed = ?, updated_at = ? WHERE frame_id = ?",
                (status, isotime(when), latency, int(missed), isotime(), frame_id),
            )
            out = conn.execute("SELECT * FROM frames WHERE frame_id = ?", (frame_id,)).fetchone()
        return dict(out)

    def close_open_frames(self, *, run_id: str, reason: str) -> list[dict[str, Any]]:
        """Fail every frame of ``run_id`` still open (claimed/processing): called when all of
        the run's tasks have ended, so nothing will close them any more. Returns them."""
        with self.connect(write=True) as conn:
            rows = conn.execute(
                "SELECT * FROM frames WHERE run_id = ? AND status IN (?, ?)" + conn.for_update,
                (run_id, *OPEN_STATUSES)).fetchall()
            now = isotime()
            for row in rows:
                conn.execute(
                    "UPDATE frames SET status = ?, finished_at = ?, error = ?, updated_at = ? "
                    "WHERE frame_id = ?", (FAILED, now, reason[:2000], now, row["frame_id"]))
        return [dict(r) for r in rows]

    def supersede(self, frame_id: str) -> list[dict[str, Any]]:
        """Mark the earlier frames with this frame's file name and other bytes as superseded
        by it (a corrected re-send); returns them."""
        me = self.frame(frame_id)
        if me is None:
            raise KeyError(f"no frame {frame_id!r} in {self.path}")
        with self.connect(write=True) as conn:
            rows = conn.execute(
                "SELECT * FROM frames WHERE filename = ? AND frame_id <> ? AND landed_at <= ? "
                "AND status IN (?, ?, ?)",
                (me["filename"], frame_id, me["landed_at"], DONE, FAILED, QUARANTINED)).fetchall()
            now = isotime()
            for row in rows:
                conn.execute(
                    "UPDATE frames SET status = ?, error = ?, updated_at = ? WHERE frame_id = ?",
                    (SUPERSEDED, f"superseded by frame {frame_id} (same file name, new content; "
                     f"was {row['status']})", now, row["frame_id"]))
        return [dict(r) for r in rows]

    def overdue(self, *, run_id: str | None = None, now: dt.datetime | None = None) -> list[dict[str, Any]]:
        """Unfinished frames past their deadline and not yet flagged."""
        now_s = isotime(now)
        sql = ("SELECT * FROM frames WHERE finished_at IS NULL AND deadline_missed = 0 "
               "AND deadline_at IS NOT NULL AND deadline_at < ? AND status IN (?, ?)")
        args: list[Any] = [now_s, CLAIMED, PROCESSING]
        if run_id is not None:
            sql += " AND run_id = ?"
            args.append(run_id)
        with self.connect() as conn:
            rows = conn.execute(sql, args).fetchall()
        return [dict(r) for r in rows]

    def record_alert(
        self, kind: str, message: str, *, frame_id: str | None = None, dag_id: str | None = None,
        run_id: str | None = None, detail: Mapping[str, Any] | None = None,
    ) -> int:
        with self.connect(write=True) as conn:
            if kind == "deadline_missed" and frame_id is not None:
                conn.execute(
                    "UPDATE frames SET deadline_missed = 1, updated_at = ? WHERE frame_id = ?",
                    (isotime(), frame_id),
                )
            return conn.insert(
                "INSERT INTO alerts (kind, frame_id, dag_id, run_id, created_at, message, detail) "
                "VALUES (?, ?, ?, ?, ?, ?, ?)",
                (kind, frame_id, dag_id, run_id, isotime(), message,
                 json.dumps(detail, default=str) if detail else None),
            )

    def mark_alert_delivered(self, alert_id: int, how: str) -> None:
        with self.connect(write=True) as conn:
            conn.execute("UPDATE alerts SET delivered = ? WHERE id = ?", (how, alert_id))

    def alerts(self, *, frame_id: str | None = None, kind: str | None = None) -> list[dict[str, Any]]:
        where, args = [], []
        if frame_id is not None:
            where.append("frame_id = ?")
            args.append(frame_id)
        if kind is not None:
            where.append("kind = ?")
            args.append(kind)
        sql = "SELECT * FROM alerts" + (" WHERE " + " AND ".join(where) if where else "")
        with self.connect() as conn:
            return [dict(r) for r in conn.execute(sql + " ORDER BY id", args).fetchall()]

    # -- nightly calibrations ----------------------------------------------------------------
    def record_calibration(
        self, night: str, *, status: str, context: str | None = None,
        previous_context: str | None = None, masters: Any = None, qa: Any = None,
        dag_id: str | None = None, run_id: str | None = None,
    ) -> int:
        with self.connect(write=True) as conn:
            return conn.insert(
                "INSERT INTO calibrations (night, context, previous_context, status, created_at, "
                "dag_id, run_id, masters, qa) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?)",
                (night, context, previous_context, status, isotime(), dag_id, run_id,
                 json.dumps(masters, default=str) if masters is not None else None,
                 json.dumps(qa, default=str) if qa is not None else None),
            )

    def calibrations(self, night: str | None = None) -> list[dict[str, Any]]:
        sql = "SELECT * FROM calibrations" + (" WHERE night = ?" if night else "")
        with self.connect() as conn:
            return [dict(r) for r in conn.execute(sql + " ORDER BY id", (night,) if night else ()).fetchall()]

    # -- export -----------------------------------------------------------------------------
    def snapshot(self, frame_id: str | None = None) -> dict[str, Any]:
        """Everything about one frame (or all frames) as JSON-ready dicts, for the CLI/UI."""
        frames = [self.frame(frame_id)] if frame_id else self.frames()
        out = []
        for fr in frames:
            if fr is None:
                continue
            out.append({**fr, "stages": self.stages(fr["frame_id"]),
                        "products": self.products(fr["frame_id"]),
                        "alerts": self.alerts(frame_id=fr["frame_id"])})
        return {"schema_version": SCHEMA_VERSION, "ledger": str(self.path), "frames": out}


_FRAME_COLUMNS = frozenset({
    "filename", "source_uri", "raw_path", "landed_at", "claimed_at", "status", "night",
    "detector", "obstype", "obsname", "kind", "mode", "filter", "readpatt", "deadline_seconds",
    "deadline_at", "finished_at", "latency_seconds", "deadline_missed", "crds_context", "dag_id",
    "run_id", "error", "updated_at",
})


def _column(name: str) -> str:
    if name not in _FRAME_COLUMNS:
        raise ValueError(f"unknown frames column {name!r}")
    return name


def open_ledger(path: str | os.PathLike[str] | None = None) -> FrameLedger:
    """The ledger at ``path`` (a SQLite file or a database URL), default from the environment:
    ``IRIS_LEDGER_URL`` if set, else ``<IRIS_STATE_DIR>/ledger.sqlite``."""
    if path is None:
        from .config import settings

        path = settings().ledger_path
    return FrameLedger(path)
