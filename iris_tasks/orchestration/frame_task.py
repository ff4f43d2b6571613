"""The ``frame`` task of ``iris_realtime``: one task per frame, from raw archive to ingest.

What it runs, all of it in one task process (one task start per frame, see docs/airflow.md
for the measured cost of a task start)::

    store lane (one thread): archive raw ──► early upload of _rate ─┐
    process: classify -> readout -┴-> reduce -> quicklook ──────────┴─► ingest -> frame closed
             (compute server)

The raw frame goes to the store beside the compute, the rate product as soon as the readout
wrote it; ingest then stores what is left (the stage-2 product and the quicklook) and closes
the frame. Each part is still a stage of its own in the ledger (time, CPU, errors).

Retries are for the store only, and resume there: once the compute has finished, the
processed frame is written to ``<work_dir>/processed.json``; a retry (a transient store
fault, after Airflow's backoff) that finds it with its files skips the compute and goes
straight to storing, where objects already stored with the same content are skipped. A frame
that failed in processing is not retried (the task's retry policy keys on the exception's
category, :mod:`iris_tasks.orchestration.dag_defaults`).
"""

from __future__ import annotations

import json
import logging
import os
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor
from concurrent.futures import TimeoutError as FutureTimeout
from pathlib import Path
from typing import Any

from .. import lineage
from ..config import Settings, settings
from ..storage import open_store
from .common import frame_stage, run_info, task_identity
from .frame import Frame
from .ledger import FAILED, open_ledger
from .realtime import JOB, archive_frame, classify_frame, ingest_frame, process_frame, store_item

log = logging.getLogger(__name__)

PROCESSED_FILE = "processed.json"


class StoreLane:
    """One thread that stores the frame's files beside its compute, one after the other.

    Serial on purpose: the raw archive and the early rate upload never compete with each
    other for the cores the compute needs, and each stage's CPU in the ledger is its own (a
    stage records its process's CPU while it runs).
    """

    def __init__(self) -> None:
        self._pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="iris-store")

    def submit(self, work: Callable[..., Any], *args: Any) -> Future:
        return self._pool.submit(work, *args)

    def close(self) -> None:
        self._pool.shutdown(wait=False)


class EarlyUpload:
    """Stores a frame's ``_rate`` product while its stage 2 still computes.

    The rate is final as soon as the readout wrote it, and uploading it (~320 MB at 4096²)
    is most of the store work; done beside the reduction it adds nothing to the frame's
    latency, and ingest does not store it again. Best effort: any failure is logged and ingest
    stores the rate itself (and a store fault there is retried). Timed in the ledger as stage
    ``early_upload`` (beside the compute, so neither compute nor ingest in the latency
    breakdown).
    """

    def __init__(self, lane: StoreLane, store: Any, cfg: Settings | None = None):
        self.lane = lane
        self.store = store
        self.cfg = cfg or settings()
        self.ident = task_identity()  # read in the task's own thread; the upload runs in another
        self.future: Future | None = None

    def on_event(self, event: str, data: dict[str, Any]) -> None:
        if event == "rate_written" and self.future is None:
            self.future = self.lane.submit(self._upload, data["frame"])

    def _upload(self, data: dict[str, Any]) -> str | None:
        frame = Frame.from_dict(data)
        try:
            ledger = open_ledger(self.cfg.ledger_path)
            run = {k: self.ident[k] for k in ("dag_id", "run_id", "try_number")}
            with frame_stage(ledger, frame.frame_id, "early_upload", run, ident=self.ident,
                             fail_frame=False) as detail:
                url = store_item(self.store, frame, "rate", frame.rate_path, variant=None,
                                 ledger=ledger, run=run)
                detail["objects"] = {"rate": url}
            lineage.record([frame.rate_path], [url], job=f"{JOB}.early_upload")
            return url
        except Exception as exc:  # noqa: BLE001 - ingest stores it (and retries)
            log.warning("early upload of %s's rate failed (ingest will store it): %s: %s",
                        frame.filename, type(exc).__name__, exc)
            return None

    def finish(self, timeout: float = 600.0) -> dict[str, str]:
        """Wait for the upload, so ingest never races it for the same key; ``{"rate": url}``
        when it stored the rate, else ``{}``."""
        if self.future is None:
            return {}
        try:
            url = self.future.result(timeout)
        except FutureTimeout:
            log.warning("early upload still running after %.0f s; ingest stores the rate", timeout)
            return {}
        return {"rate": url} if url else {}


def process_frame_op(frame: dict[str, Any], **kwargs: Any) -> dict[str, Any] | None:
    """The compute operation ``process_frame``: :func:`~.realtime.process_frame` on a frame
    as JSON, answering JSON (what crosses the socket)."""
    out = process_frame(Frame.from_dict(frame), **kwargs)
    return out.to_dict() if out is not None else None


