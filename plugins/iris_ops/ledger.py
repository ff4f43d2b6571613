"""Read the frame ledger (iris_tasks.orchestration.ledger, schema in docs/airflow.md) into a
:class:`~iris_ops.views.NightView`, through the ledger's own read-only reader
(:class:`~iris_tasks.orchestration.ledger.LedgerReader`): a SQLite file opened with
``mode=ro``, or a PostgreSQL ledger (a ``postgresql://`` URL, as IRIS_LEDGER_URL gives it) in
READ ONLY transactions. A missing ledger - no file, no tables, or a database that cannot be
reached - is reported on the page, never created.

Latency breakdown of one frame, landing -> ingested (they add up to ``latency_seconds``):

``sensing``   landed_at -> the landing trigger saw the file (arrivals.seen_at)
``compute``   time inside the processing stages (every stage but ingest)
``ingest``    time inside the ingest stage (upload + checksums)
``queueing``  the rest: waiting for the scheduler, a free executor slot, task start-up
"""

from __future__ import annotations

import datetime as dt
import json
import logging
import os
import re
import sqlite3
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import sqlalchemy as sa

from iris_tasks import metadata
from iris_tasks.orchestration.ledger import (
    FrameLedger,
    FrameStatus,
    LedgerConnectionError,
    LedgerMissing,
    LedgerReader,
    Stage,
    StageStatus,
    calibrations_table,
    isotime,
)
from iris_tasks.orchestration.ledger import frames as frames_table

from .views import FrameRow, IgnoredRow, MasterRow, NightView, QuarantineRow, TimelinePage

log = logging.getLogger(__name__)

REALTIME_DAG = "iris_realtime"
# The ledger's stages of iris_realtime and the task each runs in (classification runs in the
# claim task, everything else in the frame's one task).
REALTIME_STAGES = {
    Stage.CLASSIFY: "claim",
    Stage.READOUT: "frame",
    Stage.REDUCE: "frame",
    Stage.QUICKLOOK: "frame",
    Stage.EARLY_UPLOAD: "frame",
    Stage.ARCHIVE: "frame",
    Stage.INGEST: "frame",
}
INGEST_STAGES = {Stage.INGEST, Stage.REPROCESS_INGEST}
# The uploads that run beside the processing rather than after it (the raw archive, the early
# upload of the rate product): their time is not compute time, and it overlaps the rest.
NON_COMPUTE_STAGES = {Stage.ARCHIVE, Stage.EARLY_UPLOAD}
# Stage statuses whose duration counts (a running stage has none, a skipped one did no work).
_TIMED = {StageStatus.SUCCESS, StageStatus.FAILED}


def _t(text: str | None) -> dt.datetime | None:
    if not text:
        return None
    when = dt.datetime.fromisoformat(text)
    return when if when.tzinfo else when.replace(tzinfo=dt.UTC)


def _json(text: str | None) -> Any:
    if not text:
        return None
    try:
        return json.loads(text)
    except ValueError:
        return text


def connect_ro(path: str | os.PathLike[str]) -> sqlite3.Connection:
    """A raw read-only sqlite3 connection to a SQLite ledger file, for tools that need the file
    itself (bench/bench_latency.py backs it up). The page reads through the ledger's reader."""
    conn = sqlite3.connect(f"file:{Path(path).resolve()}?mode=ro", uri=True, timeout=10.0)
    conn.row_factory = sqlite3.Row
    conn.execute("PRAGMA busy_timeout = 10000")
    return conn


