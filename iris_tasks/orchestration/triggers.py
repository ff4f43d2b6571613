"""Event triggers that watch the landing area from Airflow's triggerer.

``iris_realtime`` is scheduled on the asset ``iris/landing`` whose :class:`~airflow.sdk.AssetWatcher`
runs one of these triggers. The triggerer runs them as coroutines in its event loop, so sensing
a new frame costs no worker slot and no scheduler poke: a scan every ``poll_interval`` seconds
(0.5 s by default; cheap ``os.scandir`` / one ``ListObjectsV2`` page) and one
:class:`~airflow.triggers.base.TriggerEvent` per new frame. Each event becomes an asset event
(extra ``{"payload": {...}}``) and the scheduler starts a DAG run for the queued events.

Only whole files are announced: the landing contract (atomic rename, or a complete FITS
structure left untouched for ``settle_seconds``) is applied by :mod:`.landing`'s survey, which
also lists what the DRS will not take (compressed files, sub-directories, links...); the
trigger records those in the ledger (``landing_ignored``) for the night page.

A trigger never stops (it is the watcher's long-lived loop). It remembers what it has
announced in memory and records each arrival in the frame ledger (the landing time the
deadlines count from), and on start-up it skips arrivals already in the ledger, so a triggerer
restart does not announce the same file twice. Announcing twice would be harmless anyway: the
claim step deduplicates by content hash.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncIterator
from typing import Any

from airflow.triggers.base import BaseEventTrigger, TriggerEvent

from .landing import (
    DEFAULT_SETTLE_SECONDS,
    DEFAULT_STALE_SECONDS,
    LandingEntry,
    LandingSurvey,
    split_s3_url,
    survey_directory,
    survey_s3_listing,
)

log = logging.getLogger(__name__)

#: ``ledger_path`` value meaning "the ledger the triggerer's own IRIS_* environment names".
#: Trigger kwargs are stored in the serialized DAG in plain text: a PostgreSQL ledger URL with a
#: password must not go there, so the DAG passes this marker and the triggerer resolves it.
LEDGER_FROM_ENV = "@environment"


def resolve_ledger(ledger_path: str | None) -> str | None:
    """The ledger location a trigger should open (None: do not record arrivals)."""
    if ledger_path != LEDGER_FROM_ENV:
        return ledger_path
    from ..config import settings

    return str(settings().ledger_path)


class _LandingTrigger(BaseEventTrigger):
    """Shared loop: scan, announce what is new, sleep."""

    def __init__(self, *, ledger_path: str | None = None, poll_interval: float = 0.5,
                 settle_seconds: float = DEFAULT_SETTLE_SECONDS,
                 stale_seconds: float = DEFAULT_STALE_SECONDS) -> None:
        super().__init__()
        self.ledger_path = ledger_path
        self.poll_interval = float(poll_interval)
        self.settle_seconds = float(settle_seconds)
        self.stale_seconds = float(stale_seconds)

    def _common_kwargs(self) -> dict[str, Any]:
        return {"ledger_path": self.ledger_path, "poll_interval": self.poll_interval,
                "settle_seconds": self.settle_seconds, "stale_seconds": self.stale_seconds}

    async def survey(self) -> LandingSurvey:  # pragma: no cover - abstract
        raise NotImplementedError

    def scope(self) -> str:  # pragma: no cover - overridden
        """URI prefix of everything this trigger watches (for the ignored-entries report)."""
        raise NotImplementedError

    async def _report_ignored(self, survey: LandingSurvey,
                              reported: frozenset[tuple[str, int, str]] | None
                              ) -> frozenset[tuple[str, int, str]] | None:
        """Write the ignored entries to the ledger when they changed since the last report."""
        now = frozenset((e.uri, e.size, e.reason) for e in survey.ignored)
        if now == reported or not self.ledger_path:
            return reported
        from .ledger import FrameLedger

        for entry in survey.ignored:
            if reported is None or (entry.uri, entry.size, entry.reason) not in reported:
                self.log.warning("ignored in the landing area: %s (%s)", entry.uri, entry.reason)
        try:
            ledger = FrameLedger(resolve_ledger(self.ledger_path))
            await asyncio.to_thread(ledger.note_ignored,
                                    [(e.uri, e.name, e.size, e.reason) for e in survey.ignored],
                                    scope=self.scope())
        except Exception:
            self.log.warning("cannot record the ignored landing entries", exc_info=True)
            return reported
        return now

    async def _known(self) -> set[tuple[str, int, float]]:
        if not self.ledger_path:
            return set()
        from .ledger import FrameLedger

        try:
            return await asyncio.to_thread(FrameLedger(resolve_ledger(self.ledger_path)).arrival_keys)
        except Exception:
            self.log.warning("cannot read the ledger %s; starting with an empty memory",
                             self.ledger_path, exc_info=True)
            return set()

    async def _record(self, entry: LandingEntry) -> dict[str, Any]:
        from .ledger import FrameLedger, isotime

        payload = {**entry.to_dict(), "seen_at": isotime()}
        if self.ledger_path:
            try:
                row = await asyncio.to_thread(
                    FrameLedger(resolve_ledger(self.ledger_path)).record_arrival, entry.uri, entry.size,
                    entry.mtime, etag=entry.etag, seen_by="trigger", seen_at=payload["seen_at"])
                payload["seen_at"] = row["seen_at"]
                payload["arrival_id"] = row["id"]
            except Exception:
                # The event still goes out; the claim step records the arrival itself.
                self.log.warning("cannot record %s in the ledger", entry.uri, exc_info=True)
        return payload

    async def run(self) -> AsyncIterator[TriggerEvent]:
        announced = await self._known()
        reported: frozenset[tuple[str, int, str]] | None = None
        self.log.info("watching %s every %.2f s (%d arrivals already known)",
                      self.describe(), self.poll_interval, len(announced))
        while True:
            try:
                survey = await self.survey()
            except Exception:
                # Transient listing failures (network, NFS) must not kill the watcher.
                self.log.warning("scan of %s failed; retrying", self.describe(), exc_info=True)
                survey = LandingSurvey([], [], [])
            else:
                reported = await self._report_ignored(survey, reported)
            for entry in survey.ready:
                if entry.key in announced:
                    continue
                announced.add(entry.key)
                payload = await self._record(entry)
                self.log.info("new frame %s (%d bytes)", entry.uri, entry.size)
                yield TriggerEvent(payload)
            await asyncio.sleep(self.poll_interval)

    def describe(self) -> str:  # pragma: no cover - overridden
        return "landing area"


class LandingDirectoryTrigger(_LandingTrigger):
    """Announce each new frame file directly in ``directory``."""

    def __init__(self, directory: str, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.directory = str(directory)

    def serialize(self) -> tuple[str, dict[str, Any]]:
        return (f"{__name__}.LandingDirectoryTrigger",
                {"directory": self.directory, **self._common_kwargs()})

    def describe(self) -> str:
        return self.directory

    def scope(self) -> str:
        from pathlib import Path

        return Path(self.directory).resolve().as_uri() + "/"

    async def survey(self) -> LandingSurvey:
        # os.scandir is fast but still a syscall burst: keep it off the event loop.
        return await asyncio.to_thread(survey_directory, self.directory,
                                       settle_seconds=self.settle_seconds,
                                       stale_seconds=self.stale_seconds)


class S3LandingTrigger(_LandingTrigger):
    """Announce each new frame object directly under ``s3://bucket/prefix``."""

    def __init__(self, url: str, aws_conn_id: str = "iris_s3", **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.url = str(url)
        self.aws_conn_id = aws_conn_id
        self._client_cm: Any = None
        self._client: Any = None

    def serialize(self) -> tuple[str, dict[str, Any]]:
        return (f"{__name__}.S3LandingTrigger",
                {"url": self.url, "aws_conn_id": self.aws_conn_id, **self._common_kwargs()})

    def describe(self) -> str:
        return self.url

    async def _get_client(self) -> Any:
        if self._client is None:
            from airflow.providers.amazon.aws.hooks.s3 import S3Hook

            hook = S3Hook(aws_conn_id=self.aws_conn_id)
            # aiobotocore client: listing never blocks the triggerer's event loop.
            self._client_cm = await hook.get_async_conn()
            self._client = await self._client_cm.__aenter__()
        return self._client

    def scope(self) -> str:
        bucket, prefix = split_s3_url(self.url)
        return f"s3://{bucket}/{prefix}"

    async def survey(self) -> LandingSurvey:
        bucket, prefix = split_s3_url(self.url)
        client = await self._get_client()
        listing: list[dict[str, Any]] = []
        paginator = client.get_paginator("list_objects_v2")
        async for page in paginator.paginate(Bucket=bucket, Prefix=prefix):
            listing.extend(page.get("Contents", []) or [])
        return survey_s3_listing(bucket, prefix, listing)

    async def cleanup(self) -> None:
        if self._client_cm is not None:
            try:
                await self._client_cm.__aexit__(None, None, None)
            finally:
                self._client_cm = self._client = None


def landing_trigger(landing: str, *, ledger_path: str | None = None, poll_interval: float = 0.5,
                    aws_conn_id: str = "iris_s3", settle_seconds: float = DEFAULT_SETTLE_SECONDS,
                    stale_seconds: float = DEFAULT_STALE_SECONDS) -> _LandingTrigger:
    """The right trigger for a landing URL: ``s3://...`` or a directory path."""
    common = {"ledger_path": ledger_path, "poll_interval": poll_interval,
              "settle_seconds": settle_seconds, "stale_seconds": stale_seconds}
    if landing.startswith("s3://"):
        return S3LandingTrigger(landing, aws_conn_id=aws_conn_id, **common)
    return LandingDirectoryTrigger(landing, **common)
