"""
### IRIS real-time reduction (`iris_realtime`)

**What it does.** Every raw frame written into the landing area is reduced within seconds.
One mapped task **frame** per frame (the map index is the file name): it stores the raw file
right away, beside validate + classify (OBSTYPE/OBSNAME) -> readout (ramp fit, `_rate`) -> the
OBSNAME's stage-2 recipe (imager `_cal`, IFS `_s3d`) -> quicklook PNG, computed by a warm
compute-server worker when one runs; the `_rate` product is stored as soon as it is written;
then the stage-2 product and the quicklook are stored and the frame is closed. One task, not
one per stage: a task start costs more CPU than the imager's science (docs/airflow.md, cost per
frame). The night page (plugin *IRIS night*) and `iris-drs ledger --frame ID` show each
stage's time and CPU (archive, classify, readout, reduce, quicklook, early_upload, ingest).

**How it is triggered.** No polling sensor: the asset `iris/landing` has an AssetWatcher whose
trigger (`iris_tasks.orchestration.triggers`) scans the landing area (`$IRIS_LANDING`, a
directory or `s3://bucket/prefix`) every 0.5 s inside the triggerer and emits one event per new
file. The scheduler starts a run for the events queued so far; `claim` also picks up anything
else waiting (so a manual run drains the landing area).

**Runbook.**
* *A file was quarantined* (bad header, truncated or damaged FITS, wrong data type, implausible
  ramp: decided in `claim`, which logs it; the frame gets no `frame` task). See
  `<state>/quarantine/<night>/<frame_id>/reason.json` (also in the store under
  `quarantine/`); fix the file and drop it into the landing area again.
* *A file does not get picked up*: the landing area claims only whole files (atomic rename,
  or a complete FITS file untouched for `IRIS_LANDING_SETTLE_SECONDS`); a file still
  incomplete after `IRIS_LANDING_STALE_SECONDS` is claimed and quarantined as truncated.
  Compressed files, sub-directories and links are ignored and listed on the night page
  ("Ignored in the landing area").
* *The run is red*: at least one frame (or the claim) failed; the red task's log says why,
  and the run's failure callback (dag-processor log) lists every failed frame of the run with
  its error, after closing as failed any frame whose task ended without closing it (killed,
  timed out), so no frame stays "processing".
* *A file name arrives again with other bytes* (a corrected re-send): it is processed as a
  new frame; its raw is archived as `<stem>.<frame_id>.fits` beside the first, and the
  earlier frame becomes `superseded` when the new one is done.
* *A compute worker died under a frame*: the frame is computed again at once in the task
  process (ledger alert `compute_retry`); a second loss fails it.
* *A frame is red in `frame`*: the log names the stage (readout, reduce, quicklook,
  archive, ingest), the step and the reference. An algorithm or reference problem is not
  retried: re-run with `iris-drs process-frame RAW` after fixing, or clear the task. A store
  fault (object store down, throttled) is retried 4 times with exponential backoff, and a
  retry only stores: the computed products are kept in the frame's work directory
  (`processed.json`); meanwhile the frame stays `processing` on the night page with the fault
  and the try as its error. Still red after that: check the store, then clear the task.
* *`frame` logs "compute server ... refused ...; computing in this process"*: the frame
  is still processed, only slower. "stale code": the server restarts itself on the new code;
  "configuration differs: <variables>": restart the compute server with the workers'
  environment. `iris-drs compute-server --ping` (in the workers' environment) says whether
  it is up and would serve them; its log is `<state>/logs/compute.log` (local stack) or the
  `iris-compute` container's (Kubernetes).
* *Deadline missed* (imager 30 s, IFS 60 s after landing): logged at ERROR, recorded in the
  frame ledger (`alerts`, `frames.deadline_missed`), POSTed to `$IRIS_ALERT_WEBHOOK` if set, and
  shown on the run's Deadlines: each run gets a Deadline Alert per kind of frame it holds
  (imager: earliest imager landing + 30 s; IFS: earliest IFS landing + 60 s), counted from
  when the frames landed, not from when the run started (custom reference
  `FramesLandedDeadline`, plugin `iris_deadlines`). A miss there with the frame reduced in
  time in the ledger means the run started late (trigger, scheduler); the per-frame ledger
  check is the cross-check. Manual runs have no Deadline Alert (ledger check only).
* Duplicate arrivals (same bytes) are recognised in `claim` and not processed twice.

Each reduced frame adds an event to the asset `iris/products` in its night's partition
(`partition_key` = the night, extra: the CRDS context, the frame id): the night's history in
the asset view. Which nights need reprocessing: `iris-drs nights --operational --stale` (docs/airflow.md).

Ledger: `<state>/ledger.sqlite` (`iris-drs ledger`). Docs: docs/airflow.md.
"""

from __future__ import annotations

import datetime as dt

from airflow.sdk import Asset, AssetWatcher, AsyncCallback, DeadlineAlert, dag

from iris_tasks.config import settings
from iris_tasks.metadata import DEADLINE_SECONDS
from iris_tasks.orchestration.assets import PRODUCTS
from iris_tasks.orchestration.dag_defaults import DEFAULT_ARGS, storage_task_args
from iris_tasks.orchestration.dag_tasks import iris_task
from iris_tasks.orchestration.deadline_refs import FramesLandedDeadline
from iris_tasks.orchestration.triggers import LEDGER_FROM_ENV, landing_trigger

