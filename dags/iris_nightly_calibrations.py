"""
### IRIS nightly calibrations (`iris_nightly_calibrations`)

**What it does.** After the night (08:00 Hawaii = 18:00 UTC; catchup off) it turns the night's
dark, flat and arc frames and its telluric standards into references and publishes them.
**Each run is one night: its partition key** (`2026-12-07`; the run on the morning of the 8th
is partition `2026-12-07`):

1. `gather` - the night's processed darks (`*-DRK`), flats (`IMG1-NFF`, `SLI-NFF`,
   `LEN-SPX`) and arcs (`*-IDP`) as `_rate` images, and its telluric standards (`LEN-TEL`,
   `SLI-TEL`) as the `_s3d` cubes and its imager standards (`IMG1-TEL`) as the `_cal` frames
   the real-time chain made, from the frame ledger, plus any
   found only in the object store (`products/<night>/<det>/<obsname>/`);
2. `build` - master darks per DETECTOR/EXPTIME/READPATT, IFS instrument models, then master
   flats per DETECTOR/FILTER/IFSMODE (dark-subtracted with the new darks); groups with < 3
   frames are skipped. Then **one `telluric` reference per standard** (the star's response,
   `build_telluric`, docs/telluric.md): USEAFTER = its exposure start, except the night's
   first standard of each DETECTOR/IFSMODE/IFSSCALE/FILTER, whose USEAFTER is the night's
   start so that CRDS also serves it to the frames taken before it. A standard that gives no
   response (no star, saturated, wrong spectral type, magnitude in another band) is a
   `*_telluric.failed.json` with the reason: its `qa` task fails with it, the others go on.
   Likewise **one `photom` zero point per imager standard** (`build_photom`, photutils
   aperture; the same USEAFTER rule per DETECTOR/FILTER; `*_photom.failed.json` for no star,
   a saturated core, a magnitude in another band);
3. `qa` (one per master) - against the reference the current context selects for the same
   parameters. Darks: level shift <= 1 pixel-RMS, residual RMS <= 3x the master's ERR, change
   in hot+warm pixels <= 1 % of pixels. Flats: median ratio 0.9-1.1, RMS ratio 0.5-2,
   change in flagged pixels <= 2 %; IFS lamp flats also: per-spaxel lamp throughput against
   the trace's <= 0.1 rms (`thruput_rms`) and trace profile bias <= 0.05 (`profile_bias`),
   checked even without a predecessor. Telluric references: median S/N per bin >= 30
   (`response_snr`), hydrogen-line residual <= 0.02 (`line_residual`), bins without a response
   <= 20 % (`masked_fraction`), on their own numbers (the atmosphere differs every night; the
   ratio to the previous standard's response is shown). Zero points: the star's S/N >= 100
   (`star_snr`) and PHOTZPER <= 0.01 mag (`zero_point_err`), the change against the previous
   zero point shown. **A master beyond a threshold fails its task (red, no
   retry) with every metric in the log**; the others still go on and `qa_verdict` fails the run at the end;
4. `approve` - **the on-duty operator approves** all, some or none of the masters that passed
   QA (`IRIS_CALIBRATION_APPROVAL=operator`): the task waits (*awaiting input*) on the
   **Required Actions** page with the QA numbers of each master against its predecessor;
   options `Approve all`, one per master, `Reject`, and a `reason`. Unanswered after
   `IRIS_APPROVAL_TIMEOUT` hours (12): `IRIS_APPROVAL_DEFAULT` (`reject`, or
   `publish-if-green`: all, if every master passed QA). `auto` (default; dev stack, demo,
   tests): approved at once;
5. `publish` - the approved masters become references in a **new CRDS context** (made
   operational) and the asset `iris/crds-context` gets an event **for the night's partition**
   (`partition_key` = the night) with extra `{"context", "previous", "night", "references"}` -
   this triggers `iris_reprocess` for that night only, which re-reduces the night's IFS
   science frames whose `telluric` selection changed (none -> the new standard): their cubes
   come out in erg/s/cm^2/A/arcsec^2, and the imager science frames whose `photom` changed:
   their `_cal` come out in MJy/sr (sky frames and standards use neither). Every
   decision is recorded (ledger `calibration_decisions`, a JSON document, lineage); after a
   rejection `publish` is skipped with who and why, and the previous context stays;
6. `archive` - copies of the published masters in the store under `references/<night>/...`.

**The night** is the run's partition key; a manual run without one takes the `night` param
(YYYY-MM-DD), else the night that ended before the run was created. Another night by hand:
*Trigger* with partition key `2026-11-20` (UI, or `POST /api/v2/dags/iris_nightly_calibrations/dagRuns`
with `{"logical_date": null, "partition_key": "2026-11-20"}`), or `airflow dags trigger
iris_nightly_calibrations -c '{"night": "2026-11-20"}'` (the CLI has no partition key in
3.3.2). Nights 2026-11-20 .. 2026-11-22 again: `airflow backfill create --dag-id
iris_nightly_calibrations --from-date 2026-11-20 --to-date 2026-11-22T12:00` (one run per
night, partition instant = the night's date at 08:00 Hawaii; `--dry-run` lists them).

**Runbook.** A red `qa` task: inspect the metrics in its log (`QAError`), the master file
(path in the log) and the night's input frames (`iris-drs ledger --night N`). A red `qa` of a
`*_telluric.failed.json` names the standard's cube and why it gave no response (2026-12-07):
the night's IFS cubes then use the night's other standards of that configuration, else stay
in e-/s (the previous night's standard is further than the step's 12 h); a standard with a
wrong header (STDSPTYP/STDMAG/STDMAGBD) can be fixed in its cube and the night run again. A
telluric reference failing `response_snr` or `masked_fraction`: a faint, clouded or badly
placed standard (`TELSTARX/Y` in its header); `line_residual`: stellar hydrogen lines left in
the response (a cooler or peculiar star than STDSPTYP says). Such a master is not published;
the night's cubes use its other standards. Override a
threshold for one run with `IRIS_QA_THRESHOLDS` (JSON) only after understanding why. The
previous context stays operational for anything that did not pass. An `approve` task waiting:
read its body, answer on the Required Actions page (or `PATCH .../taskInstances/approve/-1/
hitlDetails`, docs/airflow.md); reject with a reason rather than leave it to the timeout. A
rejected night: fix the cause, trigger the DAG again for that partition key (or conf
`{"night": ...}`); its published context reprocesses that night (`iris_reprocess`), later
nights it makes stale are listed by `iris-drs nights --operational --stale` and reprocessed by
a backfill of `iris_reprocess_nights`. With catchup off, unpausing this DAG runs the latest
night at once (Airflow 3.3.2's partitioned cron). The same steps without Airflow (no
approval): `iris-drs nightly NIGHT`.
"""

