"""The frame ledger: one database recording what happened to every raw frame.

It is the memory the DAGs share with each other and with operators: the landing trigger
records arrivals, the real-time DAG claims frames by content hash (so a duplicate arrival is
recognised and not processed twice) and times every stage, ingest records product keys, the
deadline checks record misses, the nightly DAG finds the night's calibration frames here and
the reprocessing DAG finds the frames a new CRDS context affects. The operations UI reads the
same tables through :class:`LedgerReader` (schema: docs/airflow.md, "Frame ledger";
``SCHEMA_VERSION`` below). The names stored in it - frame statuses, stage names, stage
statuses, arrival outcomes - are defined here, once: :class:`FrameStatus`, :class:`Stage`,
:class:`StageStatus`, :class:`ArrivalOutcome`.

Two backends, chosen by where the ledger is (``IRIS_LEDGER_URL``, see config.py):

* a filesystem path, or ``sqlite:///relative/path`` / ``sqlite:////absolute/path`` (SQLAlchemy's
  spelling): a SQLite file in WAL mode with a busy timeout, so parallel task processes on one
  host write safely. The embedded default, ``<IRIS_STATE_DIR>/ledger.sqlite``.
* ``postgresql://user[:password]@host:5432/dbname`` (also ``postgres://`` and
  ``postgresql+<driver>://`` as Airflow/SQLAlchemy write it), optionally ``?schema=name`` for
  the tables to live in their own schema (created on first use); any other query parameter
  goes to libpq (``sslmode``, ``connect_timeout``, ``options``...). For task processes on
  several hosts (Kubernetes), where a SQLite file cannot be shared. Needs psycopg2.

The tables are SQLAlchemy Core :class:`~sqlalchemy.Table` objects (one :data:`metadata`), the
statements SQLAlchemy expressions, so one definition serves both dialects; the types carry
their PostgreSQL variants (BIGINT, DOUBLE PRECISION, ``TEXT COLLATE "C"``) so both backends
return the same rows: dicts with the same keys, ints as int, reals as float, times as ISO 8601
UTC strings with millisecond precision (``2026-11-24T07:15:02.120+00:00``).

Each call opens its own short connection and transaction (one engine per location and
process, with :class:`~sqlalchemy.pool.NullPool`: no pooled connection outlives a call, so a
ledger object can be shared freely and survives a fork).
"""

from __future__ import annotations

import contextlib
import datetime as dt
import json
import logging
import os
import re
import sqlite3
import threading
import urllib.parse
import zlib
from collections.abc import Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from enum import StrEnum
from pathlib import Path
from typing import Any

import sqlalchemy as sa
from sqlalchemy.dialects import postgresql
from sqlalchemy.dialects import sqlite as sqlite_dialect
from sqlalchemy.pool import NullPool

log = logging.getLogger(__name__)

SCHEMA_VERSION = 1


# -- the names stored in the ledger -----------------------------------------------------------
class FrameStatus(StrEnum):
    """``frames.status``, in the order a frame normally goes through them.

    A frame is open while CLAIMED or PROCESSING; every other status is terminal and comes with
    a reason in ``error`` (but DONE). SUPERSEDED: a later frame with the same file name and
    other bytes (a corrected re-send) was processed after this one. Members are ``str``: they
    compare equal to (and are stored as) their values.
    """

    CLAIMED = "claimed"
    PROCESSING = "processing"
    DONE = "done"
    QUARANTINED = "quarantined"
    FAILED = "failed"
    SUPERSEDED = "superseded"

    @property
    def is_open(self) -> bool:
        return self in OPEN_STATUSES


class Stage(StrEnum):
    """``stages.stage``: the stages the DAGs time in the ledger (and the operations page
    reads). The reprocessing DAG re-runs some of them under ``reprocess.<stage>``."""

    CLASSIFY = "classify"  # header check and classification (the claim task)
    READOUT = "readout"  # ramp fitting -> rate
    REDUCE = "reduce"  # rate -> calibrated product
    QUICKLOOK = "quicklook"  # PNG preview
    EARLY_UPLOAD = "early_upload"  # the rate product uploaded beside the processing
    ARCHIVE = "archive"  # the raw frame to the store
    INGEST = "ingest"  # the products to the store, the frame closed
    REPROCESS_READOUT = "reprocess.readout"
    REPROCESS_REDUCE = "reprocess.reduce"
    REPROCESS_QUICKLOOK = "reprocess.quicklook"
    REPROCESS_INGEST = "reprocess.ingest"

    def reprocessed(self) -> Stage:
        """The name of this stage when the reprocessing DAG runs it (``reduce`` ->
        ``reprocess.reduce``); ValueError for a stage reprocessing does not run."""
        return self if self.startswith("reprocess.") else Stage(f"reprocess.{self.value}")


class StageStatus(StrEnum):
    """``stages.status``."""

    RUNNING = "running"
    SUCCESS = "success"
    FAILED = "failed"
    SKIPPED = "skipped"  # Airflow skipped the task (AirflowSkipException)
    # Never ended by its own process (its host or task process was killed): closed when a
    # later try of the same task starts a stage of the frame, or when the run ends failed.
    ABANDONED = "abandoned"


class ArrivalOutcome(StrEnum):
    """``arrivals.outcome`` (NULL while not yet claimed); the first three are also what
    :meth:`FrameLedger.claim` returns."""

    NEW = "new"  # first time these bytes are seen: processed
    RETRY = "retry"  # seen before, the earlier attempt failed: processed again
    DUPLICATE = "duplicate"  # already claimed, processed or quarantined: nothing to do
    VANISHED = "vanished"  # gone from the landing area before it could be claimed


# Module constants kept for the callers that import them (they are the enum members).
CLAIMED, PROCESSING, DONE = FrameStatus.CLAIMED, FrameStatus.PROCESSING, FrameStatus.DONE
QUARANTINED, FAILED = FrameStatus.QUARANTINED, FrameStatus.FAILED
SUPERSEDED = FrameStatus.SUPERSEDED
STATUSES = tuple(FrameStatus)
OPEN_STATUSES = (CLAIMED, PROCESSING)
TERMINAL_STATUSES = (DONE, QUARANTINED, FAILED, SUPERSEDED)


# -- the schema -------------------------------------------------------------------------------
# SQLite's INTEGER is 64-bit and its REAL a double: BIGINT / DOUBLE PRECISION keep values (file
# sizes above 2 GiB, mtimes to the microsecond) identical in PostgreSQL. Text compares
# byte-wise in SQLite; COLLATE "C" makes ORDER BY and range tests on the ISO times, nights and
# ids give the same answers whatever the database's locale. SQLite keeps the plain INTEGER
# (an INTEGER PRIMARY KEY is the rowid), REAL and TEXT of the original DDL.
_INT = sa.BigInteger().with_variant(sqlite_dialect.INTEGER(), "sqlite")
_REAL = sa.REAL().with_variant(postgresql.DOUBLE_PRECISION(), "postgresql")
_TEXT = sa.Text().with_variant(postgresql.TEXT(collation="C"), "postgresql")

metadata = sa.MetaData()


def _id() -> sa.Column[int]:
    # SQLite: INTEGER PRIMARY KEY AUTOINCREMENT (sqlite_autoincrement on the table: ids are
    # never reused); PostgreSQL: BIGINT GENERATED BY DEFAULT AS IDENTITY.
    return sa.Column("id", _INT, sa.Identity(), primary_key=True)