def breakdown(frame: dict[str, Any], stages: Iterable[dict[str, Any]],
              seen_at: str | None) -> dict[str, float]:
    """sensing/queueing/compute/ingest seconds for one finished frame (empty if unfinished)."""
    latency = frame.get("latency_seconds")
    if latency is None:
        return {}
    landed = _t(frame.get("landed_at"))
    seen = _t(seen_at) or _t(frame.get("claimed_at"))
    # At most the latency: a frame claimed again after it was done (a re-send) has a later
    # claim time; the four parts add up to the latency.
    sensing = min(latency, max(0.0, (seen - landed).total_seconds())) if (seen and landed) else 0.0
    compute = ingest = 0.0
    for st in stages:
        dur = st.get("duration_seconds")
        if dur is None or st.get("status") not in _TIMED:
            continue
        name = str(st.get("stage", "")).lower()
        if name in INGEST_STAGES:
            ingest += dur
        elif name not in NON_COMPUTE_STAGES:
            compute += dur
    queueing = max(0.0, latency - sensing - compute - ingest)
    return {"sensing": round(sensing, 3), "queueing": round(queueing, 3),
            "compute": round(compute, 3), "ingest": round(ingest, 3)}


def _is_png(p: dict[str, Any]) -> bool:
    kind = str(p.get("kind") or "").lower()
    ref = str(p.get("path") or p.get("key") or "").lower()
    return ref.endswith(".png") or "ql" in kind or "quicklook" in kind


def _png_ref(p: dict[str, Any]) -> str | None:
    # Prefer the local file (served directly) over the object key (served from the store).
    path = p.get("path")
    if path and Path(path).is_file():
        return str(path)
    return p.get("key") or path


def landing_night(landed_at: str) -> str:
    """The observing night an instant (ISO-8601 UTC) falls in, as the header's night would be
    named (local date at the start of the night, :func:`iris_tasks.metadata.observing_night`)."""
    when = _t(landed_at)
    return metadata.observing_night(when.strftime("%Y-%m-%d"), when.strftime("%H:%M:%S"))


def _shift(night: str, days: int) -> str:
    return (dt.date.fromisoformat(night) + dt.timedelta(days=days)).isoformat()


def landing_window(night: str) -> tuple[str, str]:
    """[start, end) of the landing times (ISO-8601 UTC, the ledger's format) of ``night``:
    from local noon of its date to local noon of the next."""
    start = (dt.datetime.fromisoformat(night).replace(tzinfo=dt.UTC)
             + dt.timedelta(hours=12 - metadata.SITE_UTC_OFFSET_HOURS))
    return isotime(start), isotime(start + dt.timedelta(days=1))


def attributed_night(frame: dict[str, Any]) -> tuple[str, str]:
    """(night, source) under which the page lists a ledger frame row.

    The header's night (``source`` "header") when the frame has one, was not quarantined and
    lies within one night of its landing; otherwise the night it landed in ("landing"): a
    quarantined frame's header is what could not be trusted (a 1999 DATE-OBS from a reset
    clock), and a frame without a night failed before classification. So such a frame stays
    under the night it arrived in, whatever night is newest. :func:`night_clause` is the same
    rule in SQL."""
    landed = landing_night(frame["landed_at"])
    header = frame.get("night")
    if header and frame.get("status") != FrameStatus.QUARANTINED:
        try:
            skew = abs((dt.date.fromisoformat(header) - dt.date.fromisoformat(landed)).days)
        except ValueError:
            skew = None
        if skew is not None and skew <= MAX_NIGHT_SKEW_DAYS:
            return header, "header"
    return landed, "landing"


# A header night up to this many nights from the landing night is believed (a frame re-sent
# the next day); further off, the frame is listed under the night it landed in.
MAX_NIGHT_SKEW_DAYS = 1


def night_clause(night: str) -> Any:
    """SQL condition: the frames :func:`attributed_night` lists under ``night``."""
    lo, hi = landing_window(night)
    before, after = _shift(night, -MAX_NIGHT_SKEW_DAYS), _shift(night, MAX_NIGHT_SKEW_DAYS)
    header = sa.and_(frames_table.c.night == night,
                     frames_table.c.status != FrameStatus.QUARANTINED.value,
                     frames_table.c.landed_at >= landing_window(before)[0],
                     frames_table.c.landed_at < landing_window(after)[1])
    landed = sa.and_(frames_table.c.landed_at >= lo, frames_table.c.landed_at < hi,
                     sa.or_(frames_table.c.night.is_(None),
                            frames_table.c.status == FrameStatus.QUARANTINED.value,
                            frames_table.c.night < before, frames_table.c.night > after))
    return sa.or_(header, landed)


