"""
### IRIS reprocessing (`iris_reprocess`)

**What it does.** Re-reduces exactly the frames whose best references change under a new CRDS
context: for every processed science, sky and telluric frame in scope it asks CRDS for the
references of its own context and of the new one (`calib.references_changed`), and reruns
readout -> reduce -> quicklook -> ingest for the frames where any differ. New products get new
object keys with the context in the name (`<root>_cal.tmt_0007.fits`); the previous versions
stay, and the frame ledger records every version (`products.version`, `current`).

**When it runs.**
* On every event of the asset `iris/crds-context` (published by `iris_nightly_calibrations`):
  context from the event, frames from the event's night onwards.
* Daily at 21:00 UTC (a sweep; a no-op when everything is current): the night of the run's
  logical date against the operational context.
* By hand, with conf: `airflow dags trigger iris_reprocess -c '{"context": "tmt_0007.pmap",
  "night_from": "2026-11-01", "night_to": "2026-11-20"}'` (`force: true` reprocesses even
  without reference changes).
* Over past nights: `airflow backfill create --dag-id iris_reprocess --from-date 2026-11-01
  --to-date 2026-11-20` creates one run per night (daily schedule), each reprocessing that
  night against the operational context (or `--dag-run-conf '{"context": ...}'`).

**Runbook.** `select` lists every chosen frame with its reference changes in the log; nothing
chosen means nothing changed. A red `rp.process` (readout, reduce, quicklook; the log names
the stage) is an algorithm/reference problem (not retried); `rp.ingest` retries storage
faults with backoff. Without Airflow:
`iris-drs reprocess --context C --night-from A --night-to B [--dry-run]`.
"""

from __future__ import annotations

import datetime as dt

from airflow.sdk import (
    AssetOrTimeSchedule,
    CronTriggerTimetable,
    Param,
    dag,
    task_group,
)

from iris_tasks.config import settings
from iris_tasks.orchestration.assets import CRDS_CONTEXT
from iris_tasks.orchestration.dag_defaults import DEFAULT_ARGS, as_list, storage_task_args
from iris_tasks.orchestration.dag_tasks import iris_task

_cfg = settings()
_NIGHT = r"^\d{4}-\d{2}-\d{2}$"


@dag(
    dag_id="iris_reprocess",
    schedule=AssetOrTimeSchedule(timetable=CronTriggerTimetable("0 21 * * *", timezone="UTC"),
                                 assets=CRDS_CONTEXT),
    start_date=dt.datetime(2026, 1, 1, tzinfo=dt.UTC),
    catchup=False,
    max_active_runs=1,
    default_args=DEFAULT_ARGS,
    params={
        "context": Param(None, type=["null", "string"],
                         description="Target CRDS context (default: the event's, else operational)"),
        "night_from": Param(None, type=["null", "string"], pattern=_NIGHT, description="First night"),
        "night_to": Param(None, type=["null", "string"], pattern=_NIGHT, description="Last night"),
        "force": Param(False, type="boolean", description="Reprocess even without reference changes"),
    },
    tags=["iris", "reprocessing"],
    doc_md=__doc__,
)
def iris_reprocess():
    @iris_task(execution_timeout=dt.timedelta(minutes=5))
    def plan(**context) -> dict:
        """Target context and nights from params, the triggering event, or the logical date."""
        from iris_tasks.orchestration.reprocess import resolve_request

        events = [e.extra for e in context["triggering_asset_events"].get(CRDS_CONTEXT, [])]
        run_type = context["dag_run"].run_type
        # Only cron and backfill runs stand for "the night of the logical date".
        timed = getattr(run_type, "value", run_type) in ("scheduled", "backfill")
        return resolve_request(context["params"], events, context.get("logical_date") if timed else None)

    @iris_task(execution_timeout=dt.timedelta(minutes=30))
    def select(request: dict) -> list[dict]:
        """Frames whose references change (each with its changes, logged)."""
        from iris_tasks.orchestration.reprocess import select_frames

        return [f.to_dict() for f in select_frames(request["context"], request["nights"],
                                                   force=request["force"])]

    @task_group(group_id="rp")
    def reprocess_chain(frame: dict):
        @iris_task(label="frame", execution_timeout=dt.timedelta(minutes=20),
                   max_active_tis_per_dag=_cfg.compute_slots)
        def process(frame: dict) -> dict:
            """readout -> reduce -> quicklook under the target context (new product versions)."""
            from iris_tasks.orchestration.frame import Frame
            from iris_tasks.orchestration.reprocess import reprocess_products

            return reprocess_products(Frame.from_dict(frame)).to_dict()

        @iris_task(label="frame", **storage_task_args())
        def ingest(frame: dict) -> dict:
            from iris_tasks.orchestration.frame import Frame
            from iris_tasks.orchestration.realtime import ingest_frame
            from iris_tasks.orchestration.reprocess import variant_of

            return ingest_frame(Frame.from_dict(frame), variant=variant_of(frame["target_context"]))

        return ingest(process(frame))

    @iris_task(trigger_rule="all_done", execution_timeout=dt.timedelta(minutes=2))
    def summarize(request: dict, results: list) -> dict:
        from iris_tasks.orchestration.reprocess import summarize

        return summarize(as_list(results), request)

    request = plan()
    summarize(request, reprocess_chain.expand(frame=select(request)))


iris_reprocess()