def _col(name: str, type_: Any, *, null: bool = True, **kw: Any) -> sa.Column[Any]:
    return sa.Column(name, type_, nullable=null, **kw)


meta_table = sa.Table(
    "meta", metadata,
    _col("key", _TEXT, primary_key=True),
    _col("value", _TEXT, null=False),
)
arrivals = sa.Table(
    "arrivals", metadata,
    _id(),
    _col("source_uri", _TEXT, null=False),
    _col("size", _INT, null=False),
    _col("mtime", _REAL, null=False),
    _col("etag", _TEXT),
    _col("seen_at", _TEXT, null=False),
    _col("seen_by", _TEXT, null=False),
    _col("claimed_by", _TEXT),
    _col("claimed_at", _TEXT),
    _col("frame_id", _TEXT),
    _col("outcome", _TEXT),
    sa.UniqueConstraint("source_uri", "size", "mtime"),
    sqlite_autoincrement=True,
)
frames = sa.Table(
    "frames", metadata,
    _col("frame_id", _TEXT, primary_key=True),
    _col("sha256", _TEXT, null=False, unique=True),
    _col("filename", _TEXT, null=False),
    _col("source_uri", _TEXT),
    _col("raw_path", _TEXT),
    _col("landed_at", _TEXT, null=False),
    _col("claimed_at", _TEXT),
    _col("status", _TEXT, null=False),
    _col("night", _TEXT),
    _col("detector", _TEXT),
    _col("obstype", _TEXT),
    _col("obsname", _TEXT),
    _col("kind", _TEXT),
    _col("mode", _TEXT),
    _col("filter", _TEXT),
    _col("readpatt", _TEXT),
    _col("deadline_seconds", _REAL),
    _col("deadline_at", _TEXT),
    _col("finished_at", _TEXT),
    _col("latency_seconds", _REAL),
    _col("deadline_missed", _INT, null=False, server_default=sa.text("0")),
    _col("crds_context", _TEXT),
    _col("dag_id", _TEXT),
    _col("run_id", _TEXT),
    _col("duplicates", _INT, null=False, server_default=sa.text("0")),
    _col("error", _TEXT),
    _col("updated_at", _TEXT, null=False),
    sa.Index("frames_night", "night", "kind"),
    sa.Index("frames_run", "run_id"),
)
stages = sa.Table(
    "stages", metadata,
    _id(),
    _col("frame_id", _TEXT, null=False),
    _col("stage", _TEXT, null=False),
    _col("status", _TEXT, null=False),
    _col("started_at", _TEXT, null=False),
    _col("ended_at", _TEXT),
    _col("duration_seconds", _REAL),
    _col("dag_id", _TEXT),
    _col("run_id", _TEXT),
    _col("try_number", _INT),
    _col("detail", _TEXT),
    sa.Index("stages_frame", "frame_id"),
    sqlite_autoincrement=True,
)
products = sa.Table(
    "products", metadata,
    _id(),
    _col("frame_id", _TEXT, null=False),
    _col("kind", _TEXT, null=False),
    _col("path", _TEXT),
    _col("key", _TEXT),
    _col("url", _TEXT),
    _col("sha256", _TEXT),
    _col("size", _INT),
    _col("crds_context", _TEXT),
    _col("version", _INT, null=False),
    _col("current", _INT, null=False, server_default=sa.text("1")),
    _col("created_at", _TEXT, null=False),
    _col("run_id", _TEXT),
    sa.Index("products_frame", "frame_id", "kind"),
    sqlite_autoincrement=True,
)
alerts_table = sa.Table(
    "alerts", metadata,
    _id(),
    _col("kind", _TEXT, null=False),
    _col("frame_id", _TEXT),
    _col("dag_id", _TEXT),
    _col("run_id", _TEXT),
    _col("created_at", _TEXT, null=False),
    _col("message", _TEXT, null=False),
    _col("detail", _TEXT),
    _col("delivered", _TEXT),
    sqlite_autoincrement=True,
)
landing_ignored = sa.Table(
    "landing_ignored", metadata,
    _col("source_uri", _TEXT, primary_key=True),
    _col("name", _TEXT, null=False),
    _col("size", _INT),
    _col("reason", _TEXT, null=False),
    _col("first_seen", _TEXT, null=False),
    _col("last_seen", _TEXT, null=False),
    _col("gone_at", _TEXT),
)
calibrations_table = sa.Table(
    "calibrations", metadata,
    _id(),
    _col("night", _TEXT, null=False),
    _col("context", _TEXT),
    _col("previous_context", _TEXT),
    _col("status", _TEXT, null=False),
    _col("created_at", _TEXT, null=False),
    _col("dag_id", _TEXT),
    _col("run_id", _TEXT),
    _col("masters", _TEXT),
    _col("qa", _TEXT),
    sqlite_autoincrement=True,
)
# An operator's (or the timeout's, or the automatic) answer to a night's new masters: who
# approved or rejected which masters and why; ``calibration_id`` is the calibrations row the
# decision led to (published or rejected), ``document`` the decision's JSON file.
calibration_decisions = sa.Table(
    "calibration_decisions", metadata,
    _id(),
    _col("night", _TEXT, null=False),
    _col("calibration_id", _INT),
    _col("decision", _TEXT, null=False),
    _col("decided_by", _TEXT),
    _col("how", _TEXT),
    _col("reason", _TEXT),
    _col("offered", _TEXT),
    _col("approved", _TEXT),
    _col("document", _TEXT),
    _col("decided_at", _TEXT, null=False),
    _col("dag_id", _TEXT),
    _col("run_id", _TEXT),
    sqlite_autoincrement=True,
)
# Each IFS frame's flexure as its reduction measured it (FLEXDX/FLEXDY, iris_tasks.ifs
# flexure step): one row per frame, replaced when the frame is reduced again. ``dx_measured``
# / ``dy_measured``: 1 when that axis was measured on the frame itself (0: taken from a prior
# or not known, then 0 applied); ``source`` says where a prior came from. ``obs_time``: the
# exposure start (MJD-OBS) as ISO 8601 UTC, what the prior's time window compares.
frame_flexure = sa.Table(
    "frame_flexure", metadata,
    _col("frame_id", _TEXT, primary_key=True),
    _col("night", _TEXT),
    _col("mode", _TEXT),
    _col("scale", _TEXT),
    _col("filter", _TEXT),
    _col("obs_time", _TEXT),
    _col("crds_context", _TEXT),
    _col("ifstrace", _TEXT),
    _col("dx", _REAL, null=False),
    _col("dy", _REAL, null=False),
    _col("dx_err", _REAL),
    _col("dy_err", _REAL),
    _col("rotation", _REAL),
    _col("method", _TEXT, null=False),
    _col("dx_measured", _INT, null=False, server_default=sa.text("0")),
    _col("dy_measured", _INT, null=False, server_default=sa.text("0")),
    _col("source", _TEXT),
    _col("run_id", _TEXT),
    _col("recorded_at", _TEXT, null=False),
    sa.Index("frame_flexure_night", "night", "mode", "scale", "filter"),
)
# The table added last: where it is missing (a ledger made by older code) create_all runs
# again and adds what is new (it skips the tables that exist).
_NEWEST_TABLE = frame_flexure.name
# Flexure fields recorded per frame (record_flexure), as the FlexureStep writes them.
FLEXURE_FIELDS = ("dx", "dy", "dx_err", "dy_err", "rotation", "method", "dx_measured",
                  "dy_measured", "source")