def attributed_nights(reader: LedgerReader) -> list[str]:
    """Every night the page lists frames (by :func:`attributed_night`) or calibrations
    under, newest first."""
    conn = reader.conn
    hour = sa.func.substr(frames_table.c.landed_at, 1, 13)  # "YYYY-MM-DDTHH": nights change on the hour
    found = set()
    for night, landed_hour, status in conn.execute(
            sa.select(frames_table.c.night, hour, frames_table.c.status).distinct()):
        found.add(attributed_night({"night": night, "status": status,
                                    "landed_at": f"{landed_hour}:00:00+00:00"})[0])
    found.update(n for (n,) in conn.execute(sa.select(calibrations_table.c.night).distinct()) if n)
    return sorted(found, reverse=True)


# Columns for the night's tiles and quarantine list: no stages, products or quicklooks.
_LIGHT = ("frame_id", "filename", "night", "detector", "obsname", "obstype", "status", "landed_at",
          "finished_at", "updated_at", "latency_seconds", "deadline_seconds", "deadline_missed",
          "error", "raw_path")
TIMELINE_STATUSES = ("missed",)  # pseudo-status for the filter: the deadline was missed


@dataclass(frozen=True)
class TimelineQuery:
    """What the live timeline shows: filters (None: all) and the page, newest first."""

    detector: str | None = None
    obsname: str | None = None
    status: str | None = None  # a FrameStatus value, or "missed"
    page: int = 1
    per_page: int = 50

    def where(self) -> list[Any]:
        out = []
        if self.detector:
            out.append(frames_table.c.detector == self.detector)
        if self.obsname:
            out.append(frames_table.c.obsname == self.obsname)
        if self.status == "missed":
            out.append(frames_table.c.deadline_missed == 1)
        elif self.status:
            out.append(frames_table.c.status == self.status)
        return out

    def filters(self) -> dict[str, str]:
        return {k: v for k, v in (("detector", self.detector), ("obsname", self.obsname),
                                  ("status", self.status)) if v}


def timeline(reader: LedgerReader, night: str, query: TimelineQuery) -> tuple[list[dict[str, Any]], int]:
    """One page of ``night``'s frames matching ``query``, newest landing first, and how many
    match in all."""
    base = sa.select(frames_table).where(night_clause(night), *query.where())
    total = reader.conn.execute(sa.select(sa.func.count()).select_from(base.subquery())).scalar_one()
    page = max(1, query.page)
    rows = _rows(reader.conn.execute(
        base.order_by(frames_table.c.landed_at.desc(), frames_table.c.frame_id.desc())
        .limit(query.per_page).offset((page - 1) * query.per_page)))
    return rows, int(total)


def night_frames(reader: LedgerReader, night: str, *, light: bool = False) -> list[dict[str, Any]]:
    """Every frame :func:`attributed_night` lists under ``night``, oldest landing first
    (``light``: the columns of the tiles and the quarantine list only)."""
    cols = [frames_table.c[c] for c in _LIGHT] if light else [frames_table]
    return _rows(reader.conn.execute(
        sa.select(*cols).where(night_clause(night))
        .order_by(frames_table.c.landed_at, frames_table.c.frame_id)))


def frame_by_id(reader: LedgerReader, frame_id: str) -> dict[str, Any] | None:
    rows = reader.frames_by_id([frame_id])
    return rows[0] if rows else None


def work_in_progress(reader: LedgerReader, now: dt.datetime, *,
                     window: dt.timedelta = dt.timedelta(hours=12)) -> tuple[str | None, str | None]:
    """(finished_at of the newest frame done, landed_at of the oldest frame still open that
    landed within ``window`` of ``now``) over the whole ledger: the age of the last processed
    frame, and whether work is waiting behind it. Older open frames are for the night's page,
    not the alarm (their runs ended and left them open: the page lists them)."""
    conn = reader.conn
    last_done = conn.execute(sa.select(sa.func.max(frames_table.c.finished_at))
                             .where(frames_table.c.status == FrameStatus.DONE.value)).scalar()
    oldest_open = conn.execute(
        sa.select(sa.func.min(frames_table.c.landed_at))
        .where(frames_table.c.status.in_([s.value for s in FrameStatus if s.is_open]),
               frames_table.c.landed_at >= isotime(now - window))).scalar()
    return last_done, oldest_open