_cfg = settings()

LANDING = Asset(
    "iris/landing",
    watchers=[
        AssetWatcher(
            name="iris_landing_watcher",
            trigger=landing_trigger(
                _cfg.landing,
                ledger_path=LEDGER_FROM_ENV,  # never a URL with a password in the DAG
                poll_interval=_cfg.landing_poll_seconds,
                aws_conn_id=_cfg.s3_conn_id,
                settle_seconds=_cfg.landing_settle_seconds,
                stale_seconds=_cfg.landing_stale_seconds,
            ),
        )
    ],
)

_ALERT = "iris_tasks.orchestration.alerts.realtime_run_deadline_missed"
IMAGER_DEADLINE = DEADLINE_SECONDS["imager"]
IFS_DEADLINE = DEADLINE_SECONDS["lenslet"]
assert DEADLINE_SECONDS["slicer"] == IFS_DEADLINE, "one IFS Deadline Alert serves both IFS modes"


def close_failed_run(context) -> None:
    """Run failed (a frame's task failed, was killed or timed out, or the claim failed): close
    as failed every frame of the run its task left open, alert frames unfinished past their
    deadline, and log the run's failed frames with their errors."""
    from iris_tasks.orchestration.run_summary import close_failed_run as close

    run_id = context.get("run_id") or context["dag_run"].run_id
    close(run_id)


@dag(
    dag_id="iris_realtime",
    schedule=[LANDING],
    start_date=dt.datetime(2026, 1, 1, tzinfo=dt.UTC),
    catchup=False,
    # Runs are cheap (one per landing batch); a low cap would hold new frames back behind
    # runs that only wait for their summary.
    max_active_runs=16,
    default_args=DEFAULT_ARGS,
    tags=["iris", "real-time"],
    doc_md=__doc__,
    # A run fails when any of its tasks failed; only then is there anything to clean up, so
    # the clean-up is a callback, not a task that would start a process for every run.
    on_failure_callback=close_failed_run,
    # Counted from when the run's frames landed, per recipe budget (plugin iris_deadlines);
    # a run gets only the alerts of the kinds of frames it holds.
    deadline=[
        DeadlineAlert(reference=FramesLandedDeadline(budget_seconds=seconds),
                      interval=dt.timedelta(seconds=seconds), name=f"{label} {seconds:g} s after landing",
                      callback=AsyncCallback(_ALERT, kwargs={"label": f"{label} {seconds:g} s"}))
        for label, seconds in (("imager", IMAGER_DEADLINE), ("IFS", IFS_DEADLINE))
    ],
)
def iris_realtime():
    @iris_task(**storage_task_args(timeout=dt.timedelta(minutes=5)))
    def claim(**context) -> list[dict]:
        """Claim the announced frames (and any other whole one waiting) by content hash, and
        classify them: bad input is quarantined here, ahead of any compute."""
        from iris_tasks.orchestration.landing import claim_frames
        from iris_tasks.orchestration.realtime import admit_frames

        events = context["triggering_asset_events"].get(LANDING, [])
        payloads = [(e.extra or {}).get("payload") for e in events]
        ti = context["ti"]
        frames = admit_frames(claim_frames([p for p in payloads if p], dag_id=ti.dag_id,
                                           run_id=ti.run_id))
        return [f.to_dict() for f in frames]  # XCom carries the Frame as its dict

    # One task per frame: a task start costs ~0.3 core-s of Airflow here even for a no-op
    # (bench/bench_task_start.py), and one of ours several times that; three tasks per frame
    # made Airflow cost more than the imager's science. The stages stay visible in the ledger
    # and on the night page, retries resume at the store (iris_tasks.orchestration.frame_task).
    # At most compute_slots + 1 frames at once: one storing while the others compute.
    @iris_task(label="frame", max_active_tis_per_dag=_cfg.compute_slots + 1, outlets=[PRODUCTS],
               **storage_task_args(timeout=dt.timedelta(minutes=15)))
    def frame(frame: dict, **context) -> dict:
        """Archive the raw frame (beside the compute); validate + classify, readout (_rate),
        stage 2 (_cal/_s3d), quicklook PNG on a warm compute-server worker (else in this task),
        the rate stored as soon as it is written; then store the products and close the frame.

        Retried only for store faults, with backoff, and a retry only stores: the compute's
        result is kept in the frame's work directory. A bad frame is quarantined (skipped);
        a failing step fails the task at once and needs an operator.
        """
        from iris_tasks.errors import FrameSkipped
        from iris_tasks.orchestration.frame import Frame
        from iris_tasks.orchestration.frame_task import run_frame_task

        out = run_frame_task(Frame.from_dict(frame))
        if out is None:
            raise FrameSkipped(f"{frame['filename']} quarantined (see reason.json)")
        # The night's products, as a partition of iris/products (travels with the task's
        # success call: no request of its own).
        context["outlet_events"][PRODUCTS].add_partitions(out["night"])
        context["outlet_events"][PRODUCTS].extra = {"context": out.get("crds_context"),
                                                    "frames": [out["frame_id"]]}
        return out

    frame.expand(frame=claim())


iris_realtime()
