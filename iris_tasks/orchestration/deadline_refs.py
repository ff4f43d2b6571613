"""Deadline Alerts of ``iris_realtime`` counted from the moment the frames landed.

The real-time requirement is "reduced image <= 30 s, reduced cube <= 60 s after the data land".
Airflow 3.3's built-in deadline references start a run's clock when the run is created or
queued, which is after the landing (the trigger's poll, the scheduler's loop). The custom
reference :class:`FramesLandedDeadline` starts it when the run's frames landed:

* the run's frames are the ``iris/landing`` asset events it consumes; the reference is
  evaluated when the scheduler creates the run, just before it links those events, so it
  selects them the way the scheduler does (events of the asset after the previous
  asset-triggered run, up to this run's ``run_after``);
* a frame landed at ``min(seen_at, mtime)`` of its event payload - the rule the ledger uses
  for ``frames.landed_at`` (``iris_tasks.orchestration.landing``);
* each alert carries one budget (``budget_seconds``, 30 or 60) and counts from the earliest
  landing among the run's frames whose recipe has that budget; a run without such frames gets
  no deadline for that alert. The recipe comes from the payload's ``obsname`` when the trigger
  gives one, else the file's primary header (a local landing area: a few 2880-byte blocks),
  else an OBSNAME in the file name; a frame that none of these classifies counts against the
  shortest budget (an early alert rather than a missed one).

A manual run (no asset events) gets no deadline; the per-frame check at the end of the ``frame`` task
(:func:`iris_tasks.orchestration.alerts.check_frame`) stays as the cross-check for every frame.

Airflow finds the class through the plugin ``iris_deadlines`` (``plugins/iris_deadlines_plugin.py``:
``deadline_references``); the DAG file imports it at parse time, so only the Airflow SDK is
imported at module level.
"""

from __future__ import annotations

import datetime as dt
import logging
import os
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import Any
from urllib.parse import unquote, urlparse

from airflow.sdk.definitions.deadline import REFERENCE_TYPE_FIELD, BaseDeadlineReference

log = logging.getLogger(__name__)

LANDING_ASSET = "iris/landing"
_FITS_BLOCK = 2880
_MAX_HEADER_BLOCKS = 36  # a primary header of up to 1296 cards


def header_obsname(path: str | os.PathLike[str]) -> str | None:
    """OBSNAME from a FITS file's primary header, reading only the header blocks (None when
    the file is missing, not FITS, or has no OBSNAME)."""
    try:
        with open(path, "rb") as fh:
            for _ in range(_MAX_HEADER_BLOCKS):
                block = fh.read(_FITS_BLOCK)
                if len(block) < _FITS_BLOCK:
                    return None
                for i in range(0, _FITS_BLOCK, 80):
                    card = block[i:i + 80].decode("ascii", "replace")
                    key = card[:8].rstrip()
                    if key == "END":
                        return None
                    if key == "OBSNAME" and card[8:10] == "= ":
                        value = card[10:].split("/", 1)[0].strip()
                        return value.strip("'").strip() or None
    except OSError:
        return None
    return None


def frame_budget(payload: Mapping[str, Any], budgets: Mapping[str, float] | None = None) -> float:
    """Deadline in seconds of the frame an ``iris/landing`` event announces (see the module
    docstring for how its recipe is found)."""
    from iris_tasks.metadata import DEADLINE_SECONDS, RECIPES

    budgets = budgets or DEADLINE_SECONDS
    obsname = payload.get("obsname")
    if obsname not in RECIPES:
        uri = str(payload.get("uri") or "")
        path = unquote(urlparse(uri).path) if uri.startswith("file:") else (uri if uri.startswith("/") else "")
        obsname = header_obsname(path) if path else None
    if obsname not in RECIPES:
        name = str(payload.get("name") or payload.get("uri") or "").rsplit("/", 1)[-1].upper()
        obsname = next((o for o in sorted(RECIPES, key=len, reverse=True) if o in name), None)
    if obsname in RECIPES:
        return float(budgets[RECIPES[obsname].mode])
    return float(min(budgets.values()))