def _rows(result: Any) -> list[dict[str, Any]]:
    return [dict(m) for m in result.mappings()]


def load_night(ledger_path: str | os.PathLike[str], night: str | None = None,
               quarantine_dir: str | os.PathLike[str] | None = None,
               work_dir: str | os.PathLike[str] | None = None, *,
               query: TimelineQuery | None = None, now: dt.datetime | None = None) -> NightView:
    """The night ``night`` (default: the most recent night in the ledger) from the ledger at
    ``ledger_path``: a SQLite file or a PostgreSQL URL. ``work_dir`` (the DAGs' work area)
    lets masters that failed QA - they have no report in the ledger, their ``qa`` task
    failed - show up too.

    Frames are listed under :func:`attributed_night`. Without ``query`` the view's frames are
    the whole night (the grouped view); with one, one page of the live timeline (newest
    first, filtered), and the whole night's tiles come from light rows."""
    now = now or dt.datetime.now(dt.UTC)
    ledger = FrameLedger(ledger_path, readonly=True)
    source = str(ledger.path)
    try:
        with ledger.reader() as reader:
            nights = attributed_nights(reader)
            if night is None and nights:
                night = nights[0]
            page: TimelinePage | None = None
            stats_rows: list[dict[str, Any]] | None = None
            if night is None:
                rows = []
            elif query is None:
                rows = night_frames(reader, night)
            else:
                rows, total = timeline(reader, night, query)
                stats_rows = night_frames(reader, night, light=True)
                page = TimelinePage(total=total, page=max(1, query.page), per_page=query.per_page,
                                    filters=query.filters(), choices=_choices(stats_rows))
            ids = [r["frame_id"] for r in rows]
            stages = reader.stages_of(ids)
            products = reader.products_of(ids, current_only=True)
            seen = reader.first_seen(ids)
            flexure = reader.flexure_of(ids)
            cals = reader.calibrations(night) if night is not None else []
            ignored = [IgnoredRow(name=r["name"], reason=r["reason"], size=r["size"],
                                  since=r["first_seen"], uri=r["source_uri"])
                       for r in reader.ignored()]
            last_done, open_since = work_in_progress(reader, now)
    except LedgerMissing as exc:
        return NightView(night=night, source=source, problem=str(exc))
    except LedgerConnectionError as exc:
        log.warning("%s", exc)
        return NightView(night=night, source=source, problem=f"no ledger yet: {exc}")

    frames = [_frame_row(r, stages.get(r["frame_id"], []), products.get(r["frame_id"], []),
                         seen.get(r["frame_id"]), flexure.get(r["frame_id"])) for r in rows]
    stats = None if stats_rows is None else [_light_row(r) for r in stats_rows]
    every = frames if stats is None else stats
    quarantine = [
        QuarantineRow(filename=f.filename, reason=_reason(f.error), detail=_detail(f.error),
                      at=f.ingested_at or r.get("updated_at"), frame_id=f.frame_id,
                      landed_at=f.landed_at, header_night=f.header_night)
        for f, r in zip(every, rows if stats_rows is None else stats_rows, strict=True)
        if f.status == FrameStatus.QUARANTINED
    ]
    if quarantine_dir:
        _add_reason_files(quarantine, Path(quarantine_dir))
    masters = _masters(cals)
    if work_dir and night:
        _add_unreported_masters(masters, Path(work_dir) / "nightly" / night / "masters", night, cals)
    if page is not None:
        page.frames = frames
    return NightView(night=night, nights=nights, frames=frames, masters=masters,
                     quarantine=quarantine, ignored=ignored, source=source, timeline=page,
                     stats=stats, last_done_at=last_done, open_since=open_since)


