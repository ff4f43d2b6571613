"""The landing area as the night page shows it: frames waiting to be claimed (whole, or still
being written and why), and what the DRS ignores there and why.

It looks at the landing area itself, with the landing code's own survey
(:func:`iris_tasks.orchestration.landing.survey_landing`: a directory, or an S3 prefix through
the Airflow connection), so it sees what the triggerer would; the ledger's record of ignored
entries (``landing_ignored``, kept by the triggerer) gives each one the time it was first seen,
and stands in when the api-server cannot see the landing area (a Kubernetes pod without the
volume): the page then says so.
"""

from __future__ import annotations

import datetime as dt
import logging

from iris_tasks.orchestration.landing import LandingSurvey, survey_landing

from .views import IgnoredRow, LandingView, WaitingRow

log = logging.getLogger(__name__)


def _iso(epoch: float) -> str:
    return dt.datetime.fromtimestamp(epoch, dt.UTC).isoformat(timespec="milliseconds")


def landing_view(where: str, survey: LandingSurvey, recorded: list[IgnoredRow]) -> LandingView:
    """The page's view of one survey of the landing area ``where``; ``recorded`` is the
    ledger's list of ignored entries (for the time each was first seen)."""
    first_seen = {r.uri: r.since for r in recorded}
    waiting = [WaitingRow(name=e.name, state="ready", reason="whole; not claimed yet", size=e.size,
                          since=_iso(e.mtime), uri=e.uri) for e in survey.ready]
    waiting += [WaitingRow(name=e.name, state="being written", reason=why, size=e.size,
                           since=_iso(e.mtime), uri=e.uri) for e, why in survey.waiting]
    ignored = [IgnoredRow(name=i.name, reason=i.reason, size=i.size, since=first_seen.get(i.uri),
                          uri=i.uri) for i in survey.ignored]
    return LandingView(where=where, waiting=waiting, ignored=ignored)


def look(where: str | None = None, *, conn_id: str | None = None,
         recorded: list[IgnoredRow] | None = None) -> LandingView:
    """Survey the landing area (default ``$IRIS_LANDING``) now."""
    from iris_tasks.config import settings

    cfg = settings()
    where = where or cfg.landing
    survey = survey_landing(where, conn_id=conn_id or cfg.s3_conn_id)
    return landing_view(where, survey, recorded or [])


def unseen(where: str, problem: str, recorded: list[IgnoredRow]) -> LandingView:
    """The landing area could not be surveyed: the ledger's record of ignored entries, and why."""
    return LandingView(where=where, ignored=list(recorded),
                       problem=f"the landing area {where} could not be read from the api-server "
                               f"({problem}); the ignored entries are the triggerer's record")