from __future__ import annotations

import datetime as dt

from airflow.sdk import Param, dag

from iris_tasks.orchestration.approval_operator import MasterApprovalOperator
from iris_tasks.orchestration.assets import CRDS_CONTEXT
from iris_tasks.orchestration.dag_defaults import DEFAULT_ARGS, as_list, storage_task_args
from iris_tasks.orchestration.dag_tasks import iris_task
from iris_tasks.orchestration.nights import NIGHT_PATTERN, night_partitions


def _night(context) -> str:
    """The run's partition key (the night), else the ``night`` param, else the night that
    ended before the run."""
    from iris_tasks.orchestration.nights import night_of_run

    return night_of_run(context)


@dag(
    dag_id="iris_nightly_calibrations",
    # 08:00 Hawaii (18:00 UTC) on day D: partition key D-1, the night that just ended.
    schedule=night_partitions(8),
    start_date=dt.datetime(2026, 1, 1, tzinfo=dt.UTC),
    catchup=False,
    max_active_runs=1,
    default_args=DEFAULT_ARGS,
    params={"night": Param(None, type=["null", "string"], pattern=NIGHT_PATTERN,
                           description="Observing night YYYY-MM-DD of a run without a partition "
                                       "key (default: the night just ended)")},
    tags=["iris", "calibration", "nightly"],
    doc_md=__doc__,
)
def iris_nightly_calibrations():
    @iris_task(execution_timeout=dt.timedelta(minutes=15))
    def gather(**context) -> dict:
        """The night's dark and flat rate images (ledger first, then the store)."""
        from iris_tasks.orchestration.nightly import gather_calibrations

        return gather_calibrations(_night(context))

    @iris_task(execution_timeout=dt.timedelta(minutes=60))
    def build(gathered: dict) -> list[str]:
        """Master darks, then flats using the new darks."""
        from iris_tasks.orchestration.nightly import build_masters

        return build_masters(gathered)

    @iris_task(label="master", execution_timeout=dt.timedelta(minutes=10))
    def qa(master: str) -> dict:
        """One master vs its predecessor; fails loudly (no retry) beyond the thresholds."""
        from airflow.sdk.exceptions import AirflowFailException

        from iris_tasks.orchestration.nightly import QAError, qa_master

        try:
            return qa_master(master)
        except QAError as exc:
            raise AirflowFailException(str(exc)) from exc

    @iris_task(outlets=[CRDS_CONTEXT], execution_timeout=dt.timedelta(minutes=10))
    def publish(decision: dict, **context) -> dict:
        """Publish the approved masters as a new operational CRDS context; announce it.
        A rejection is recorded (ledger, lineage) and the previous context stays."""
        from airflow.sdk.exceptions import AirflowSkipException

        from iris_tasks.orchestration.nightly import publish_masters

        night = _night(context)
        result = publish_masters(decision["reports"], night, decision=decision)
        if result is None:
            raise AirflowSkipException(
                f"night {night}: masters {decision['decision']} by {decision['by']} "
                f"({decision['how']}): {decision['reason'] or 'no reason given'}; nothing published")
        # The event belongs to the night's partition, also in a manual run without a key (the
        # night param): iris_reprocess is scheduled on the partitioned asset.
        context["outlet_events"][CRDS_CONTEXT].add_partitions(night)
        context["outlet_events"][CRDS_CONTEXT].extra = result
        return {**result, "masters": decision["approved"]}

    @iris_task(**storage_task_args(timeout=dt.timedelta(minutes=10)))
    def archive(published: dict) -> list[str]:
        """Copies of the published masters in the object store."""
        from iris_tasks.orchestration.nightly import archive_masters

        return archive_masters(published["masters"], published["night"])

    @iris_task(trigger_rule="all_done", execution_timeout=dt.timedelta(minutes=2))
    def qa_verdict(masters: list, reports: list) -> dict:
        """Fail the run (after publishing what passed) if any master failed QA."""
        from airflow.sdk.exceptions import AirflowFailException

        passed = {r["master"] for r in as_list(reports) if r.get("passed")}
        rejected = [m for m in as_list(masters) if m not in passed]
        if rejected:
            raise AirflowFailException(
                f"{len(rejected)} master(s) failed QA and were not published (see the qa tasks): "
                + ", ".join(rejected))
        return {"published": sorted(passed)}

    masters = build(gather())
    reports = qa.expand(master=masters)
    approve = MasterApprovalOperator(
        task_id="approve", reports=reports, masters=masters,
        trigger_rule="all_done_min_one_success",
        doc_md="The on-duty operator approves all, some or none of the masters that passed QA "
               "(Required Actions page); IRIS_CALIBRATION_APPROVAL=auto approves them at once.")
    archive(publish(approve.output))
    qa_verdict(masters, reports)


iris_nightly_calibrations()
