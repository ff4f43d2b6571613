"""Nights as asset partitions (:mod:`iris_tasks.orchestration.nights`), against a real
scheduler, DAG processor and API server (``tests/live_airflow.py``), driven through the REST
API as the UI does.

Two processed nights X and Y on the pre-night references, nothing stale. Then:

1. ``iris_nightly_calibrations`` is triggered for partition X: its masters (approved, the
   automatic path) become a new context, announced on ``iris/crds-context`` for partition X;
   both nights are now stale (X's masters apply from X on);
2. that event starts ``iris_reprocess`` for partition X only: X's science frame is re-reduced,
   Y's is not, and only Y is stale;
3. a backfill of ``iris_reprocess_nights`` over X..Y (``POST /api/v2/backfills``) creates one
   run per night with the night as its partition key: Y is re-reduced, X had nothing to do,
   and no night is stale. ``iris/products`` has an event per night's partition; in the UI
   (headless Chromium, when installed) the run's page shows its partition key and the DAG's
   page the asset events of each night.
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from test_plugin_browser import CHROMIUM, chromium, screenshot, visible_text  # isort: skip

NIGHT_X, NIGHT_Y = "2026-11-20", "2026-11-21"


def _processed_nights(env: dict[str, str], sim_dir: Path) -> tuple[str, dict[str, str]]:
    """Night X (darks, flats, a science frame) and night Y (a science frame) processed without
    Airflow over X's pre-night references; returns the pre-night context and the science
    frames' ids by night."""
    from iris_tasks.calib.testing import temporary_cache
    from iris_tasks.orchestration.local_run import process_paths
    from iris_tasks.simulate import NightPlan, simulate_night

    x = simulate_night(sim_dir / "x", size=64, nreads=4, detectors=["IMG1"], seed=5, night=NIGHT_X,
                       plan=NightPlan(n_dark=2, n_flat=2, n_sky=0, n_science=1, imager_filters=("Ks",)))
    y = simulate_night(sim_dir / "y", size=64, nreads=4, detectors=["IMG1"], seed=6, night=NIGHT_Y,
                       plan=NightPlan(n_dark=0, n_flat=0, n_sky=0, n_science=1, imager_filters=("Ks",)))
    files = [str(sim_dir / "x" / f["path"]) for f in x["files"]] + \
        [str(sim_dir / "y" / f["path"]) for f in y["files"]]
    with temporary_cache(env["IRIS_CRDS_PATH"]) as calib:
        first = calib.publish_references([str(sim_dir / "x" / r["path"]) for r in x["references"]],
                                         "pre-night")
        results = process_paths(files, ingest=True)
    assert [r["status"] for r in results] == ["done"] * len(files)
    science = {r["night"]: r["frame_id"] for r in results if r["obsname"] == "IMG1-SCI"}
    assert set(science) == {NIGHT_X, NIGHT_Y}
    return first, science


def _stale(env: dict[str, str]) -> tuple[str, list[str]]:
    """The operational context and the stale nights, as the night page would ask."""
    from iris_tasks.calib.testing import temporary_cache
    from iris_tasks.orchestration.ledger import FrameLedger
    from iris_tasks.orchestration.reprocess import stale_nights

    ledger = FrameLedger(Path(env["IRIS_STATE_DIR"]) / "ledger.sqlite", readonly=True)
    with temporary_cache(env["IRIS_CRDS_PATH"]) as calib:
        return calib.operational_context(), stale_nights(ledger=ledger)