# SQLite's limit on host parameters was 999 before 3.32: IN lists go in chunks below it.
_IN_CHUNK = 500


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


class LedgerMissing(LookupError):
    """A read-only ledger finds no ledger to read: no file, or no tables yet. The message
    says where it looked ("no ledger yet at ...")."""


# -- engines: one per location and process ----------------------------------------------------
_ENGINES: dict[tuple[LedgerLocation, bool], sa.Engine] = {}
_ENGINES_LOCK = threading.Lock()


def _after_fork_in_child() -> None:
    # NullPool holds no connection, so a parent's engine is safe to use in the child; only
    # the lock may have been held by another thread at the fork.
    global _ENGINES_LOCK
    _ENGINES_LOCK = threading.Lock()


if hasattr(os, "register_at_fork"):
    os.register_at_fork(after_in_child=_after_fork_in_child)


def _engine(loc: LedgerLocation, *, readonly: bool) -> sa.Engine:
    """The engine for ``loc`` in this process (created on first use)."""
    key = (loc, readonly)
    engine = _ENGINES.get(key)
    if engine is None:
        with _ENGINES_LOCK:
            engine = _ENGINES.get(key)
            if engine is None:
                engine = _ENGINES[key] = (_postgres_engine(loc, readonly) if loc.is_postgres
                                          else _sqlite_engine(loc.path, readonly))
    return engine


def _sqlite_engine(path: Path, readonly: bool) -> sa.Engine:
    """SQLite through our own connections: the driver's implicit transactions are off
    (``isolation_level=None``) and the ``begin`` event below opens them instead, ``BEGIN
    IMMEDIATE`` for a writer (SQLAlchemy's documented recipe for pysqlite)."""

    def connect() -> sqlite3.Connection:
        if readonly:
            # mode=ro: the reader can never create or change the file. WAL readers never
            # block the writing tasks.
            uri = f"file:{urllib.parse.quote(str(path.resolve()))}?mode=ro"
            raw = sqlite3.connect(uri, uri=True, timeout=10.0, isolation_level=None,
                                  check_same_thread=False)
            raw.execute("PRAGMA busy_timeout = 10000")
        else:
            raw = sqlite3.connect(path, timeout=60.0, isolation_level=None,
                                  check_same_thread=False)
            raw.execute("PRAGMA busy_timeout = 60000")
        return raw

    engine = sa.create_engine("sqlite://", creator=connect, poolclass=NullPool)

    @sa.event.listens_for(engine, "begin")
    def _begin(conn: sa.Connection) -> None:
        opts = conn.get_execution_options()
        if opts.get("ledger_autocommit"):  # PRAGMA journal_mode needs no open transaction
            return
        # A writer takes the database's only write lock up front, so read-then-write
        # sequences such as a claim are atomic.
        conn.exec_driver_sql("BEGIN IMMEDIATE" if opts.get("ledger_write") else "BEGIN")

    return engine


def _postgres_engine(loc: LedgerLocation, readonly: bool) -> sa.Engine:
    # connect_postgres makes the connection (timeouts, search_path, isolation level, the
    # masked-password error); SQLAlchemy only drives it.
    return sa.create_engine("postgresql+psycopg2://", poolclass=NullPool,
                            creator=lambda: connect_postgres(loc, readonly=readonly),
                            use_native_hstore=False)


def _has_table(conn: sa.Connection, name: str) -> bool:
    """Whether ``name`` is visible to ``conn`` (PostgreSQL: on its search_path)."""
    return bool(conn.dialect.has_table(conn, name))


def _insert(conn: sa.Connection, table: sa.Table) -> Any:
    """INSERT for the connection's dialect (ON CONFLICT is dialect-specific in SQLAlchemy)."""
    return (postgresql.insert(table) if conn.dialect.name == "postgresql"
            else sqlite_dialect.insert(table))


def _dicts(result: sa.CursorResult[Any]) -> list[dict[str, Any]]:
    return [dict(m) for m in result.mappings()]


def _one(result: sa.CursorResult[Any]) -> dict[str, Any] | None:
    row = result.mappings().first()
    return dict(row) if row is not None else None


def _chunks(ids: Sequence[str]) -> Iterator[list[str]]:
    for i in range(0, len(ids), _IN_CHUNK):
        yield list(ids[i:i + _IN_CHUNK])


def _json_text(value: Any) -> str | None:
    return json.dumps(value, default=str) if value is not None else None


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