def compute_frame(frame: Frame, *, cfg: Settings | None = None,
                  on_event: Callable[[str, dict[str, Any]], None] | None = None) -> Frame | None:
    """:func:`~.realtime.process_frame` on the compute server when one listens (warm worker,
    see :mod:`.compute`), else in this process; same result either way. Returns None when
    the frame was quarantined.

    A compute worker that dies under the frame is a transient loss (the server starts a new
    one): the frame is computed again at once, in this process -- not on the server, so that a
    frame that kills workers by itself cannot take the server's other workers down with it.
    A second loss fails the frame.
    """
    from .compute import ComputeServerLost, run, run_local

    data = frame.to_dict()
    try:
        out = run("process_frame", data, label=frame.filename, on_event=on_event)
    except ComputeServerLost as exc:
        log.warning("%s; computing %s again in this process", exc, frame.filename)
        ledger = open_ledger((cfg or settings()).ledger_path)
        ledger.record_alert("compute_retry", f"compute worker lost; {frame.filename} "
                            f"computed again in the task process: {exc}",
                            frame_id=frame.frame_id, **run_info_ids())
        try:
            out = run_local("process_frame", data, on_event=on_event)
        except ComputeServerLost as again:
            ledger.update_frame(frame.frame_id, status=FAILED, error=str(again)[:2000])
            raise
    return Frame.from_dict(out) if out is not None else None


def processed_frame(frame: Frame) -> Frame | None:
    """The frame as an earlier try of its task left it after the compute, when that try
    finished computing and its files are all still there; else None."""
    if not frame.work_dir:
        return None
    path = Path(frame.work_dir) / PROCESSED_FILE
    try:
        done = Frame.from_dict(json.loads(path.read_text()))
    except (OSError, ValueError, TypeError):
        return None
    files = [done.rate_path, done.product_path, done.quicklook_path]
    if done.frame_id != frame.frame_id or not all(Path(p).is_file() for p in files if p):
        return None
    return done


def _save_processed(frame: Frame) -> None:
    path = Path(frame.work_dir) / PROCESSED_FILE
    tmp = path.with_name(f".{path.name}.{os.getpid()}")
    tmp.write_text(json.dumps(frame.to_dict()) + "\n")
    os.replace(tmp, path)


def run_frame_task(frame: Frame, *, cfg: Settings | None = None,
                   store_timeout: float = 600.0) -> dict[str, Any] | None:
    """The ``frame`` task: archive beside process (with the early rate upload), then ingest.

    Returns the frame's report (:func:`~.realtime.ingest_frame`), or None when the frame was
    quarantined during processing (its raw file is archived all the same). A store fault
    (archive or ingest) is raised after the compute has finished and been saved, so that the
    task's retry only stores (module docstring).
    """
    from .landing import localize_frame

    cfg = cfg or settings()
    frame = localize_frame(frame, cfg=cfg)  # claimed on another host: fetch the raw bytes
    frame = classify_frame(frame, cfg=cfg)  # done at claim in the DAG: then a no-op
    if frame is None:
        return None
    # One store client for the task's three store stages: making one costs ~0.15 core-s.
    store = open_store(cfg.store_url)
    lane = StoreLane()
    archive = lane.submit(lambda: archive_frame(frame, store=store, cfg=cfg))
    early = EarlyUpload(lane, store, cfg)
    try:
        processed = processed_frame(frame)
        if processed is not None:
            log.info("%s was processed by an earlier try of this task; storing its products",
                     frame.filename)
        else:
            processed = compute_frame(frame, cfg=cfg, on_event=early.on_event)
            if processed is not None:
                _save_processed(processed)
    except BaseException:
        # The raw frame is stored whatever became of the compute; the compute's error is the
        # one the task reports, an archive fault beside it is logged.
        try:
            archive.result(store_timeout)
        except Exception as exc:  # noqa: BLE001 - logged; the compute's error propagates
            log.error("archive of %s failed too: %s: %s", frame.filename, type(exc).__name__, exc)
        raise
    finally:
        stored = early.finish(store_timeout)
        lane.close()
    archived = archive.result(store_timeout)  # a store fault here: the retry only stores
    if processed is None:
        return None
    return ingest_frame(processed, archived={**archived, **stored}, store=store, cfg=cfg)


def run_info_ids() -> dict[str, Any]:
    """dag_id / run_id of the current task (for alerts)."""
    info = run_info()
    return {"dag_id": info["dag_id"], "run_id": info["run_id"]}
