"""The frame ledger: one SQLite file recording what happened to every raw frame.

It is the memory the DAGs share with each other and with operators: the landing trigger
records arrivals, the real-time DAG claims frames by content hash (so a duplicate arrival is
recognised and not processed twice) and times every stage, ingest records product keys, the
deadline checks record misses, the nightly DAG finds the night's calibration frames here and
the reprocessing DAG finds the frames a new CRDS context affects. The operations UI reads the
same file (schema: docs/airflow.md, "Frame ledger"; ``SCHEMA_VERSION`` below).

SQLite in WAL mode with a busy timeout lets parallel task processes write safely; each call
opens its own short connection, so a ledger object can be shared freely. Times are ISO 8601
UTC strings with millisecond precision (``2026-11-24T07:15:02.120+00:00``).
"""

from __future__ import annotations

import contextlib
import datetime as dt
import json
import logging
import os
import sqlite3
from collections.abc import Iterable, Iterator, Mapping
from pathlib import Path
from typing import Any

log = logging.getLogger(__name__)

SCHEMA_VERSION = 1

# Frame status values, in the order a frame normally goes through them.
LANDED, CLAIMED, PROCESSING, DONE = "landed", "claimed", "processing", "done"
QUARANTINED, FAILED = "quarantined", "failed"
STATUSES = (CLAIMED, PROCESSING, DONE, QUARANTINED, FAILED)

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
    """Access to the ledger file at ``path`` (created on first use)."""

    def __init__(self, path: str | os.PathLike[str]):
        self.path = Path(path)
        self._ready = False

    def __repr__(self) -> str:
        return f"FrameLedger({str(self.path)!r})"

    # -- plumbing ---------------------------------------------------------------------------
    @contextlib.contextmanager
    def connect(self, *, write: bool = False) -> Iterator[sqlite3.Connection]:
        """A connection in a transaction; ``write=True`` takes the write lock up front
        (BEGIN IMMEDIATE) so read-then-write sequences such as a claim are atomic."""
        if not self._ready:
            self._init()
        conn = sqlite3.connect(self.path, timeout=60.0, isolation_level=None)
        conn.row_factory = sqlite3.Row
        try:
            conn.execute("PRAGMA busy_timeout = 60000")
            conn.execute("BEGIN IMMEDIATE" if write else "BEGIN")
            try:
                yield conn
            except BaseException:
                conn.execute("ROLLBACK")
                raise
            conn.execute("COMMIT")
        finally:
            conn.close()

    def _init(self) -> None:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        conn = sqlite3.connect(self.path, timeout=60.0)
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
        finally:
            conn.close()
        self._ready = True

    @staticmethod
    def _row(row: sqlite3.Row | None) -> dict[str, Any] | None:
        return dict(row) if row is not None else None

    # -- arrivals ---------------------------------------------------------------------------
    def record_arrival(
        self, source_uri: str, size: int, mtime: float, *, etag: str | None = None,
        seen_by: str = "scan", seen_at: str | None = None,
    ) -> dict[str, Any]:
        """Record that ``source_uri`` (with this size/mtime) is in the landing area; return the
        arrival row (the existing one if this exact version was seen before)."""
        with self.connect(write=True) as conn:
            conn.execute(
                "INSERT OR IGNORE INTO arrivals (source_uri, size, mtime, etag, seen_at, seen_by) "
                "VALUES (?, ?, ?, ?, ?, ?)",
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
            cur = conn.execute(
                "UPDATE arrivals SET claimed_by = ?, claimed_at = ? WHERE id = ? AND outcome IS NULL "
                "AND (claimed_by IS NULL OR claimed_by = ?)",
                (claimer, isotime(), arrival_id, claimer),
            )
            return cur.rowcount == 1

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
        with self.connect(write=True) as conn:
            row = conn.execute("SELECT * FROM frames WHERE sha256 = ?", (sha256,)).fetchone()
            if row is None:
                conn.execute(
                    "INSERT INTO frames (frame_id, sha256, filename, source_uri, landed_at, "
                    "claimed_at, status, dag_id, run_id, updated_at) "
                    "VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
                    (fid, sha256, filename, source_uri, landed_at, now, CLAIMED, dag_id, run_id, now),
                )
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
            frame = conn.execute("SELECT * FROM frames WHERE sha256 = ?", (sha256,)).fetchone()
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
            cur = conn.execute(
                "INSERT INTO stages (frame_id, stage, status, started_at, dag_id, run_id, try_number) "
                "VALUES (?, ?, 'running', ?, ?, ?, ?)",
                (frame_id, stage, isotime(), dag_id, run_id, try_number),
            )
            return int(cur.lastrowid)

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
            row = conn.execute("SELECT * FROM frames WHERE frame_id = ?", (frame_id,)).fetchone()
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
            cur = conn.execute(
                "INSERT INTO alerts (kind, frame_id, dag_id, run_id, created_at, message, detail) "
                "VALUES (?, ?, ?, ?, ?, ?, ?)",
                (kind, frame_id, dag_id, run_id, isotime(), message,
                 json.dumps(detail, default=str) if detail else None),
            )
            return int(cur.lastrowid)

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
            cur = conn.execute(
                "INSERT INTO calibrations (night, context, previous_context, status, created_at, "
                "dag_id, run_id, masters, qa) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?)",
                (night, context, previous_context, status, isotime(), dag_id, run_id,
                 json.dumps(masters, default=str) if masters is not None else None,
                 json.dumps(qa, default=str) if qa is not None else None),
            )
            return int(cur.lastrowid)

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
    """The ledger at ``path``, default ``<IRIS_STATE_DIR>/ledger.sqlite``."""
    if path is None:
        from .config import settings

        path = settings().ledger_path
    return FrameLedger(path)