def load_frame(ledger_path: str | os.PathLike[str], frame_id: str) -> FrameRow | None:
    """One frame of the ledger, with its stages and products (for its quicklooks)."""
    ledger = FrameLedger(ledger_path, readonly=True)
    with ledger.reader() as reader:
        row = frame_by_id(reader, frame_id)
        if row is None:
            return None
        return _frame_row(row, reader.stages_of([frame_id]).get(frame_id, []),
                          reader.products_of([frame_id]).get(frame_id, []),
                          reader.first_seen([frame_id]).get(frame_id),
                          reader.flexure_of([frame_id]).get(frame_id))


def _choices(rows: list[dict[str, Any]]) -> dict[str, list[str]]:
    """The filter values present in the night (statuses in the ledger's order)."""
    present = {r["status"] for r in rows}
    statuses = [s.value for s in FrameStatus if s.value in present]
    statuses += sorted(present - set(statuses) - {None})
    if any(r.get("deadline_missed") for r in rows):
        statuses += list(TIMELINE_STATUSES)
    return {"detector": sorted({r["detector"] for r in rows if r.get("detector")}),
            "obsname": sorted({r["obsname"] for r in rows if r.get("obsname")}),
            "status": statuses}


def _other_night(header: str | None, listed: str) -> str | None:
    """The header's night when it is not the one the frame is listed under ("" for none)."""
    return None if header == listed else (header or "")


def _light_row(r: dict[str, Any]) -> FrameRow:
    night, source = attributed_night(r)
    return FrameRow(frame_id=r["frame_id"], filename=r["filename"], night=night,
                    detector=r.get("detector") or "", obsname=r.get("obsname") or "",
                    obstype=r.get("obstype") or "", status=r.get("status") or "",
                    landed_at=r.get("landed_at"), ingested_at=r.get("finished_at"),
                    latency_s=r.get("latency_seconds"), deadline_s=r.get("deadline_seconds"),
                    deadline_missed=bool(r.get("deadline_missed")), raw_path=r.get("raw_path"),
                    error=r.get("error"), night_source=source,
                    header_night=_other_night(r.get("night"), night))


def load_night_from_env(night: str | None = None, query: TimelineQuery | None = None) -> NightView:
    """The night from the ledger that the IRIS_* environment points at (as the DAGs do):
    IRIS_LEDGER_URL when set, else the SQLite file under IRIS_STATE_DIR."""
    from iris_tasks.config import settings

    s = settings()
    return load_night(s.ledger_path, night, quarantine_dir=s.quarantine_dir, work_dir=s.work_dir,
                      query=query)


# ------------------------------------------------------------------------------ helpers
def flexure_text(row: dict[str, Any] | None) -> str | None:
    """One line for an IFS frame's flexure row: the offsets applied, with their errors, what
    measured them and, for a prior, where it came from."""
    if not row:
        return None

    def axis(name: str) -> str:
        err = row.get(f"{name}_err")
        got = f"{name} {row[name]:+.3f}" + (f" ± {err:.3f}" if err else "")
        prior = f"PRIOR{name[1].upper()}" in str(row["method"]).split("+")
        return got if row.get(f"{name}_measured") or prior else f"{got} (not measured)"

    text = f"flexure {axis('dx')}, {axis('dy')} px [{row['method']}]"
    return f"{text} prior: {row['source']}" if row.get("source") else text


