"""
### IRIS reprocessing (`iris_reprocess`, `iris_reprocess_nights`)

**What it does.** Re-reduces exactly the frames of **one night** (the run's partition key,
e.g. `2026-12-07`) whose best references change under a CRDS context: for every processed
science, sky and telluric frame of the night it asks CRDS for the references of its own
context and of the target one (`calib.references_changed`), and reruns readout -> reduce ->
quicklook -> ingest for the frames where any differ. New products get new object keys with the
context in the name (`<root>_cal.tmt_0007.fits`); the previous versions stay, and the frame
ledger records every version (`products.version`, `current`). The run ends with an event of
the asset `iris/products` for the night (extra: the context, the frames re-reduced, and
whether the night is still stale).

**Two DAGs, one set of tasks.**
* `iris_reprocess` - scheduled on the partitioned asset `iris/crds-context`: an approved
  night's masters published by `iris_nightly_calibrations` (partition = that night) start a
  run for **that night only**, against the context of the event. Reprocess night X by hand:
  *Trigger* with partition key `X` (UI, or `POST /api/v2/dags/iris_reprocess/dagRuns`
  `{"logical_date": null, "partition_key": "X"}`), against the operational context or conf
  `context`. A run without a key (`airflow dags trigger iris_reprocess -c '{"night_from":
  "2026-11-01", "night_to": "2026-11-20"}'`) works on those nights.
* `iris_reprocess_nights` - the daily sweep and the **backfill**: at 11:00 Hawaii (21:00 UTC)
  on day D a run for night D-1 against the operational context (a no-op when it is current).
  Nights X..Y: `airflow backfill create --dag-id iris_reprocess_nights --from-date X --to-date
  YT12:00` (one run per night, partition key = the night; the partition instant of night N is N
  at 11:00 Hawaii, so a bare `--to-date Y` stops at Y-1), or `POST /api/v2/backfills`
  `{"dag_id": "iris_reprocess_nights", "from_date": "XT00:00:00", "to_date": "YT12:00:00"}`
  (read as Hawaii time), or the UI's *Backfill* dialog. The DAG must be unpaused.
  `--dag-run-conf '{"context": "tmt_0007.pmap"}'` for another target, `--dry-run` to list.

**Which nights are stale** (processed frames whose references differ under the operational
context): `iris-drs nights --operational --stale` (`--json`), or in Python
`iris_tasks.orchestration.reprocess.night_states()`; backfill exactly those nights.

**Runbook.** `select` lists every chosen frame with its reference changes in the log; nothing
chosen means nothing changed. A red `rp.process` (readout, reduce, quicklook; the log names
the stage) is an algorithm/reference problem (not retried); `rp.ingest` retries storage
faults with backoff. `summarize` logs the nights still stale afterwards (a frame CRDS could
not compare, or a failed `rp` task). Without Airflow:
`iris-drs reprocess --context C --night-from A --night-to B [--dry-run]`.
"""

from __future__ import annotations

import datetime as dt

from airflow.sdk import Param, PartitionedAssetTimetable, dag, task_group

from iris_tasks.config import settings
from iris_tasks.orchestration.assets import CRDS_CONTEXT, PRODUCTS
from iris_tasks.orchestration.dag_defaults import DEFAULT_ARGS, as_list, storage_task_args
from iris_tasks.orchestration.dag_tasks import iris_task
from iris_tasks.orchestration.nights import NIGHT_PATTERN, night_partitions

_cfg = settings()


def reprocess_dag(dag_id: str, schedule, *, description: str, tags: list[str]):
    """One reprocessing DAG (the tasks are the same for the asset-driven and the timed one)."""

    @dag(
        dag_id=dag_id,
        schedule=schedule,
        start_date=dt.datetime(2026, 1, 1, tzinfo=dt.UTC),
        catchup=False,
        max_active_runs=1,
        default_args=DEFAULT_ARGS,
        description=description,
        params={
            "context": Param(None, type=["null", "string"],
                             description="Target CRDS context (default: the event's, else operational)"),
            "night_from": Param(None, type=["null", "string"], pattern=NIGHT_PATTERN,
                                description="First night (runs without a partition key)"),
            "night_to": Param(None, type=["null", "string"], pattern=NIGHT_PATTERN,
                              description="Last night (runs without a partition key)"),
            "force": Param(False, type="boolean", description="Reprocess even without reference changes"),
        },
        tags=["iris", "reprocessing", *tags],
        doc_md=__doc__,
    )
    def reprocessing():
        @iris_task(execution_timeout=dt.timedelta(minutes=5))
        def plan(**context) -> dict:
            """Target context from params or the triggering event; the night from the run's
            partition key (params night_from/night_to for a run without one)."""
            from iris_tasks.orchestration.reprocess import resolve_request

            events = [e.extra for e in context["triggering_asset_events"].get(CRDS_CONTEXT, [])]
            return resolve_request(context["params"], events,
                                   partition_key=context["dag_run"].partition_key)

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

        @iris_task(trigger_rule="all_done", outlets=[PRODUCTS], execution_timeout=dt.timedelta(minutes=5))
        def summarize(request: dict, results: list, **context) -> dict:
            """What was re-reduced, and the nights still stale; an ``iris/products`` event per
            night (the run's partition, or the nights with re-reduced frames)."""
            from iris_tasks.orchestration.reprocess import summarize

            summary = summarize(as_list(results), request)
            key = context["dag_run"].partition_key
            nights = [key] if key else sorted(summary["by_night"])
            if nights:
                context["outlet_events"][PRODUCTS].add_partitions(nights)
                context["outlet_events"][PRODUCTS].extra = {
                    "context": summary["context"], "reprocessed": summary["by_night"],
                    "stale_nights": summary["stale_nights"]}
            return summary

        request = plan()
        summarize(request, reprocess_chain.expand(frame=select(request)))

    return reprocessing()


iris_reprocess = reprocess_dag(
    "iris_reprocess", PartitionedAssetTimetable(assets=CRDS_CONTEXT),
    description="Reprocess the night of a new CRDS context (partitioned iris/crds-context)",
    tags=["partitioned"])
# 11:00 Hawaii (21:00 UTC) on day D: partition key D-1, the night that ended that morning.
iris_reprocess_nights = reprocess_dag(
    "iris_reprocess_nights", night_partitions(11),
    description="Daily sweep and backfill: one night per run against the operational context",
    tags=["partitioned", "backfill"])