def landed_at(payload: Mapping[str, Any]) -> dt.datetime | None:
    """When the frame landed: the earlier of the trigger's ``seen_at`` and the file's ``mtime``."""
    times = []
    if payload.get("seen_at"):
        seen = dt.datetime.fromisoformat(str(payload["seen_at"]).replace("Z", "+00:00"))
        times.append(seen if seen.tzinfo else seen.replace(tzinfo=dt.UTC))
    if payload.get("mtime") is not None:
        times.append(dt.datetime.fromtimestamp(float(payload["mtime"]), dt.UTC))
    return min(times) if times else None


def earliest_landing(payloads: Iterable[Mapping[str, Any]], budget_seconds: float) -> dt.datetime | None:
    """The earliest landing among the frames with this budget (None: no such frame)."""
    found = [t for p in payloads if p and frame_budget(p) == float(budget_seconds)
             and (t := landed_at(p)) is not None]
    return min(found) if found else None


def run_landing_payloads(session: Any, dag_id: str, run_id: str) -> list[dict[str, Any]]:
    """The ``iris/landing`` event payloads a run consumes (or will consume: the scheduler
    links them right after creating the run, from the same window as here)."""
    from airflow.models import DagRun
    from airflow.models.asset import AssetEvent, AssetModel, DagScheduleAssetReference
    from airflow.utils.types import DagRunType
    from sqlalchemy import func, select

    run = session.scalar(select(DagRun).where(DagRun.dag_id == dag_id, DagRun.run_id == run_id))
    if run is None:
        return []
    events = [e for e in run.consumed_asset_events if e.asset and e.asset.name == LANDING_ASSET]
    if not events:
        if run.run_type != DagRunType.ASSET_TRIGGERED:
            return []
        previous = session.scalar(select(func.max(DagRun.run_after)).where(
            DagRun.dag_id == dag_id, DagRun.run_type == DagRunType.ASSET_TRIGGERED,
            DagRun.run_after < run.run_after))
        # First run with catchup off: the scheduler skips events older than the DAG's
        # reference to the asset; so do we.
        floor = previous or session.scalar(select(func.min(DagScheduleAssetReference.created_at))
                                           .where(DagScheduleAssetReference.dag_id == dag_id))
        query = (select(AssetEvent).join(AssetModel, AssetModel.id == AssetEvent.asset_id)
                 .where(AssetModel.name == LANDING_ASSET, AssetEvent.timestamp <= run.run_after))
        if floor is not None:
            query = query.where(AssetEvent.timestamp > floor)
        events = list(session.scalars(query))
    return [(e.extra or {}).get("payload") or {} for e in events]


@dataclass(frozen=True)
class FramesLandedDeadline(BaseDeadlineReference):
    """Airflow deadline reference: the earliest landing among a run's frames whose recipe has
    ``budget_seconds`` (use it with ``interval=timedelta(seconds=budget_seconds)``)."""

    budget_seconds: float = 30.0

    # What Airflow passes to _evaluate_with (a class attribute, not a dataclass field).
    required_kwargs = frozenset({"dag_id", "run_id"})

    def serialize_reference(self) -> dict[str, Any]:
        return {REFERENCE_TYPE_FIELD: self.reference_name, "budget_seconds": self.budget_seconds}

    @classmethod
    def deserialize_reference(cls, reference_data: dict[str, Any]) -> FramesLandedDeadline:
        return cls(budget_seconds=float(reference_data.get("budget_seconds", 30.0)))

    def _evaluate_with(self, *, session: Any, dag_id: str, run_id: str, **_: Any) -> dt.datetime | None:
        try:
            payloads = run_landing_payloads(session, dag_id, run_id)
            start = earliest_landing(payloads, self.budget_seconds)
        except Exception:  # a deadline must never stop the scheduler from creating the run
            log.exception("cannot evaluate the landing deadline of %s %s", dag_id, run_id)
            return None
        log.info("%s %s: %d frame(s); the %g s deadline counts from %s", dag_id, run_id,
                 len(payloads), self.budget_seconds, start.isoformat() if start else "none (no such frame)")
        return start
