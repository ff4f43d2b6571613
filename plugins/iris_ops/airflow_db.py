"""What the night page reads from Airflow's own metadata database, in the api-server's process
(Airflow's ORM and session, configured by the api-server): the health of the scheduler,
triggerer and DAG processor (Airflow's ``get_airflow_health``, what ``/api/v2/monitor/health``
answers), whether queued tasks find a worker, and the human-in-the-loop requests nobody has
answered yet (the UI's Required Actions: the approval of a night's new masters).

Nothing here writes. Every function may block on the database; the page calls them through
:mod:`iris_ops.health`'s bounded calls, never directly from a request.
"""

from __future__ import annotations

import datetime as dt
import logging
import re
from typing import Any

from .views import ApprovalRow, ComponentHealth

log = logging.getLogger(__name__)

#: A task queued this long without a worker taking it means no free slot, or no worker.
QUEUED_LIMIT = dt.timedelta(seconds=60)
# Options of iris_nightly_calibrations' request that are not a master (approval.py).
_NOT_MASTERS = ("Approve all", "Reject")
_NIGHT = re.compile(r"\b(\d{4}-\d{2}-\d{2})\b")


def age_text(seconds: float) -> str:
    """``42 s``, ``3 min``, ``2.5 h``, ``4 d``: an age as an operator reads it."""
    if seconds < 90:
        return f"{seconds:.0f} s"
    if seconds < 90 * 60:
        return f"{seconds / 60:.0f} min"
    if seconds < 48 * 3600:
        return f"{seconds / 3600:.1f} h"
    return f"{seconds / 86400:.0f} d"


def _heartbeat(text: str | None, now: dt.datetime) -> str:
    if not text:
        return "no heartbeat ever recorded"
    when = dt.datetime.fromisoformat(text)
    when = when if when.tzinfo else when.replace(tzinfo=dt.UTC)
    return f"last heartbeat {age_text(max(0.0, (now - when).total_seconds()))} ago ({when:%H:%M:%S} UTC)"


def components_from_report(report: dict[str, Any], now: dt.datetime) -> list[ComponentHealth]:
    """The banner lines of an Airflow health report (``get_airflow_health()`` or the JSON of
    ``/api/v2/monitor/health``): scheduler, triggerer, DAG processor, metadata database."""
    out = []
    for key, name, role in (("scheduler", "scheduler", "schedules the runs and starts the tasks"),
                            ("triggerer", "triggerer", "watches the landing area"),
                            ("dag_processor", "dag-processor", "parses the DAG files")):
        part = report.get(key) or {}
        status = part.get("status")
        beat = _heartbeat(part.get(f"latest_{key}_heartbeat"), now)
        if status == "healthy":
            out.append(ComponentHealth(name, "ok", "running", beat))
        elif status is None:
            out.append(ComponentHealth(name, "bad", "never started", f"no {name} has run: nothing {role}"))
        else:
            out.append(ComponentHealth(name, "bad", "not running", f"{beat}: nothing {role}"))
    db = (report.get("metadatabase") or {}).get("status")
    out.append(ComponentHealth("airflow-db", "ok" if db == "healthy" else "bad",
                               "answers" if db == "healthy" else "unreachable",
                               "Airflow's metadata database"))
    return out


def airflow_health(now: dt.datetime | None = None) -> list[ComponentHealth]:
    """Scheduler, triggerer, DAG processor and metadata DB, as the api-server's health
    endpoint sees them (their jobs' heartbeats in the metadata DB)."""
    from airflow.api.common.airflow_health import get_airflow_health

    return components_from_report(get_airflow_health(), now or dt.datetime.now(dt.UTC))


def task_queue(now: dt.datetime | None = None, *, limit: dt.timedelta = QUEUED_LIMIT) -> list[ComponentHealth]:
    """The workers, seen from the task table: tasks running, and how long the oldest queued
    task has waited for a worker (bad beyond ``limit``: no free slot, or the workers - the
    LocalExecutor's live in the scheduler, Celery's in their own pods - are gone)."""
    import sqlalchemy as sa
    from airflow.models.taskinstance import TaskInstance
    from airflow.utils.session import create_session
    from airflow.utils.state import TaskInstanceState

    now = now or dt.datetime.now(dt.UTC)
    with create_session() as session:
        running = session.scalar(sa.select(sa.func.count()).select_from(TaskInstance)
                                 .where(TaskInstance.state == TaskInstanceState.RUNNING))
        queued, oldest = session.execute(
            sa.select(sa.func.count(), sa.func.min(TaskInstance.queued_dttm))
            .where(TaskInstance.state == TaskInstanceState.QUEUED)).one()
    return [workers_line(int(running or 0), int(queued or 0), oldest, now, limit)]


