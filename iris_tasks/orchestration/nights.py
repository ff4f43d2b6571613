"""Observing nights as Airflow asset partitions (Airflow 3.2+ ``partition_key``).

The night is the unit of work of the nightly masters, reprocessing and backfills, so it is the
partition key of the DRS's night-scoped Airflow objects:

* a night is named by the local date at its start, ``YYYY-MM-DD`` in site time (Maunakea,
  UTC-10, no daylight saving: :data:`iris_tasks.metadata.SITE_UTC_OFFSET_HOURS`), e.g. the night
  of 2026-12-07 runs from the evening of the 7th to the morning of the 8th (local);
* the partitioned DAG runs of ``iris_nightly_calibrations`` and ``iris_reprocess_nights`` come
  from :func:`night_partitions`: a daily cron in site time whose run on the morning of day D
  carries the partition key of the night that just ended (D-1), and whose backfill over a date
  range creates one run per night with that night's key;
* the asset events of ``iris/crds-context`` and ``iris/products`` carry the night as their
  ``partition_key``; ``iris_reprocess`` is scheduled on the partitioned ``iris/crds-context``
  (``PartitionedAssetTimetable``, identity mapping) and runs for exactly the night of the event.

:func:`night_of_run` is how every task learns its night: the run's partition key first, then
the ``night`` param of a manual run without a key, then the night that ended before the run's
logical date. Nothing here imports Airflow at module level (the night page and the CLI use it).
"""

from __future__ import annotations

import datetime as dt
import re
from collections.abc import Mapping
from typing import Any

from ..errors import ConfigurationError

#: Site time zone of the partition timetables: Hawaii Standard Time, UTC-10 all year, the
#: offset :func:`iris_tasks.metadata.observing_night` uses (checked in tests).
SITE_TIMEZONE = "Pacific/Honolulu"
#: Partition key format of a night: its name.
NIGHT_KEY_FORMAT = "%Y-%m-%d"
NIGHT_PATTERN = r"^\d{4}-\d{2}-\d{2}$"
_NIGHT_RE = re.compile(NIGHT_PATTERN)


def check_night(value: Any, *, what: str = "night") -> str:
    """``value`` as a night name, or ConfigurationError saying what is wrong with it."""
    text = str(value).strip() if value is not None else ""
    if not _NIGHT_RE.match(text):
        raise ConfigurationError(f"{what} {value!r}: expected a night name YYYY-MM-DD")
    try:
        dt.date.fromisoformat(text)
    except ValueError:
        raise ConfigurationError(f"{what} {value!r}: not a calendar date") from None
    return text


def night_of_datetime(when: dt.datetime) -> str:
    """Observing night of a UTC instant (e.g. a run's logical date)."""
    from .. import metadata

    when = when.astimezone(dt.UTC) if when.tzinfo else when
    return metadata.observing_night(when.strftime("%Y-%m-%d"), when.strftime("%H:%M:%S"))


def night_partitions(local_hour: int) -> Any:
    """The timetable of a DAG that works on one night per run: a daily cron at ``local_hour``
    site time (the morning after), partitioned by night.

    A run on the morning of day D has the partition key D-1, the night that just ended
    (``run_offset=-1``: the previous cron tick formatted as ``YYYY-MM-DD`` in site time). A
    backfill over ``[from, to]`` creates one run per tick whose partition instant - night N's
    is N at ``local_hour`` site time - lies inside it: ``--from-date N1 --to-date N2`` covers
    nights N1 .. N2-1; give ``--to-date`` a time at or after ``local_hour`` (``N2T12:00``), or
    the next day, to include N2.
    """
    from airflow.sdk import CronPartitionTimetable

    if not 0 <= local_hour <= 23:
        raise ValueError(f"local_hour {local_hour}: expected 0-23")
    return CronPartitionTimetable(f"0 {local_hour} * * *", timezone=SITE_TIMEZONE, run_offset=-1,
                                  key_format=NIGHT_KEY_FORMAT)


def night_of_run(context: Mapping[str, Any]) -> str:
    """The night a task works on: the run's partition key, else the ``night`` param (a manual
    run without a key), else the night that ended before the run's logical date (or, without
    one, before it was created)."""
    run = context.get("dag_run")
    key = context.get("partition_key") or getattr(run, "partition_key", None)
    if key:
        return check_night(key, what="partition key")
    night = (context.get("params") or {}).get("night")
    if night:
        return check_night(night, what="param night")
    when = context.get("logical_date") or run.run_after
    return night_of_datetime(when)


__all__ = ["NIGHT_KEY_FORMAT", "NIGHT_PATTERN", "SITE_TIMEZONE", "check_night", "night_of_datetime",
           "night_of_run", "night_partitions"]