# -- reading ----------------------------------------------------------------------------------
class LedgerReader:
    """Queries on one open transaction of a ledger (from :meth:`FrameLedger.reader`): what
    the operations page and the lineage lookup read. On a read-only PostgreSQL ledger the
    transaction is REPEATABLE READ, so everything read through one reader is one snapshot.
    Rows are dicts, as everywhere in the ledger."""

    def __init__(self, conn: sa.Connection, where: str):
        self.conn = conn
        self.where = where

    def nights(self) -> list[str]:
        """Every night with frames or calibrations, newest first."""
        found = {n for (n,) in self.conn.execute(
            sa.select(frames.c.night).distinct().where(frames.c.night.is_not(None)))}
        found.update(n for (n,) in self.conn.execute(
            sa.select(calibrations_table.c.night).distinct()))
        # Python orders str by code point, as COLLATE "C" and SQLite do.
        return sorted(found, reverse=True)

    def frames_of_night(self, night: str | None) -> list[dict[str, Any]]:
        """The frames of ``night`` (None: the frames with no night yet, those that failed
        before classification), oldest landing first."""
        return _dicts(self.conn.execute(
            sa.select(frames).where(frames.c.night.is_not_distinct_from(night))
            .order_by(frames.c.landed_at, frames.c.frame_id)))

    def frames_by_id(self, frame_ids: Iterable[str]) -> list[dict[str, Any]]:
        """The frames with these ids (unknown ids are left out), by id."""
        ids = sorted(set(frame_ids))
        out: list[dict[str, Any]] = []
        for chunk in _chunks(ids):
            out += _dicts(self.conn.execute(
                sa.select(frames).where(frames.c.frame_id.in_(chunk)).order_by(frames.c.frame_id)))
        return out

    def stages_of(self, frame_ids: Sequence[str]) -> dict[str, list[dict[str, Any]]]:
        """frame id -> its stage rows in the order they started (ids without stages absent)."""
        return self._by_frame(stages, frame_ids)

    def products_of(self, frame_ids: Sequence[str], *,
                    current_only: bool = True) -> dict[str, list[dict[str, Any]]]:
        """frame id -> its product rows (the current versions only, by default) by id."""
        return self._by_frame(products, frame_ids,
                              products.c.current == 1 if current_only else None)

    def first_seen(self, frame_ids: Sequence[str]) -> dict[str, str]:
        """frame id -> when the landing area was first seen holding it (its first arrival)."""
        out: dict[str, str] = {}
        for chunk in _chunks(frame_ids):
            out.update(self.conn.execute(
                sa.select(arrivals.c.frame_id, sa.func.min(arrivals.c.seen_at))
                .where(arrivals.c.frame_id.in_(chunk)).group_by(arrivals.c.frame_id)).all())
        return out

    def calibrations(self, night: str | None = None) -> list[dict[str, Any]]:
        """The nightly calibration runs of ``night`` (None: all), in the order they ran."""
        query = sa.select(calibrations_table).order_by(calibrations_table.c.id)
        if night is not None:
            query = query.where(calibrations_table.c.night == night)
        return _dicts(self.conn.execute(query))

    def calibration_decisions(self, night: str | None = None) -> list[dict[str, Any]]:
        """The approvals and rejections of ``night``'s masters (None: all), oldest first; none
        in a ledger written by code older than the table."""
        if not _has_table(self.conn, calibration_decisions.name):
            return []
        query = sa.select(calibration_decisions).order_by(calibration_decisions.c.id)
        if night is not None:
            query = query.where(calibration_decisions.c.night == night)
        rows = _dicts(self.conn.execute(query))
        for row in rows:
            for key in ("offered", "approved"):
                row[key] = json.loads(row[key]) if row[key] else []
        return rows

    def flexure_of(self, frame_ids: Sequence[str]) -> dict[str, dict[str, Any]]:
        """frame id -> its flexure row (IFS frames reduced since the table exists; none in a
        ledger written by code older than it)."""
        if not _has_table(self.conn, frame_flexure.name):
            return {}
        out: dict[str, dict[str, Any]] = {}
        for chunk in _chunks(list(frame_ids)):
            for row in _dicts(self.conn.execute(
                    sa.select(frame_flexure).where(frame_flexure.c.frame_id.in_(chunk)))):
                out[row["frame_id"]] = row
        return out

    def ignored(self, *, current_only: bool = True) -> list[dict[str, Any]]:
        """Entries of the landing area the DRS does not take (still there, by default); none
        in a ledger written by code older than the table (read-only readers cannot add it)."""
        if not _has_table(self.conn, landing_ignored.name):
            return []
        query = sa.select(landing_ignored).order_by(landing_ignored.c.first_seen,
                                                    landing_ignored.c.name)
        if current_only:
            query = query.where(landing_ignored.c.gone_at.is_(None))
        return _dicts(self.conn.execute(query))

    def products_by_sha256(self, sha256: str) -> list[dict[str, Any]]:
        """Every product row of these bytes (any frame, any version), by id."""
        return _dicts(self.conn.execute(
            sa.select(products).where(products.c.sha256 == sha256).order_by(products.c.id)))

    def products_by_object(self, url: str, key: str) -> list[dict[str, Any]]:
        """Every product row stored as ``url`` or under ``key``, by id."""
        return _dicts(self.conn.execute(
            sa.select(products).where(sa.or_(products.c.url == url, products.c.key == key))
            .order_by(products.c.id)))

    def _by_frame(self, table: sa.Table, frame_ids: Sequence[str],
                  extra: Any = None) -> dict[str, list[dict[str, Any]]]:
        out: dict[str, list[dict[str, Any]]] = {}
        for chunk in _chunks(frame_ids):
            query = sa.select(table).where(table.c.frame_id.in_(chunk)).order_by(table.c.id)
            if extra is not None:
                query = query.where(extra)
            for row in _dicts(self.conn.execute(query)):
                out.setdefault(row["frame_id"], []).append(row)
        return out