def _frame_row(r: dict[str, Any], stages: list[dict[str, Any]], products: list[dict[str, Any]],
               seen_at: str | None, flexure: dict[str, Any] | None = None) -> FrameRow:
    pngs = [p for p in products if _is_png(p)]
    ql_raw = next((_png_ref(p) for p in pngs if "raw" in str(p["kind"]).lower()), None)
    ql_red = next((_png_ref(p) for p in reversed(pngs) if "raw" not in str(p["kind"]).lower()), None)
    raw = next((p for p in products if str(p["kind"]).lower() == "raw"), None)
    keys = [p["key"] for p in products if p.get("key") and p is not raw and not _is_png(p)]
    # Link the task of the failed stage, else of the last stage: in iris_realtime every stage
    # is one task of the mapped group "frame" (the UI's mapped-instance list is labelled with
    # the file name, since the ledger does not know the map index).
    failed = [s for s in stages if s.get("status") == StageStatus.FAILED]
    last_stage = next((s for s in reversed(failed or stages) if s.get("dag_id") and s.get("run_id")), None)
    task_id = None
    map_index = None
    mapped = False
    if last_stage:
        detail = _json(last_stage.get("detail")) or {}
        if isinstance(detail, dict) and detail.get("task_id"):
            task_id, map_index = detail.get("task_id"), detail.get("map_index")
        elif last_stage.get("dag_id") == REALTIME_DAG and last_stage.get("stage") in REALTIME_STAGES:
            task_id, mapped = REALTIME_STAGES[last_stage["stage"]], True
    night, source = attributed_night(r)
    return FrameRow(
        frame_id=r["frame_id"],
        filename=r["filename"],
        night=night,
        night_source=source,
        header_night=_other_night(r.get("night"), night),
        detector=r.get("detector") or "",
        obsname=r.get("obsname") or "",
        obstype=r.get("obstype") or "",
        status=r.get("status") or "",
        landed_at=r.get("landed_at"),
        ingested_at=r.get("finished_at"),
        latency_s=r.get("latency_seconds"),
        deadline_s=r.get("deadline_seconds"),
        deadline_missed=bool(r.get("deadline_missed")),
        breakdown=breakdown(r, stages, seen_at),
        dag_id=r.get("dag_id"),
        run_id=r.get("run_id"),
        task_id=task_id,
        map_index=map_index,
        mapped=mapped,
        raw_key=raw.get("key") if raw else None,
        product_keys=keys,
        ql_raw=ql_raw,
        ql_reduced=ql_red,
        raw_path=r.get("raw_path"),
        error=r.get("error"),
        flexure=flexure_text(flexure),
    )


# The real-time chain writes "quarantined (<reason>): <problems>"; older ledgers hold
# "quarantined: <keyword>: <message>".
_QUARANTINE_ERROR = re.compile(r"^quarantined\s*\((?P<reason>[^)]*)\)\s*:\s*(?P<detail>.*)$",
                               re.IGNORECASE | re.DOTALL)


def _strip_prefix(error: str | None) -> str:
    text = str(error or "").strip()
    return text[len("quarantined:"):].strip() if text.lower().startswith("quarantined:") else text


def _reason(error: str | None) -> str:
    data = _json(error)
    if isinstance(data, dict):
        return str(data.get("reason") or data.get("error") or data)
    m = _QUARANTINE_ERROR.match(str(error or "").strip())
    if m:
        return m["reason"].strip() or "unknown"
    return (_strip_prefix(error).split(":", 1)[0]).strip() or "unknown"


def _detail(error: str | None) -> str:
    data = _json(error)
    if isinstance(data, dict):
        return str(data.get("detail") or data.get("message") or "")
    m = _QUARANTINE_ERROR.match(str(error or "").strip())
    if m:
        return m["detail"].strip()
    text = _strip_prefix(error)
    return text.split(":", 1)[1].strip() if ":" in text else ""


def _add_reason_files(rows: list[QuarantineRow], qdir: Path) -> None:
    """Attach the quarantine location (and the reason.json text when the ledger has none)."""
    if not qdir.is_dir():
        return
    by_id = {r.frame_id: r for r in rows if r.frame_id}
    by_name = {r.filename: r for r in rows}
    for reason_file in qdir.rglob("reason.json"):
        try:
            data = json.loads(reason_file.read_text())
        except (OSError, ValueError):
            continue
        if not isinstance(data, dict):
            continue
        name = str(data.get("filename") or data.get("file") or "")
        row = by_id.get(str(data.get("frame_id"))) or by_name.get(name) or by_name.get(Path(name).name)
        if row is None:
            continue
        # reason.json (written by the real-time chain) is the authoritative, structured record.
        row.location = str(reason_file.parent)
        if data.get("reason"):
            row.reason = str(data["reason"])
        problems = data.get("problems")
        if isinstance(problems, list) and problems:
            row.detail = "; ".join(
                f"{p.get('keyword')}: {p.get('message')}" if isinstance(p, dict) else str(p)
                for p in problems)
        elif data.get("detail"):
            row.detail = str(data["detail"])


