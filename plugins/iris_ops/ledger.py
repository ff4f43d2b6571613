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
from pathlib import Path
from typing import Any

from iris_tasks.orchestration.ledger import (
    FrameLedger,
    FrameStatus,
    LedgerConnectionError,
    LedgerMissing,
    Stage,
    StageStatus,
)

from .views import FrameRow, IgnoredRow, MasterRow, NightView, QuarantineRow

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
    sensing = max(0.0, (seen - landed).total_seconds()) if (seen and landed) else 0.0
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


def load_night(ledger_path: str | os.PathLike[str], night: str | None = None,
               quarantine_dir: str | os.PathLike[str] | None = None,
               work_dir: str | os.PathLike[str] | None = None) -> NightView:
    """The night ``night`` (default: the most recent night in the ledger) from the ledger at
    ``ledger_path``: a SQLite file or a PostgreSQL URL. ``work_dir`` (the DAGs' work area)
    lets masters that failed QA - they have no report in the ledger, their ``qa`` task
    failed - show up too."""
    ledger = FrameLedger(ledger_path, readonly=True)
    source = str(ledger.path)
    try:
        with ledger.reader() as reader:
            nights = reader.nights()
            if night is None and nights:
                night = nights[0]
            rows = reader.frames_of_night(night)
            # Frames that failed before classification have no night yet: show them with the
            # newest night so an operator sees them at all.
            if night is not None and nights and night == nights[0]:
                rows += reader.frames_of_night(None)
            ids = [r["frame_id"] for r in rows]
            stages = reader.stages_of(ids)
            products = reader.products_of(ids, current_only=True)
            seen = reader.first_seen(ids)
            cals = reader.calibrations(night) if night is not None else []
            ignored = [IgnoredRow(name=r["name"], reason=r["reason"], size=r["size"],
                                  since=r["first_seen"], uri=r["source_uri"])
                       for r in reader.ignored()]
    except LedgerMissing as exc:
        return NightView(night=night, source=source, problem=str(exc))
    except LedgerConnectionError as exc:
        log.warning("%s", exc)
        return NightView(night=night, source=source, problem=f"no ledger yet: {exc}")

    frames = [_frame_row(r, stages.get(r["frame_id"], []), products.get(r["frame_id"], []),
                         seen.get(r["frame_id"])) for r in rows]
    quarantine = [
        QuarantineRow(filename=f.filename, reason=_reason(f.error), detail=_detail(f.error),
                      at=r.get("finished_at") or r.get("updated_at"), frame_id=f.frame_id)
        for f, r in zip(frames, rows, strict=True) if f.status == FrameStatus.QUARANTINED
    ]
    if quarantine_dir:
        _add_reason_files(quarantine, Path(quarantine_dir))
    masters = _masters(cals)
    if work_dir and night:
        _add_unreported_masters(masters, Path(work_dir) / "nightly" / night / "masters", night, cals)
    return NightView(night=night, nights=nights, frames=frames, masters=masters,
                     quarantine=quarantine, ignored=ignored, source=source)


def load_night_from_env(night: str | None = None) -> NightView:
    """The night from the ledger that the IRIS_* environment points at (as the DAGs do):
    IRIS_LEDGER_URL when set, else the SQLite file under IRIS_STATE_DIR."""
    from iris_tasks.config import settings

    s = settings()
    return load_night(s.ledger_path, night, quarantine_dir=s.quarantine_dir, work_dir=s.work_dir)


# ------------------------------------------------------------------------------ helpers
def _frame_row(r: dict[str, Any], stages: list[dict[str, Any]], products: list[dict[str, Any]],
               seen_at: str | None) -> FrameRow:
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
    return FrameRow(
        frame_id=r["frame_id"],
        filename=r["filename"],
        night=r.get("night") or "",
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
