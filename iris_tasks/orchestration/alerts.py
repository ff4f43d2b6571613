"""Deadline alerts: the real-time requirement is a reduced image 30 s and a reduced cube 60 s
after the raw frame lands.

Two paths lead here, both ending in :func:`deadline_missed` (log at ERROR, ledger ``alerts``
row + ``frames.deadline_missed = 1``, optional webhook):

* per frame, exactly: when a frame's chain finishes, :func:`check_frame` compares its finish
  time with ``landed_at + deadline`` (the ledger's ``deadline_at``);
* per DAG run, while it is still running: ``iris_realtime`` carries Airflow Deadline Alerts
  counted from when the run's frames landed (imager 30 s, IFS 60 s; the custom reference
  ``FramesLandedDeadline`` of :mod:`iris_tasks.orchestration.deadline_refs`) whose async callback
  :func:`realtime_run_deadline_missed` runs in the triggerer and flags every frame of that run
  that is past its own deadline and not finished (a stuck or slow frame is reported before it
  ends, and the miss also shows on the run in the Airflow UI).

Webhook: set ``IRIS_ALERT_WEBHOOK`` to a URL and each alert is POSTed as JSON
``{"text": "...", "alert": {...}}`` (the ``text`` field is what Slack/Mattermost-style incoming
webhooks display; mail gateways that accept JSON work the same way). Off by default; a failed
POST is logged and never fails the task.
"""

from __future__ import annotations

import asyncio
import datetime as dt
import json
import logging
import os
import urllib.request
from collections.abc import Mapping
from typing import Any

from ..config import ENV_ALERT_WEBHOOK
from .ledger import FrameLedger, isotime, open_ledger, parse_time

log = logging.getLogger(__name__)

DEADLINE_MISSED = "deadline_missed"


def notify(alert: Mapping[str, Any], *, webhook: str | None = None, timeout: float = 5.0) -> str | None:
    """POST ``alert`` to the configured webhook; return how it was delivered (None: not sent)."""
    url = webhook or os.environ.get(ENV_ALERT_WEBHOOK)
    if not url:
        return None
    body = json.dumps({"text": alert.get("message", ""), "alert": dict(alert)}, default=str).encode()
    req = urllib.request.Request(url, data=body, method="POST",
                                 headers={"Content-Type": "application/json"})
    try:
        with urllib.request.urlopen(req, timeout=timeout) as resp:  # noqa: S310 - operator-configured URL
            status = resp.status
    except Exception as exc:  # an alerting outage must not break data processing
        log.warning("alert webhook %s failed: %s", url, exc)
        return None
    return f"webhook:{status}"


def deadline_missed(
    frame: Mapping[str, Any], *, ledger: FrameLedger | None = None, now: dt.datetime | None = None,
    source: str = "frame", dag_id: str | None = None, run_id: str | None = None,
) -> dict[str, Any]:
    """Report one frame past its deadline; returns the alert record."""
    ledger = ledger or open_ledger()
    now = now or dt.datetime.now(dt.UTC)
    landed = parse_time(frame["landed_at"])
    finished = parse_time(frame["finished_at"]) if frame.get("finished_at") else None
    elapsed = ((finished or now) - landed).total_seconds()
    budget = frame.get("deadline_seconds")
    state = "finished" if finished else "still running"
    budget_text = f"; budget {budget:g} s" if budget is not None else ""
    message = (f"IRIS DRS deadline missed: frame {frame['frame_id']} ({frame.get('filename')}, "
               f"{frame.get('obsname') or '?'}) {state} {elapsed:.1f} s after landing{budget_text}")
    detail = {
        "frame_id": frame["frame_id"], "filename": frame.get("filename"),
        "obsname": frame.get("obsname"), "mode": frame.get("mode"),
        "landed_at": frame["landed_at"], "deadline_at": frame.get("deadline_at"),
        "finished_at": frame.get("finished_at"), "elapsed_seconds": round(elapsed, 3),
        "deadline_seconds": budget, "source": source, "checked_at": isotime(now),
    }
    log.error(message)
    alert_id = ledger.record_alert(DEADLINE_MISSED, message, frame_id=frame["frame_id"],
                                   dag_id=dag_id or frame.get("dag_id"),
                                   run_id=run_id or frame.get("run_id"), detail=detail)
    record = {"id": alert_id, "kind": DEADLINE_MISSED, "message": message, **detail}
    how = notify(record)
    if how:
        ledger.mark_alert_delivered(alert_id, how)
    return record


def check_frame(frame: Mapping[str, Any], *, ledger: FrameLedger | None = None) -> dict[str, Any] | None:
    """After :meth:`FrameLedger.finish`: alert if the finished frame missed its deadline and
    no alert was raised for it yet. Returns the alert or None."""
    if not frame.get("deadline_missed"):
        return None
    ledger = ledger or open_ledger()
    if any(a["kind"] == DEADLINE_MISSED for a in ledger.alerts(frame_id=frame["frame_id"])):
        return None  # the run-level check already reported it while it was running
    return deadline_missed(frame, ledger=ledger, source="frame")


def check_overdue(*, run_id: str | None = None, dag_id: str | None = None,
                  ledger: FrameLedger | None = None, now: dt.datetime | None = None) -> list[dict[str, Any]]:
    """Alert for every unfinished frame (of ``run_id``, or all) already past its deadline."""
    ledger = ledger or open_ledger()
    return [deadline_missed(f, ledger=ledger, now=now, source="run-deadline", dag_id=dag_id, run_id=run_id)
            for f in ledger.overdue(run_id=run_id, now=now)]


async def realtime_run_deadline_missed(context: Mapping[str, Any] | None = None, **kwargs: Any) -> None:
    """Airflow Deadline Alert callback (AsyncCallback, runs in the triggerer).

    ``context`` carries ``dag_run`` (the run's API representation) and ``deadline``; we flag
    the run's frames that are past their own deadline. ``kwargs`` (e.g. ``mode``) come from
    the DeadlineAlert definition and only label the log line.
    """
    dag_run = (context or {}).get("dag_run") or {}
    run_id = dag_run.get("dag_run_id") or dag_run.get("run_id")
    dag_id = dag_run.get("dag_id")
    log.error("IRIS DRS: %s run %s passed its %s deadline (%s)", dag_id, run_id,
              kwargs.get("label", "real-time"), (context or {}).get("deadline", {}).get("deadline_time"))
    alerts = await asyncio.to_thread(check_overdue, run_id=run_id, dag_id=dag_id)
    if not alerts:
        log.warning("IRIS DRS: run %s is late but none of its frames is past its own deadline", run_id)