def _masters(cals: list[dict[str, Any]]) -> list[MasterRow]:
    """One row per master QA'd in the night's calibration runs (the newest run wins).

    ``calibrations.qa`` holds the QA reports (``master`` path, ``reftype``, ``metrics``,
    ``failed``, ``passed``); ``calibrations.masters`` the paths that were published."""
    out: dict[str, MasterRow] = {}
    for cal in cals:
        published = {str(m) for m in (_json(cal.get("masters")) or []) if isinstance(m, str)}
        reports = _json(cal.get("qa")) or []
        if isinstance(reports, dict):
            reports = list(reports.values())
        seen = set()
        for rep in reports:
            if not isinstance(rep, dict) or not rep.get("master"):
                continue
            path = str(rep["master"])
            seen.add(path)
            name = Path(path).name
            metrics = {k: v for k, v in (rep.get("metrics") or {}).items()
                       if isinstance(v, (int, float, str, bool))}
            passed = rep.get("passed")
            status = "published" if path in published else (
                "rejected" if passed is False else str(cal.get("status") or ""))
            out[name] = MasterRow(
                name=name, reftype=str(rep.get("reftype") or ""), detector=_header(path, "DETECTOR"),
                night=cal.get("night") or "", status=status,
                qa_passed=None if passed is None else bool(passed), qa=metrics,
                n_inputs=_int(_header(path, "NINPUTS") or _header(path, "NCOMBINE")),
                path=path, failed=[str(f) for f in rep.get("failed") or []],
                note=str(rep.get("note") or ""), dag_id=cal.get("dag_id"), run_id=cal.get("run_id"),
                key=rep.get("key"), task_id="qa", mapped=True,
            )
        for path in published - seen:  # published without a report (should not happen)
            name = Path(path).name
            out[name] = MasterRow(name=name, night=cal.get("night") or "", status="published",
                                  path=path, dag_id=cal.get("dag_id"), run_id=cal.get("run_id"))
    return list(out.values())


def _add_unreported_masters(rows: list[MasterRow], masters_dir: Path, night: str,
                            cals: list[dict[str, Any]]) -> None:
    """Masters built for the night but absent from every QA report: their QA task failed
    (QAError, metrics in its log) or has not run yet."""
    if not masters_dir.is_dir():
        return
    known = {r.name for r in rows}
    last = cals[-1] if cals else {}
    for path in sorted(masters_dir.glob("*.fits")):
        if path.name in known:
            continue
        rows.append(MasterRow(
            name=path.name, reftype=_header(str(path), "REFTYPE").lower(),
            detector=_header(str(path), "DETECTOR"), night=night,
            status="QA failed or pending" if last else "not QA'd yet", qa_passed=False if last else None,
            n_inputs=_int(_header(str(path), "NINPUTS") or _header(str(path), "NCOMBINE")),
            path=str(path), note="no QA report in the ledger: see the qa task log",
            dag_id=last.get("dag_id"), run_id=last.get("run_id"), task_id="qa", mapped=True,
        ))


def _header(path: str, keyword: str) -> str:
    """One primary-header keyword of a FITS file ('' when unreadable): cheap, no data read."""
    try:
        from astropy.io import fits

        return str(fits.getval(path, keyword, ext=0))
    except Exception:
        return ""


def _int(text: str) -> int | None:
    try:
        return int(text)
    except (TypeError, ValueError):
        return None


def load_frame_from_env(frame_id: str) -> FrameRow | None:
    """One frame of the ledger the IRIS_* environment points at."""
    from iris_tasks.config import settings

    return load_frame(settings().ledger_path, frame_id)
