"""Event triggers that watch the landing area from Airflow's triggerer.

``iris_realtime`` is scheduled on the asset ``iris/landing`` whose :class:`~airflow.sdk.AssetWatcher`
runs one of these triggers. The triggerer runs them as coroutines in its event loop, so sensing
a new frame costs no worker slot and no scheduler poke: a scan every ``poll_interval`` seconds
(0.5 s by default; cheap ``os.scandir`` / one ``ListObjectsV2`` page) and one
:class:`~airflow.triggers.base.TriggerEvent` per new frame. Each event becomes an asset event
(extra ``{"payload": {...}}``) and the scheduler starts a DAG run for the queued events.

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

from .landing import LandingEntry, entry_from_s3, is_frame_name, scan_directory, split_s3_url

log = logging.getLogger(__name__)

#: ``ledger_path`` value meaning "the ledger the triggerer's own IRIS_* environment names".
#: Trigger kwargs are stored in the serialized DAG in plain text: a PostgreSQL ledger URL with a
#: password must not go there, so the DAG passes this marker and the triggerer resolves it.
LEDGER_FROM_ENV = "@environment"


def resolve_ledger(ledger_path: str | None) -> str | None:
    """The ledger location a trigger should open (None: do not record arrivals)."""
    if ledger_path != LEDGER_FROM_ENV:
        return ledger_path
    from .config import settings

    return str(settings().ledger_path)


class _LandingTrigger(BaseEventTrigger):
    """Shared loop: scan, announce what is new, sleep."""

    def __init__(self, *, ledger_path: str | None = None, poll_interval: float = 0.5,
                 settle_scans: int = 0) -> None:
        super().__init__()
        self.ledger_path = ledger_path
        self.poll_interval = float(poll_interval)
        # >0: announce an entry only after it kept the same size/time for this many extra
        # scans (for writers that cannot rename atomically).
        self.settle_scans = int(settle_scans)

    def _common_kwargs(self) -> dict[str, Any]:
        return {"ledger_path": self.ledger_path, "poll_interval": self.poll_interval,
                "settle_scans": self.settle_scans}

    async def scan(self) -> list[LandingEntry]:  # pragma: no cover - abstract
        raise NotImplementedError

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
        pending: dict[tuple[str, str], tuple[tuple[str, int, float], int]] = {}
        self.log.info("watching %s every %.2f s (%d arrivals already known)",
                      self.describe(), self.poll_interval, len(announced))
        while True:
            try:
                entries = await self.scan()
            except Exception:
                # Transient listing failures (network, NFS) must not kill the watcher.
                self.log.warning("scan of %s failed; retrying", self.describe(), exc_info=True)
                entries = []
            for entry in entries:
                if entry.key in announced:
                    continue
                if self.settle_scans:
                    slot = (entry.uri, entry.name)
                    prev = pending.get(slot)
                    count = prev[1] + 1 if prev and prev[0] == entry.key else 0
                    pending[slot] = (entry.key, count)
                    if count < self.settle_scans:
                        continue
                    pending.pop(slot, None)
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

    async def scan(self) -> list[LandingEntry]:
        # os.scandir is fast but still a syscall burst: keep it off the event loop.
        return await asyncio.to_thread(scan_directory, self.directory)


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

    async def scan(self) -> list[LandingEntry]:
        bucket, prefix = split_s3_url(self.url)
        client = await self._get_client()
        out = []
        paginator = client.get_paginator("list_objects_v2")
        async for page in paginator.paginate(Bucket=bucket, Prefix=prefix):
            for obj in page.get("Contents", []) or []:
                rest = obj["Key"][len(prefix):]
                if "/" in rest or not is_frame_name(rest):
                    continue
                out.append(entry_from_s3(bucket, obj["Key"], obj.get("Size", 0),
                                         obj.get("LastModified"), obj.get("ETag")))
        out.sort(key=lambda e: (e.mtime, e.name))
        return out

    async def cleanup(self) -> None:
        if self._client_cm is not None:
            try:
                await self._client_cm.__aexit__(None, None, None)
            finally:
                self._client_cm = self._client = None


def landing_trigger(landing: str, *, ledger_path: str | None = None, poll_interval: float = 0.5,
                    aws_conn_id: str = "iris_s3") -> _LandingTrigger:
    """The right trigger for a landing URL: ``s3://...`` or a directory path."""
    if landing.startswith("s3://"):
        return S3LandingTrigger(landing, aws_conn_id=aws_conn_id, ledger_path=ledger_path,
                                poll_interval=poll_interval)
    return LandingDirectoryTrigger(landing, ledger_path=ledger_path, poll_interval=poll_interval)