def workers_line(running: int, queued: int, oldest_queued: dt.datetime | None, now: dt.datetime,
                 limit: dt.timedelta = QUEUED_LIMIT) -> ComponentHealth:
    """The banner line of the workers from the task table's counts."""
    if not queued:
        return ComponentHealth("workers", "ok", f"{running} task(s) running", "no task waiting for a worker")
    if oldest_queued is not None and oldest_queued.tzinfo is None:
        oldest_queued = oldest_queued.replace(tzinfo=dt.UTC)
    waited = (now - oldest_queued).total_seconds() if oldest_queued else 0.0
    text = f"{queued} task(s) queued, the oldest for {age_text(waited)}"
    if waited > limit.total_seconds():
        return ComponentHealth("workers", "bad", text,
                               f"{running} running; no worker took a queued task for more than "
                               f"{limit.total_seconds():.0f} s: no free slot, or no worker")
    return ComponentHealth("workers", "ok", f"{running} running, {queued} queued", text)


def pending_approvals() -> list[ApprovalRow]:
    """Every human-in-the-loop request still waiting for an answer, oldest first (any DAG:
    an operator has to answer all of them; the nightly calibrations' carry the QA)."""
    import sqlalchemy as sa
    from airflow.models.dagrun import DagRun
    from airflow.models.hitl import HITLDetail
    from airflow.models.taskinstance import TaskInstance
    from airflow.utils.session import create_session
    from airflow.utils.state import TaskInstanceState

    waiting = (TaskInstanceState.AWAITING_INPUT, TaskInstanceState.DEFERRED)
    with create_session() as session:
        rows = session.execute(
            sa.select(HITLDetail.subject, HITLDetail.body, HITLDetail.options, HITLDetail.defaults,
                      HITLDetail.created_at, TaskInstance.dag_id, TaskInstance.run_id,
                      TaskInstance.task_id, TaskInstance.map_index, DagRun.conf)
            .join(TaskInstance, TaskInstance.id == HITLDetail.ti_id)
            .join(DagRun, sa.and_(DagRun.dag_id == TaskInstance.dag_id,
                                  DagRun.run_id == TaskInstance.run_id))
            .where(HITLDetail.responded_at.is_(None), TaskInstance.state.in_(waiting))
            .order_by(HITLDetail.created_at)).all()
    return [approval_row(dict(r._mapping)) for r in rows]


def approval_row(r: dict[str, Any]) -> ApprovalRow:
    """An :class:`ApprovalRow` from one pending request's columns (``subject``, ``body``,
    ``options``, ``defaults``, ``created_at``, ``dag_id``, ``run_id``, ``task_id``,
    ``map_index``, ``conf``)."""
    options = [str(o) for o in (r.get("options") or [])]
    conf = r.get("conf") if isinstance(r.get("conf"), dict) else {}
    night = conf.get("night")
    if not night:
        m = _NIGHT.search(str(r.get("subject") or "")) or _NIGHT.search(str(r.get("body") or ""))
        night = m.group(1) if m else None
    created = r.get("created_at")
    return ApprovalRow(
        dag_id=str(r["dag_id"]), run_id=str(r["run_id"]), task_id=str(r["task_id"]),
        map_index=int(r.get("map_index", -1) if r.get("map_index") is not None else -1),
        subject=str(r.get("subject") or ""), body=str(r.get("body") or ""), options=options,
        defaults=[str(d) for d in (r.get("defaults") or [])],
        created_at=created.isoformat() if hasattr(created, "isoformat") else created,
        night=str(night) if night else None,
        masters=[o for o in options if o not in _NOT_MASTERS and o.lower().endswith((".fits", ".asdf"))])