# -- the ledger -------------------------------------------------------------------------------
class FrameLedger:
    """Access to the ledger at ``target``: a SQLite file path or a database URL (see the module
    docstring). Tables are created on first use.

    ``readonly`` (the operations page, lineage lookups): nothing is ever created or written -
    SQLite opens the file with ``mode=ro``, PostgreSQL runs READ ONLY REPEATABLE READ
    transactions - and where there is no ledger yet (no file, no tables) the first call raises
    :class:`LedgerMissing`. Write methods raise :class:`PermissionError`.

    ``path`` is the SQLite file (a :class:`~pathlib.Path`), or for PostgreSQL the URL with the
    password masked (a str): what messages and snapshots show.
    """

    def __init__(self, target: str | os.PathLike[str] | LedgerLocation, *, readonly: bool = False):
        self.location = parse_location(target)
        self.path: Path | str = self.location.path or self.location.display
        self.readonly = readonly
        self._ready = False

    def __repr__(self) -> str:
        ro = ", readonly=True" if self.readonly else ""
        return f"FrameLedger({str(self.path)!r}{ro})"

    @property
    def backend(self) -> str:
        """``sqlite`` or ``postgresql``."""
        return self.location.backend

    # -- plumbing ---------------------------------------------------------------------------
    @contextlib.contextmanager
    def connect(self, *, write: bool = False) -> Iterator[sa.Connection]:
        """A SQLAlchemy connection in a transaction, committed when the block ends (rolled back
        on an exception). SQLite: ``write=True`` takes the write lock up front (BEGIN
        IMMEDIATE) so read-then-write sequences such as a claim are atomic. PostgreSQL (READ
        COMMITTED): each method takes the row or table locks its sequence needs (see
        ``claim``, ``take_arrival``, ``add_product``)."""
        if write and self.readonly:
            raise PermissionError(f"the frame ledger {self.location.display} is open read-only")
        if not self._ready:
            self._prepare()
        engine = _engine(self.location, readonly=self.readonly)
        with self._connection(engine) as conn:
            if write:
                conn.execution_options(ledger_write=True)
            with conn.begin():
                yield conn

    @contextlib.contextmanager
    def reader(self) -> Iterator[LedgerReader]:
        """A :class:`LedgerReader` on one transaction (one snapshot on a read-only
        PostgreSQL ledger)."""
        with self.connect() as conn:
            yield LedgerReader(conn, self.location.display)

    @contextlib.contextmanager
    def _connection(self, engine: sa.Engine) -> Iterator[sa.Connection]:
        try:
            conn = engine.connect()
        except sa.exc.DBAPIError as exc:  # SQLite: a file that cannot be opened
            raise LedgerConnectionError(
                f"cannot open the frame ledger at {self.location.display}: {exc.orig}") from exc
        with conn:
            yield conn

    def _prepare(self) -> None:
        """First use by this object: create what is missing (or, read-only, check that there
        is a ledger), then check the schema version."""
        engine = _engine(self.location, readonly=self.readonly)
        if self.readonly:
            if self.location.path is not None and not self.location.path.is_file():
                raise LedgerMissing(self._missing())
            with self._connection(engine) as conn, conn.begin():
                if not _has_table(conn, frames.name):
                    raise LedgerMissing(self._missing())
                self._check_version(conn)
        elif self.location.is_postgres:
            self._init_postgres(engine)
        else:
            self._init_sqlite(engine)
        self._ready = True

    def _missing(self) -> str:
        where = f" (schema {self.location.schema})" if self.location.schema else ""
        return f"no ledger yet at {self.location.display}{where} (no frame has landed)"

    def _init_sqlite(self, engine: sa.Engine) -> None:
        self.location.path.parent.mkdir(parents=True, exist_ok=True)
        with self._connection(engine) as conn:
            # WAL: readers (the ops UI) never block the task processes that write. The mode
            # is stored in the file; it cannot change inside a transaction.
            conn.execution_options(ledger_autocommit=True)
            conn.exec_driver_sql("PRAGMA journal_mode = WAL")
            conn.commit()
        with self._connection(engine) as conn:
            conn.execution_options(ledger_write=True)
            with conn.begin():
                # Under BEGIN IMMEDIATE: concurrent first users run this one after the other.
                if not _has_table(conn, _NEWEST_TABLE):
                    metadata.create_all(conn, checkfirst=True)
                conn.execute(sqlite_dialect.insert(meta_table)
                             .values(key="schema_version", value=str(SCHEMA_VERSION))
                             .on_conflict_do_nothing())
                self._check_version(conn)

    def _init_postgres(self, engine: sa.Engine) -> None:
        """Create schema and tables unless the newest table exists (one query on the common
        path)."""
        with self._connection(engine) as conn, conn.begin():
            if not _has_table(conn, _NEWEST_TABLE):
                # Concurrent CREATE TABLE IF NOT EXISTS of the same table can still collide
                # in the catalog (unique violation on pg_type): first users serialize on an
                # advisory lock for this schema. The DDL is one transaction, so where the
                # newest table exists every table does.
                key = zlib.crc32(f"iris_tasks.ledger:{self.location.schema or ''}".encode())
                conn.execute(sa.select(sa.func.pg_advisory_xact_lock(key)))
                schema = self.location.schema
                if schema and not conn.dialect.has_schema(conn, schema):
                    # Unqualified tables then go into it: it is first on the search_path.
                    conn.execute(sa.schema.CreateSchema(schema, if_not_exists=True))
                metadata.create_all(conn, checkfirst=True)
                conn.execute(postgresql.insert(meta_table)
                             .values(key="schema_version", value=str(SCHEMA_VERSION))
                             .on_conflict_do_nothing(index_elements=["key"]))
                log.info("created the frame ledger tables (those missing) in %s",
                         self.location.display)
            self._check_version(conn)

    def _check_version(self, conn: sa.Connection) -> None:
        found = conn.execute(sa.select(meta_table.c.value)
                             .where(meta_table.c.key == "schema_version")).scalar()
        if found != str(SCHEMA_VERSION):
            log.warning("frame ledger %s has schema version %s, this code writes %s",
                        self.path, found, SCHEMA_VERSION)

    @staticmethod
    def _lock(conn: sa.Connection, table: sa.Table) -> None:
        """Serialize this transaction against every other writer of ``table`` (readers go on).

        SQLite needs nothing: BEGIN IMMEDIATE already holds the database's only write lock.
        PostgreSQL: SHARE ROW EXCLUSIVE conflicts with itself and with the ROW EXCLUSIVE lock
        that INSERT/UPDATE take, but not with plain SELECTs. (SQLAlchemy has no construct for
        LOCK TABLE; the name is quoted by the dialect.)
        """
        if conn.dialect.name == "postgresql":
            name = conn.dialect.identifier_preparer.format_table(table)
            conn.exec_driver_sql(f"LOCK TABLE {name} IN SHARE ROW EXCLUSIVE MODE")

    # -- arrivals ---------------------------------------------------------------------------
    def record_arrival(
        self, source_uri: str, size: int, mtime: float, *, etag: str | None = None,
        seen_by: str = "scan", seen_at: str | None = None,
    ) -> dict[str, Any]:
        """Record that ``source_uri`` (with this size/mtime) is in the landing area; return the
        arrival row (the existing one if this exact version was seen before)."""
        key = (arrivals.c.source_uri == source_uri, arrivals.c.size == int(size),
               arrivals.c.mtime == float(mtime))
        with self.connect(write=True) as conn:
            # PostgreSQL: a concurrent insert of the same key makes this one wait for it to
            # commit and then do nothing, so the SELECT below finds exactly one row either way.
            conn.execute(
                _insert(conn, arrivals).values(
                    source_uri=source_uri, size=int(size), mtime=float(mtime), etag=etag,
                    seen_at=seen_at or isotime(), seen_by=seen_by)
                .on_conflict_do_nothing(index_elements=["source_uri", "size", "mtime"]))
            return _one(conn.execute(sa.select(arrivals).where(*key)))

    def arrival_keys(self) -> set[tuple[str, int, float]]:
        """(uri, size, mtime) of every arrival ever recorded (the trigger's memory)."""
        with self.connect() as conn:
            rows = conn.execute(sa.select(arrivals.c.source_uri, arrivals.c.size,
                                          arrivals.c.mtime)).all()
        return {(r[0], int(r[1]), float(r[2])) for r in rows}

    def take_arrival(self, arrival_id: int, claimer: str) -> bool:
        """Reserve an arrival for one claimer (a task run); False if another claimer has it or
        it was already dealt with. The same claimer may take it again (a task retry)."""
        with self.connect(write=True) as conn:
            # One conditional UPDATE is the whole claim. PostgreSQL (READ COMMITTED) makes a
            # second UPDATE of the row wait for the first to commit and then re-test the WHERE
            # clause on the new version, where claimed_by is the winner: no extra lock needed.
            result = conn.execute(
                sa.update(arrivals)
                .where(arrivals.c.id == arrival_id, arrivals.c.outcome.is_(None),
                       sa.or_(arrivals.c.claimed_by.is_(None), arrivals.c.claimed_by == claimer))
                .values(claimed_by=claimer, claimed_at=isotime()))
            return result.rowcount == 1

    def release_arrival(self, arrival_id: int) -> None:
        """Give an arrival back (its claim failed half-way): any later run may take it."""
        with self.connect(write=True) as conn:
            conn.execute(sa.update(arrivals)
                         .where(arrivals.c.id == arrival_id, arrivals.c.outcome.is_(None))
                         .values(claimed_by=None, claimed_at=None))

    def close_arrival(self, arrival_id: int, *, frame_id: str | None, outcome: str) -> None:
        """Record what became of an arrival (an :class:`ArrivalOutcome`: new, retry,
        duplicate or vanished)."""
        with self.connect(write=True) as conn:
            conn.execute(sa.update(arrivals).where(arrivals.c.id == arrival_id)
                         .values(claimed_at=isotime(), frame_id=frame_id, outcome=str(outcome)))

    def arrivals(self, *, open_only: bool = False) -> list[dict[str, Any]]:
        query = sa.select(arrivals).order_by(arrivals.c.id)
        if open_only:
            query = query.where(arrivals.c.outcome.is_(None))
        with self.connect() as conn:
            return _dicts(conn.execute(query))

    # -- what the landing area holds but the DRS does not take ----------------------------
    def note_ignored(self, entries: Iterable[tuple[str, str, int, str]], *, scope: str) -> None:
        """Record the ignored entries ``(uri, name, size, reason)`` seen now under ``scope``
        (the landing area's URI prefix); those of the scope no longer seen are marked gone."""
        now = isotime()
        seen = set()
        with self.connect(write=True) as conn:
            for uri, name, size, reason in entries:
                seen.add(uri)
                stmt = _insert(conn, landing_ignored).values(
                    source_uri=uri, name=name, size=int(size), reason=reason, first_seen=now,
                    last_seen=now)
                conn.execute(stmt.on_conflict_do_update(
                    index_elements=["source_uri"],
                    set_={"name": stmt.excluded.name, "size": stmt.excluded.size,
                          "reason": stmt.excluded.reason, "last_seen": stmt.excluded.last_seen,
                          "gone_at": None}))
            there = conn.execute(
                sa.select(landing_ignored.c.source_uri)
                .where(landing_ignored.c.gone_at.is_(None),
                       sa.func.substr(landing_ignored.c.source_uri, 1, len(scope)) == scope)
            ).scalars().all()
            gone = [uri for uri in there if uri not in seen]
            if gone:
                conn.execute(sa.update(landing_ignored)
                             .where(landing_ignored.c.source_uri.in_(gone)).values(gone_at=now))

    def ignored(self, *, current_only: bool = True) -> list[dict[str, Any]]:
        """Entries of the landing area that the DRS does not take (still there, by default)."""
        with self.reader() as r:
            return r.ignored(current_only=current_only)

    # -- frames -----------------------------------------------------------------------------
    def claim(
        self, *, sha256: str, filename: str, source_uri: str, landed_at: str,
        dag_id: str | None = None, run_id: str | None = None,
    ) -> tuple[dict[str, Any], str]:
        """Claim a frame by content; return (frame row, outcome).

        outcome ``new``: first time these bytes are seen, the caller processes the frame.
        ``retry``: seen before but the earlier attempt failed, the caller processes it again.
        ``duplicate``: already claimed, processed or quarantined; the caller does nothing.
        (The outcome is an :class:`ArrivalOutcome`, a str.)
        """
        fid = frame_id_for(sha256)
        now = isotime()
        select = sa.select(frames).where(frames.c.sha256 == sha256)
        with self.connect(write=True) as conn:
            # SQLite: BEGIN IMMEDIATE makes this whole block exclusive. PostgreSQL: the row
            # lock (FOR UPDATE) serializes claims of known bytes, so only one claimer turns a
            # failed frame into a retry; for new bytes the unique sha256 decides: a concurrent
            # INSERT waits for the first one to commit and then inserts nothing, and that
            # claimer goes on with the (now visible) row as a duplicate. Row locks rather than
            # a table lock: claims of different frames never wait for each other.
            row = _one(conn.execute(select.with_for_update()))
            inserted = False
            if row is None:
                inserted = conn.execute(
                    _insert(conn, frames).values(
                        frame_id=fid, sha256=sha256, filename=filename, source_uri=source_uri,
                        landed_at=landed_at, claimed_at=now, status=CLAIMED.value,
                        dag_id=dag_id, run_id=run_id, updated_at=now)
                    # No conflict target: a racing insert of the same bytes may trip the
                    # frame_id primary key (derived from the sha256) before the sha256 index,
                    # and either way it is the same frame.
                    .on_conflict_do_nothing()
                ).rowcount == 1
                if not inserted:  # lost the race for new bytes (PostgreSQL only)
                    row = _one(conn.execute(select.with_for_update()))
                    if row is None:
                        raise ValueError(
                            f"{filename}: frame id {fid} is already taken by other bytes "
                            f"(a 64-bit prefix collision of sha256 {sha256})")
            by_id = frames.c.frame_id == (row["frame_id"] if row else fid)
            if inserted:
                outcome = ArrivalOutcome.NEW
            elif row["status"] == FAILED:
                # A failed frame arriving again gets a fresh attempt and a fresh deadline.
                conn.execute(sa.update(frames).where(by_id).values(
                    status=CLAIMED.value, claimed_at=now, landed_at=landed_at, dag_id=dag_id,
                    run_id=run_id, error=None, finished_at=None, latency_seconds=None,
                    deadline_missed=0, updated_at=now))
                outcome = ArrivalOutcome.RETRY
            else:
                conn.execute(sa.update(frames).where(by_id).values(
                    duplicates=frames.c.duplicates + 1, updated_at=now))
                outcome = ArrivalOutcome.DUPLICATE
            frame = _one(conn.execute(select))
        return frame, outcome

    def update_frame(self, frame_id: str, **fields: Any) -> None:
        """Set columns of one frame (unknown column names raise)."""
        if not fields:
            return
        for name in fields:
            _column(name)
        fields["updated_at"] = isotime()
        # PostgreSQL refuses a boolean for a BIGINT column; SQLite stores it as 0/1: do that.
        values = {k: int(v) if isinstance(v, bool) else v for k, v in fields.items()}
        with self.connect(write=True) as conn:
            result = conn.execute(sa.update(frames).where(frames.c.frame_id == frame_id)
                                  .values(**values))
            if result.rowcount != 1:
                raise KeyError(f"no frame {frame_id!r} in {self.path}")

    def frame(self, frame_id: str) -> dict[str, Any] | None:
        with self.connect() as conn:
            return _one(conn.execute(sa.select(frames).where(frames.c.frame_id == frame_id)))

    def frame_by_sha(self, sha256: str) -> dict[str, Any] | None:
        with self.connect() as conn:
            return _one(conn.execute(sa.select(frames).where(frames.c.sha256 == sha256)))

    def frames(
        self, *, night: str | None = None, nights: tuple[str, str] | None = None,
        status: str | Iterable[str] | None = None, kind: str | Iterable[str] | None = None,
        run_id: str | None = None,
    ) -> list[dict[str, Any]]:
        """Frames matching every given filter, oldest landing first."""
        query = sa.select(frames).order_by(frames.c.landed_at, frames.c.frame_id)
        if night is not None:
            query = query.where(frames.c.night == night)
        if nights is not None:
            query = query.where(frames.c.night.between(*nights))
        for col, value in ((frames.c.status, status), (frames.c.kind, kind)):
            if value is not None:
                query = query.where(col.in_([value] if isinstance(value, str) else list(value)))
        if run_id is not None:
            query = query.where(frames.c.run_id == run_id)
        with self.connect() as conn:
            return _dicts(conn.execute(query))

    # -- stages -----------------------------------------------------------------------------
    def start_stage(
        self, frame_id: str, stage: str, *, dag_id: str | None = None, run_id: str | None = None,
        try_number: int | None = None, detail: Mapping[str, Any] | None = None,
    ) -> int:
        """Record a stage as running; ``detail``: what is known at its start (the host), kept
        where the stage never ends (its host killed).

        A later try (``try_number``) of the same run starting a stage of the frame means the
        earlier tries' processes are gone: their stages still running are closed as
        :attr:`StageStatus.ABANDONED`, so the ledger never shows a dead host still working."""
        with self.connect(write=True) as conn:
            if try_number is not None and try_number > 1:
                self._abandon_stages(conn, frame_id, reason=f"try {try_number} started",
                                     run_id=run_id, before_try=try_number)
            result = conn.execute(sa.insert(stages).values(
                frame_id=frame_id, stage=str(stage), status=StageStatus.RUNNING.value,
                started_at=isotime(), dag_id=dag_id, run_id=run_id, try_number=try_number,
                detail=json.dumps(detail, default=str) if detail else None))
            return int(result.inserted_primary_key[0])

    @staticmethod
    def _abandon_stages(conn: sa.Connection, frame_id: str, *, reason: str,
                        run_id: str | None = None, before_try: int | None = None) -> int:
        """Close the frame's stages still running (of ``run_id``, of tries before
        ``before_try``) as abandoned, ``reason`` in their detail; returns how many."""
        where = [stages.c.frame_id == frame_id, stages.c.status == StageStatus.RUNNING.value]
        if run_id is not None:
            where.append(stages.c.run_id == run_id)
        if before_try is not None:
            where.append(stages.c.try_number < before_try)
        rows = _dicts(conn.execute(sa.select(stages.c.id, stages.c.detail).where(*where)))
        now = isotime()
        for row in rows:
            detail = json.loads(row["detail"] or "{}")
            detail["abandoned"] = reason
            conn.execute(sa.update(stages).where(stages.c.id == row["id"]).values(
                status=StageStatus.ABANDONED.value, ended_at=now, detail=json.dumps(detail)))
        return len(rows)

    def end_stage(self, stage_id: int, status: str, detail: Mapping[str, Any] | None = None) -> None:
        now = utcnow()
        with self.connect(write=True) as conn:
            started = conn.execute(sa.select(stages.c.started_at)
                                   .where(stages.c.id == stage_id)).scalar()
            duration = (now - parse_time(started)).total_seconds() if started else None
            conn.execute(sa.update(stages).where(stages.c.id == stage_id).values(
                status=str(status), ended_at=isotime(now), duration_seconds=duration,
                detail=json.dumps(detail, default=str) if detail else None))

    @contextlib.contextmanager
    def stage(
        self, frame_id: str, stage: str, *, detail: Mapping[str, Any] | None = None, **where: Any
    ) -> Iterator[dict[str, Any]]:
        """Time one stage (a :class:`Stage`): yields a dict the caller may fill with details
        for the record (starting from ``detail``, recorded at the start too). An exception
        marks the stage failed (and propagates)."""
        stage_id = self.start_stage(frame_id, stage, detail=detail, **where)
        detail = dict(detail or {})
        try:
            yield detail
        except BaseException as exc:
            detail.setdefault("error", f"{type(exc).__name__}: {exc}")
            status = (StageStatus.SKIPPED if type(exc).__name__ == "AirflowSkipException"
                      else StageStatus.FAILED)
            self.end_stage(stage_id, status, detail)
            raise
        self.end_stage(stage_id, StageStatus.SUCCESS, detail)

    def stages(self, frame_id: str) -> list[dict[str, Any]]:
        with self.reader() as r:
            return r.stages_of([frame_id]).get(frame_id, [])

    # -- products ---------------------------------------------------------------------------
    def add_product(
        self, frame_id: str, kind: str, *, path: str | None = None, key: str | None = None,
        url: str | None = None, sha256: str | None = None, size: int | None = None,
        crds_context: str | None = None, run_id: str | None = None,
    ) -> int:
        """Record a product; returns its version (1 + the previous version of this kind for
        this frame). A new version of a kind becomes ``current`` and the older ones stop being;
        re-recording the same key with the same checksum is a no-op (idempotent retries)."""
        of_kind = (products.c.frame_id == frame_id, products.c.kind == kind)
        with self.connect(write=True) as conn:
            # Read-then-write with a computed version and no unique key to hang an ON CONFLICT
            # on, and the first version of a kind has no row to lock: PostgreSQL serializes the
            # product writers on the table (a few short writes per frame; readers go on).
            self._lock(conn, products)
            same = conn.execute(sa.select(products.c.version).where(
                *of_kind, products.c.key.is_not_distinct_from(key),
                products.c.sha256.is_not_distinct_from(sha256),
                products.c.path.is_not_distinct_from(path))).first()
            if same is not None:
                return int(same[0])
            prev = conn.execute(sa.select(sa.func.max(products.c.version)).where(*of_kind)).scalar()
            version = int(prev or 0) + 1
            conn.execute(sa.update(products).where(*of_kind).values(current=0))
            conn.execute(sa.insert(products).values(
                frame_id=frame_id, kind=kind, path=path, key=key, url=url, sha256=sha256,
                size=size, crds_context=crds_context, version=version, current=1,
                created_at=isotime(), run_id=run_id))
        return version

    def products(self, frame_id: str, *, current_only: bool = False) -> list[dict[str, Any]]:
        with self.reader() as r:
            return r.products_of([frame_id], current_only=current_only).get(frame_id, [])

    # -- IFS flexure ------------------------------------------------------------------------
    def record_flexure(
        self, frame_id: str, *, dx: float, dy: float, method: str, dx_err: float | None = None,
        dy_err: float | None = None, rotation: float | None = None, dx_measured: bool = False,
        dy_measured: bool = False, source: str | None = None, night: str | None = None,
        mode: str | None = None, scale: str | None = None, filter: str | None = None,  # noqa: A002
        obs_time: str | None = None, crds_context: str | None = None,
        ifstrace: str | None = None, run_id: str | None = None,
    ) -> None:
        """Record (or replace) the frame's flexure as its reduction measured it (see
        ``frame_flexure``)."""
        values = dict(
            night=night, mode=mode, scale=scale, filter=filter, obs_time=obs_time,
            crds_context=crds_context, ifstrace=ifstrace, dx=float(dx), dy=float(dy),
            dx_err=None if dx_err is None else float(dx_err),
            dy_err=None if dy_err is None else float(dy_err),
            rotation=None if rotation is None else float(rotation), method=str(method),
            dx_measured=int(bool(dx_measured)), dy_measured=int(bool(dy_measured)),
            source=source, run_id=run_id, recorded_at=isotime())
        with self.connect(write=True) as conn:
            stmt = _insert(conn, frame_flexure).values(frame_id=frame_id, **values)
            conn.execute(stmt.on_conflict_do_update(index_elements=["frame_id"], set_=values))

    def flexure(self, frame_id: str) -> dict[str, Any] | None:
        """The frame's flexure row, or None (not an IFS frame, or not reduced yet)."""
        with self.reader() as r:
            return r.flexure_of([frame_id]).get(frame_id)

    def flexure_neighbours(
        self, *, night: str, mode: str | None, scale: str | None, filter: str | None,  # noqa: A002
        obs_time: str, window_seconds: float, axis: str, crds_context: str | None = None,
        exclude: str | None = None, limit: int = 5,
    ) -> list[dict[str, Any]]:
        """The flexure rows of the frames of ``night`` with the same mode, scale and filter
        (and CRDS context, when given: offsets are relative to its ifstrace reference) whose
        ``axis`` ('dx' or 'dy') was measured on the frame itself and whose exposure started
        within ``window_seconds`` of ``obs_time``: at most ``limit``, nearest in time first.
        ``exclude``: a frame id left out (the frame asking)."""
        if axis not in ("dx", "dy"):
            raise ValueError(f"axis must be 'dx' or 'dy', got {axis!r}")
        t = parse_time(obs_time)
        lo = isotime(t - dt.timedelta(seconds=window_seconds))
        hi = isotime(t + dt.timedelta(seconds=window_seconds))
        c = frame_flexure.c
        query = sa.select(frame_flexure).where(
            c.night == night, c.mode.is_not_distinct_from(mode),
            c.scale.is_not_distinct_from(scale), c.filter.is_not_distinct_from(filter),
            c.obs_time.is_not(None), c.obs_time.between(lo, hi),
            (c.dx_measured if axis == "dx" else c.dy_measured) == 1)
        if crds_context is not None:
            query = query.where(c.crds_context == crds_context)
        if exclude is not None:
            query = query.where(c.frame_id != exclude)
        with self.reader() as r:
            if not _has_table(r.conn, frame_flexure.name):
                return []
            rows = _dicts(r.conn.execute(query))
        rows.sort(key=lambda row: (abs((parse_time(row["obs_time"]) - t).total_seconds()),
                                   row["frame_id"]))
        return rows[:limit]

    # -- deadlines and alerts ---------------------------------------------------------------
    def finish(self, frame_id: str, *, status: str = DONE, when: dt.datetime | None = None) -> dict[str, Any]:
        """Close a frame: status, finished_at, latency since landing and whether the deadline
        was missed. Returns the updated frame row."""
        when = when or utcnow()
        by_id = frames.c.frame_id == frame_id
        with self.connect(write=True) as conn:
            # FOR UPDATE: a deadline flag set meanwhile (record_alert) must not be overwritten.
            row = _one(conn.execute(sa.select(frames).where(by_id).with_for_update()))
            if row is None:
                raise KeyError(f"no frame {frame_id!r} in {self.path}")
            latency = (when - parse_time(row["landed_at"])).total_seconds()
            missed = bool(row["deadline_missed"]) or (
                row["deadline_at"] is not None and when > parse_time(row["deadline_at"])
            )
            conn.execute(sa.update(frames).where(by_id).values(
                status=str(status), finished_at=isotime(when), latency_seconds=latency,
                deadline_missed=int(missed), updated_at=isotime()))
            return _one(conn.execute(sa.select(frames).where(by_id)))

    def close_open_frames(self, *, run_id: str, reason: str) -> list[dict[str, Any]]:
        """Fail every frame of ``run_id`` still open (claimed/processing): called when all of
        the run's tasks have ended, so nothing will close them any more. Returns them."""
        with self.connect(write=True) as conn:
            rows = _dicts(conn.execute(
                sa.select(frames).where(frames.c.run_id == run_id,
                                        frames.c.status.in_(OPEN_STATUSES)).with_for_update()))
            now = isotime()
            for row in rows:
                conn.execute(sa.update(frames).where(frames.c.frame_id == row["frame_id"]).values(
                    status=FAILED.value, finished_at=now, error=reason[:2000], updated_at=now))
                self._abandon_stages(conn, row["frame_id"], reason="the run ended", run_id=run_id)
        return rows

    def supersede(self, frame_id: str) -> list[dict[str, Any]]:
        """Mark the earlier frames with this frame's file name and other bytes as superseded
        by it (a corrected re-send); returns them."""
        me = self.frame(frame_id)
        if me is None:
            raise KeyError(f"no frame {frame_id!r} in {self.path}")
        with self.connect(write=True) as conn:
            rows = _dicts(conn.execute(sa.select(frames).where(
                frames.c.filename == me["filename"], frames.c.frame_id != frame_id,
                frames.c.landed_at <= me["landed_at"],
                frames.c.status.in_((DONE, FAILED, QUARANTINED)))))
            now = isotime()
            for row in rows:
                conn.execute(sa.update(frames).where(frames.c.frame_id == row["frame_id"]).values(
                    status=SUPERSEDED.value,
                    error=f"superseded by frame {frame_id} (same file name, new content; "
                          f"was {row['status']})",
                    updated_at=now))
        return rows

    def overdue(self, *, run_id: str | None = None, now: dt.datetime | None = None) -> list[dict[str, Any]]:
        """Unfinished frames past their deadline and not yet flagged."""
        query = sa.select(frames).where(
            frames.c.finished_at.is_(None), frames.c.deadline_missed == 0,
            frames.c.deadline_at.is_not(None), frames.c.deadline_at < isotime(now),
            frames.c.status.in_(OPEN_STATUSES))
        if run_id is not None:
            query = query.where(frames.c.run_id == run_id)
        with self.connect() as conn:
            return _dicts(conn.execute(query))

    def record_alert(
        self, kind: str, message: str, *, frame_id: str | None = None, dag_id: str | None = None,
        run_id: str | None = None, detail: Mapping[str, Any] | None = None,
    ) -> int:
        with self.connect(write=True) as conn:
            if kind == "deadline_missed" and frame_id is not None:
                conn.execute(sa.update(frames).where(frames.c.frame_id == frame_id)
                             .values(deadline_missed=1, updated_at=isotime()))
            result = conn.execute(sa.insert(alerts_table).values(
                kind=kind, frame_id=frame_id, dag_id=dag_id, run_id=run_id,
                created_at=isotime(), message=message,
                detail=json.dumps(detail, default=str) if detail else None))
            return int(result.inserted_primary_key[0])

    def mark_alert_delivered(self, alert_id: int, how: str) -> None:
        with self.connect(write=True) as conn:
            conn.execute(sa.update(alerts_table).where(alerts_table.c.id == alert_id)
                         .values(delivered=how))

    def alerts(self, *, frame_id: str | None = None, kind: str | None = None) -> list[dict[str, Any]]:
        query = sa.select(alerts_table).order_by(alerts_table.c.id)
        if frame_id is not None:
            query = query.where(alerts_table.c.frame_id == frame_id)
        if kind is not None:
            query = query.where(alerts_table.c.kind == kind)
        with self.connect() as conn:
            return _dicts(conn.execute(query))

    # -- nightly calibrations ----------------------------------------------------------------
    def record_calibration(
        self, night: str, *, status: str, context: str | None = None,
        previous_context: str | None = None, masters: Any = None, qa: Any = None,
        dag_id: str | None = None, run_id: str | None = None,
    ) -> int:
        with self.connect(write=True) as conn:
            result = conn.execute(sa.insert(calibrations_table).values(
                night=night, context=context, previous_context=previous_context, status=status,
                created_at=isotime(), dag_id=dag_id, run_id=run_id, masters=_json_text(masters),
                qa=_json_text(qa)))
            return int(result.inserted_primary_key[0])

    def calibrations(self, night: str | None = None) -> list[dict[str, Any]]:
        with self.reader() as r:
            return r.calibrations(night or None)

    def record_calibration_decision(
        self, night: str, *, decision: str, decided_by: str | None = None, how: str | None = None,
        reason: str | None = None, offered: Any = None, approved: Any = None,
        calibration_id: int | None = None, document: str | None = None,
        dag_id: str | None = None, run_id: str | None = None,
    ) -> int:
        """One approval or rejection of a night's masters (see ``calibration_decisions``)."""
        with self.connect(write=True) as conn:
            result = conn.execute(sa.insert(calibration_decisions).values(
                night=night, calibration_id=calibration_id, decision=decision,
                decided_by=decided_by, how=how, reason=reason, offered=_json_text(offered),
                approved=_json_text(approved), document=document, decided_at=isotime(),
                dag_id=dag_id, run_id=run_id))
            return int(result.inserted_primary_key[0])

    def calibration_decisions(self, night: str | None = None) -> list[dict[str, Any]]:
        with self.reader() as r:
            return r.calibration_decisions(night or None)

    # -- export -----------------------------------------------------------------------------
    def snapshot(self, frame_id: str | None = None) -> dict[str, Any]:
        """Everything about one frame (or all frames) as JSON-ready dicts, for the CLI/UI."""
        rows = [self.frame(frame_id)] if frame_id else self.frames()
        out = []
        for fr in rows:
            if fr is None:
                continue
            out.append({**fr, "stages": self.stages(fr["frame_id"]),
                        "products": self.products(fr["frame_id"]),
                        "flexure": self.flexure(fr["frame_id"]),
                        "alerts": self.alerts(frame_id=fr["frame_id"])})
        return {"schema_version": SCHEMA_VERSION, "ledger": str(self.path), "frames": out}


_FRAME_COLUMNS = frozenset(c.name for c in frames.columns) - {"frame_id", "sha256", "duplicates"}


def _column(name: str) -> str:
    if name not in _FRAME_COLUMNS:
        raise ValueError(f"unknown frames column {name!r}")
    return name


def open_ledger(path: str | os.PathLike[str] | None = None) -> FrameLedger:
    """The ledger at ``path`` (a SQLite file or a database URL), default from the environment:
    ``IRIS_LEDGER_URL`` if set, else ``<IRIS_STATE_DIR>/ledger.sqlite``."""
    if path is None:
        from ..config import settings

        path = settings().ledger_path
    return FrameLedger(path)