@pytest.mark.slow
@pytest.mark.services
def test_calibration_reprocesses_its_night_and_a_backfill_covers_the_stale_ones(
        tmp_path, migrated_db, monkeypatch):
    from live_airflow import AirflowAPI, airflow_test_env, running, wait_for

    from iris_devstack.services.seaweedfs import pick_ports
    from iris_tasks.orchestration.ledger import FrameLedger

    env = airflow_test_env(tmp_path, migrated_db, api_port=pick_ports(1)[0])
    env["AIRFLOW__CORE__DAGS_ARE_PAUSED_AT_CREATION"] = "True"
    for key in ("IRIS_STATE_DIR", "IRIS_LANDING", "IRIS_STORE_URL", "IRIS_CRDS_PATH"):
        monkeypatch.setenv(key, env[key])
    before, science = _processed_nights(env, tmp_path / "sim")
    ledger = FrameLedger(Path(env["IRIS_STATE_DIR"]) / "ledger.sqlite")
    assert _stale(env) == (before, [])

    nightly, reprocess, nights = "iris_nightly_calibrations", "iris_reprocess", "iris_reprocess_nights"
    with running(env, tmp_path) as logs:
        api = AirflowAPI(env)
        for dag_id in (nightly, reprocess, nights):
            wait_for(lambda d=dag_id: api.dag_registered(d), 180, f"{dag_id} registered", logs)
            api.unpause(dag_id)

        def finished(dag_id: str, keys: list[str], what: str) -> list[dict]:
            """The runs of these partition keys once they are all over (unpausing a DAG on a
            partitioned cron also makes the run of the latest night, with catchup off: not
            ours)."""
            def done() -> list[dict] | None:
                found = [r for r in api.get(f"/dags/{dag_id}/dagRuns", limit=50)["dag_runs"]
                         if r["partition_key"] in keys]
                if len(found) >= len(keys) and all(r["state"] in ("success", "failed") for r in found):
                    return sorted(found, key=lambda r: r["partition_key"])
                return None
            return wait_for(done, 300, what, logs)

        # 1. The masters of night X, as the UI's Trigger with a partition key does.
        run = api.post(f"/dags/{nightly}/dagRuns", {"logical_date": None, "partition_key": NIGHT_X})
        assert run["partition_key"] == NIGHT_X
        (cal_run,) = finished(nightly, [NIGHT_X], f"{nightly} for {NIGHT_X}")
        assert cal_run["state"] == "success", api.task_states(nightly, cal_run["dag_run_id"])
        ctx, stale = _stale(env)
        assert ctx != before and stale == [NIGHT_X, NIGHT_Y]
        events = api.asset_events(limit=50, order_by="timestamp")
        (announced,) = [e for e in events if e["uri"] == "iris/crds-context"]
        assert announced["partition_key"] == NIGHT_X and announced["extra"]["context"] == ctx

        # 2. The event starts iris_reprocess for that partition, and only for it.
        (rp_run,) = finished(reprocess, [NIGHT_X], f"{reprocess} for partition {NIGHT_X}")
        assert [r["partition_key"] for r in api.get(f"/dags/{reprocess}/dagRuns")["dag_runs"]] == [NIGHT_X]
        assert (rp_run["state"], rp_run["partition_key"], rp_run["run_type"]) == (
            "success", NIGHT_X, "asset_triggered"), api.task_states(reprocess, rp_run["dag_run_id"])
        assert ledger.frame(science[NIGHT_X])["crds_context"] == ctx
        assert ledger.frame(science[NIGHT_Y])["crds_context"] == before
        assert _stale(env) == (ctx, [NIGHT_Y])

        # 3. Backfill nights X..Y (the REST API; `airflow backfill create` does the same):
        # the partition instant of night N is N at 11:00 Hawaii; Airflow reads the bounds' wall
        # clock as the timetable's time zone (the UTC offset is dropped).
        backfill = api.post("/backfills", {"dag_id": nights, "from_date": f"{NIGHT_X}T00:00:00Z",
                                           "to_date": f"{NIGHT_Y}T12:00:00Z", "max_active_runs": 1})
        assert backfill["dag_id"] == nights
        filled = finished(nights, [NIGHT_X, NIGHT_Y], f"the backfill of {nights}")
        assert sorted((r["partition_key"], r["run_type"], r["state"]) for r in filled) == [
            (NIGHT_X, "backfill", "success"), (NIGHT_Y, "backfill", "success")]
        summaries = {r["partition_key"]: api.get(
            f"/dags/{nights}/dagRuns/{r['dag_run_id']}/taskInstances/summarize/xcomEntries/return_value",
            deserialize=True)["value"] for r in filled}
        assert summaries[NIGHT_X]["reprocessed"] == 0 and summaries[NIGHT_Y]["frames"] == [science[NIGHT_Y]]
        assert summaries[NIGHT_Y]["nights"] == [NIGHT_Y, NIGHT_Y] and summaries[NIGHT_Y]["stale_nights"] == []
        products = [e for e in api.asset_events(limit=50) if e["uri"] == "iris/products"]
        if CHROMIUM:  # the UI (Airflow 3.3.2): a run's page and a DAG's asset events show the keys
            run_page = f"{api.base}/dags/{reprocess}/runs/{rp_run['dag_run_id']}"
            dom = visible_text(chromium(["--dump-dom", "--virtual-time-budget=15000", run_page], tmp_path / "ui").stdout)
            assert f"Partition Key {NIGHT_X}" in dom, dom[-3000:]
            dom = visible_text(chromium(["--dump-dom", "--virtual-time-budget=15000", f"{api.base}/dags/{nights}"],
                                 tmp_path / "ui").stdout)
            assert f"Partition Key: {NIGHT_X}" in dom and f"Partition Key: {NIGHT_Y}" in dom, dom[-3000:]
            screenshot(run_page, tmp_path, "reprocess_partition", "1400,900", 15000)
        api.close()

    assert ledger.frame(science[NIGHT_Y])["crds_context"] == ctx
    assert _stale(env) == (ctx, [])
    # iris/products: one event per reprocessing run, in that run's night (the sweep of the
    # latest night, made when the DAG was unpaused, found nothing to do there).
    ours = [e for e in products if e["partition_key"] in (NIGHT_X, NIGHT_Y)]
    assert sorted(e["partition_key"] for e in ours) == [NIGHT_X, NIGHT_X, NIGHT_Y]
    assert all(e["extra"]["context"] == ctx for e in ours)
    assert all(e["extra"]["reprocessed"] == {} for e in products if e not in ours)
    # The CLI's backfill lists the same runs: one per night, keyed by the night.
    proc = subprocess.run([sys.executable, "-m", "airflow", "backfill", "create", "--dag-id", nights,
                           "--from-date", NIGHT_X, "--to-date", f"{NIGHT_Y}T12:00", "--dry-run"],
                          env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert NIGHT_X in proc.stdout and NIGHT_Y in proc.stdout, proc.stdout
