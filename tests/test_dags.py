"""The DAGs under Airflow: import hygiene, task policy, the landing triggers, and the three
DAGs end to end with ``dag.test()`` against a real SeaweedFS on a small simulated night.

Airflow reads its configuration when first imported, so everything that imports Airflow runs
in a subprocess with the environment from :func:`iris_devstack.airflow_env.airflow_env` (its own
AIRFLOW_HOME under tmp). ``airflow db migrate`` runs once per test run (the ``migrated_db``
fixture of conftest.py); each test copies the migrated SQLite file into its own AIRFLOW_HOME.

One test runs the real scheduler (with the warm LocalExecutor), triggerer, DAG processor and
API server: an event-driven run from a file dropped in the landing area.
"""

from __future__ import annotations

import datetime as dt
import json
import os
import shutil
import sqlite3
import subprocess
import sys
import textwrap
import uuid
from pathlib import Path

import pytest
from live_airflow import airflow_test_env as _env

NIGHT = "2026-11-20"
RESULT_MARKER = "IRIS_DAGTEST_RESULT "
HEAVY = ("numpy", "astropy", "stpipe", "stdatamodels", "crds", "boto3", "matplotlib", "scipy",
         "iris_tasks.calib", "iris_tasks.pipelines", "iris_tasks.steps")


def _run(env: dict[str, str], args: list[str], *, timeout: float = 600) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, *args], env=env, capture_output=True, text=True, timeout=timeout)


def _run_py(env: dict[str, str], code: str, *args: str, timeout: float = 300) -> str:
    proc = _run(env, ["-c", textwrap.dedent(code), *args], timeout=timeout)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-5000:]
    return proc.stdout


def _last_json(stdout: str, marker: str = "RESULT ") -> dict:
    line = [ln for ln in stdout.splitlines() if ln.startswith(marker)][-1]
    # The value is the line's leading JSON: a log record written by another thread of the
    # child without its own newline can follow it on the same line.
    value, _ = json.JSONDecoder().raw_decode(line[len(marker):])
    return value


def _dagtest(env: dict[str, str], dag_id: str, conf: dict | None = None) -> tuple[dict, str]:
    args = ["-m", "iris_tasks.orchestration.dagtest", dag_id]
    if conf:
        args += ["--conf", json.dumps(conf)]
    proc = _run(env, args, timeout=900)
    out = proc.stdout + proc.stderr
    assert RESULT_MARKER in proc.stdout, out[-6000:]
    return _last_json(proc.stdout, RESULT_MARKER), out


def _states(result: dict) -> dict[tuple[str, int], str]:
    return {(t["task_id"], t["map_index"]): t["state"] for t in result["tasks"]}


# -- import hygiene and task policy ---------------------------------------------------------
def test_dagbag_imports_cleanly_and_tasks_follow_policy(tmp_path):
    env = _env(tmp_path)
    out = _run_py(env, f"""
        import json, os, sys
        from airflow.dag_processing.dagbag import DagBag
        bag = DagBag(dag_folder=os.environ["AIRFLOW__CORE__DAGS_FOLDER"])
        tasks = {{}}
        for dag_id, dag in bag.dags.items():
            for t in dag.tasks:
                tasks[f"{{dag_id}}.{{t.task_id}}"] = {{
                    "owner": t.owner, "retries": t.retries,
                    "backoff": t.retry_exponential_backoff,
                    "policy": t.retry_policy is not None,
                    "timeout": t.execution_timeout.total_seconds() if t.execution_timeout else None}}
        info = {{"errors": {{k: str(v)[-500:] for k, v in bag.import_errors.items()}},
                "dags": {{d: {{"tags": sorted(dag.tags), "doc": bool(dag.doc_md), "schedule": str(dag.timetable),
                             "catchup": dag.catchup}} for d, dag in bag.dags.items()}},
                "tasks": tasks, "heavy": [m for m in {HEAVY!r} if m in sys.modules]}}
        print("RESULT " + json.dumps(info))
    """)
    info = _last_json(out)
    assert info["errors"] == {}
    assert set(info["dags"]) == {"iris_realtime", "iris_nightly_calibrations", "iris_reprocess",
                                 "iris_reprocess_nights"}
    assert info["heavy"] == [], f"DAG files import heavy modules at parse time: {info['heavy']}"
    for dag_id, d in info["dags"].items():
        assert "iris" in d["tags"] and d["doc"], dag_id
    assert info["dags"]["iris_nightly_calibrations"]["catchup"] is False
    storage = {"iris_realtime.claim", "iris_realtime.frame",
               "iris_nightly_calibrations.archive",
               "iris_reprocess.rp.ingest", "iris_reprocess_nights.rp.ingest"}
    for name, t in info["tasks"].items():
        assert t["owner"] == "iris-drs", name
        assert t["timeout"] and t["timeout"] > 0, f"{name} has no execution_timeout"
        if name in storage:
            assert t["retries"] >= 3 and t["backoff"] >= 2 and t["policy"], name
        else:
            assert t["retries"] == 0, f"{name} retries but is not a storage task"


def test_night_partitions_of_the_timed_dags(tmp_path):
    """The partitioned crons, as the scheduler and a backfill see them (serialized): the run on
    the morning of the 8th (08:00 / 11:00 Hawaii) is the night of the 7th; a backfill from
    2026-11-20 to 2026-11-22T12:00 is one run per night 20, 21, 22; iris_reprocess is partitioned
    on iris/crds-context and not periodic (nothing to backfill)."""
    env = _env(tmp_path)
    out = _run_py(env, """
        import json, os
        from airflow._shared.timezones.timezone import parse
        from airflow.dag_processing.dagbag import DagBag
        from airflow.serialization.serialized_objects import DagSerialization
        from airflow.timetables.base import TimeRestriction

        bag = DagBag(dag_folder=os.environ["AIRFLOW__CORE__DAGS_FOLDER"])
        info = {}
        for dag_id in ("iris_nightly_calibrations", "iris_reprocess_nights", "iris_reprocess"):
            tt = DagSerialization.from_dict(DagSerialization.to_dict(bag.dags[dag_id])).timetable
            d = info[dag_id] = {"partitioned": tt.partitioned, "periodic": tt.periodic}
            if tt.periodic:
                nxt = tt.next_dagrun_info_v2(last_dagrun_info=None, restriction=TimeRestriction(
                    earliest=parse("2026-12-08T00:00:00Z"), latest=None, catchup=True))
                d["next"] = [nxt.run_after.isoformat(), nxt.partition_key]
                d["backfill"] = [i.partition_key for i in tt.iter_partition_dagrun_infos(
                    earliest=parse("2026-11-20"), latest=parse("2026-11-22T12:00"))]
            else:
                d["assets"] = [a.name for _, a in tt.asset_condition.iter_assets()]
        print("RESULT " + json.dumps(info))
    """)
    info = _last_json(out)
    nights = ["2026-11-20", "2026-11-21", "2026-11-22"]
    assert info["iris_nightly_calibrations"] == {"partitioned": True, "periodic": True, "backfill": nights,
                                                 "next": ["2026-12-08T18:00:00+00:00", "2026-12-07"]}
    assert info["iris_reprocess_nights"] == {"partitioned": True, "periodic": True, "backfill": nights,
                                             "next": ["2026-12-08T21:00:00+00:00", "2026-12-07"]}
    assert info["iris_reprocess"] == {"partitioned": True, "periodic": False, "assets": ["iris/crds-context"]}


# -- landing triggers -----------------------------------------------------------------------
_TRIGGER_SCRIPT = """
    import asyncio, json, os, sys, time
    from iris_tasks.orchestration.triggers import landing_trigger

    landing, ledger, drop = sys.argv[1], sys.argv[2], sys.argv[3]

    async def main():
        trig = landing_trigger(landing, ledger_path=ledger, poll_interval=0.2, aws_conn_id="iris_s3")
        classpath, kwargs = trig.serialize()
        events = trig.run()
        first = asyncio.ensure_future(events.__anext__())
        await asyncio.sleep(0.6)
        t0 = time.monotonic()
        exec(drop)
        ev = await asyncio.wait_for(first, 10)
        latency = time.monotonic() - t0
        try:
            extra = await asyncio.wait_for(events.__anext__(), 1.0)
        except asyncio.TimeoutError:
            extra = None
        await trig.cleanup()
        print("RESULT " + json.dumps({"classpath": classpath, "kwargs": kwargs, "payload": ev.payload,
                                      "latency": latency, "extra": extra and extra.payload}))

    asyncio.run(main())
"""


def test_directory_trigger_announces_each_new_frame_once(tmp_path):
    env = _env(tmp_path)
    landing = tmp_path / "landing"
    landing.mkdir()
    import numpy as np
    from astropy.io import fits

    from iris_tasks.orchestration.landing import scan_directory
    from iris_tasks.orchestration.ledger import FrameLedger

    tiny = tmp_path / "tiny.fits"
    fits.HDUList([fits.PrimaryHDU(), fits.ImageHDU(np.zeros((1, 2, 4, 4), np.uint16), name="SCI")]
                 ).writeto(tiny)
    (landing / "old.fits").write_bytes(tiny.read_bytes())
    ledger = tmp_path / "ledger.sqlite"
    old = scan_directory(landing, settle_seconds=0, stale_seconds=0)[0]
    FrameLedger(ledger).record_arrival(old.uri, old.size, old.mtime, seen_by="trigger")
    drop = (f"open({str(landing / '.new.fits')!r}, 'wb').write(open({str(tiny)!r}, 'rb').read()); "
            "time.sleep(0.05); "
            f"os.rename({str(landing / '.new.fits')!r}, {str(landing / 'new.fits')!r}); "
            f"open({str(landing / 'part.fits.part')!r}, 'wb').write(b'partial')")
    res = _last_json(_run_py(env, _TRIGGER_SCRIPT, str(landing), str(ledger), drop))
    assert res["classpath"] == "iris_tasks.orchestration.triggers.LandingDirectoryTrigger"
    assert res["payload"]["name"] == "new.fits" and res["payload"]["arrival_id"] == 2
    assert res["extra"] is None, "announced something twice (or a partial/known file)"
    assert res["latency"] < 5
    arrivals = FrameLedger(ledger).arrivals()
    assert [a["seen_by"] for a in arrivals] == ["trigger", "trigger"]


@pytest.mark.services
def test_s3_trigger_announces_new_objects(tmp_path, seaweedfs):
    prefix = f"landing-{uuid.uuid4().hex[:8]}"
    env = _env(tmp_path, s3=seaweedfs)
    client = seaweedfs.client()
    client.put_object(Bucket="iris-test", Key=f"{prefix}/ignored.txt", Body=b"x")
    drop = (f"import boto3; boto3.client('s3', endpoint_url={seaweedfs.endpoint_url!r}, "
            f"aws_access_key_id={seaweedfs.access_key!r}, aws_secret_access_key={seaweedfs.secret_key!r}, "
            f"region_name='us-east-1').put_object(Bucket='iris-test', Key='{prefix}/f1.fits', Body=b'frame')")
    res = _last_json(_run_py(env, _TRIGGER_SCRIPT, f"s3://iris-test/{prefix}", str(tmp_path / "l.sqlite"), drop))
    assert res["classpath"] == "iris_tasks.orchestration.triggers.S3LandingTrigger"
    assert res["payload"]["uri"] == f"s3://iris-test/{prefix}/f1.fits" and res["payload"]["size"] == 5
    assert res["extra"] is None
    # Claiming from an S3 landing area downloads into the work area and leaves the object.
    env["IRIS_LANDING"] = f"s3://iris-test/{prefix}"
    claim = """
        import json
        from iris_tasks.orchestration.landing import claim_frames
        print("RESULT " + json.dumps([f.to_dict() for f in claim_frames(run_id="r1")]))
    """
    (frame,) = _last_json(_run_py(env, claim))
    assert frame["source_uri"] == f"s3://iris-test/{prefix}/f1.fits" and frame["outcome"] == "new"
    assert Path(frame["raw_path"]).read_bytes() == b"frame"
    assert _last_json(_run_py(env, claim)) == []
    assert client.head_object(Bucket="iris-test", Key=f"{prefix}/f1.fits")["ContentLength"] == 5
    # Once the raw bytes are archived, the landing object is the second copy: it goes, unless
    # it changed since the claim (a corrected re-send under the same name stays).
    client.put_object(Bucket="iris-test", Key=f"{prefix}/f2.fits", Body=b"frame two")
    archive = """
        import json, sys
        import boto3
        from iris_tasks.orchestration.frame import Frame
        from iris_tasks.orchestration.landing import claim_frames
        from iris_tasks.orchestration.realtime import archive_frame

        first = Frame.from_dict(json.loads(sys.argv[6]))  # claimed above
        frames = {f.filename: f for f in [first, *claim_frames(run_id="r2")]}
        endpoint, key, secret, bucket, prefix = sys.argv[1:6]
        s3 = boto3.client("s3", endpoint_url=endpoint, aws_access_key_id=key,
                          aws_secret_access_key=secret, region_name="us-east-1")
        s3.put_object(Bucket=bucket, Key=prefix + "/f2.fits", Body=b"frame two, corrected")
        out = {}
        for name, f in frames.items():
            f = f.with_(night="2026-11-20", detector="IMG1", obsname="IMG1-SCI",
                        stages=("readout",), work_dir=str(f.raw_path).rsplit("/", 1)[0])
            out[name] = archive_frame(f)["raw"]
        print("RESULT " + json.dumps(out))
    """
    env["IRIS_STORE_URL"] = f"s3://iris-test/{prefix}-archive?conn_id=iris_s3"
    urls = _last_json(_run_py(env, archive, seaweedfs.endpoint_url, seaweedfs.access_key,
                              seaweedfs.secret_key, "iris-test", prefix, json.dumps(frame)))
    assert set(urls) == {"f1.fits", "f2.fits"} and all("/raw/" in u for u in urls.values())
    with pytest.raises(client.exceptions.ClientError):
        client.head_object(Bucket="iris-test", Key=f"{prefix}/f1.fits")
    kept = client.get_object(Bucket="iris-test", Key=f"{prefix}/f2.fits")["Body"].read()
    assert kept == b"frame two, corrected"


# -- end to end -----------------------------------------------------------------------------
def _prepare_night(env: dict[str, str], sim_dir: Path) -> dict:
    """Simulate a small IMG1 night, publish its pre-night references, fill the landing area
    with its frames plus one bad frame and one duplicate, and backdate one arrival."""
    from astropy.io import fits

    from iris_tasks.calib.testing import temporary_cache
    from iris_tasks.orchestration.landing import scan_directory
    from iris_tasks.orchestration.ledger import FrameLedger, isotime
    from iris_tasks.simulate import NightPlan, simulate_night

    plan = NightPlan(n_dark=2, n_flat=2, n_sky=0, n_science=1, imager_filters=("Ks",))
    manifest = simulate_night(sim_dir, size=128, nreads=5, detectors=["IMG1"], seed=11, night=NIGHT, plan=plan)
    with temporary_cache(env["IRIS_CRDS_PATH"]) as calib:
        first = calib.publish_references([str(sim_dir / r["path"]) for r in manifest["references"]], "pre-night")
    landing = Path(env["IRIS_LANDING"])
    landing.mkdir(parents=True, exist_ok=True)
    names = {}
    for f in manifest["files"]:
        src = sim_dir / f["path"]
        shutil.copy(src, landing / src.name)
        names[f["obsname"]] = src.name
    dark = names["IMG1-DRK"]
    shutil.copy(landing / dark, landing / f"resent_{dark}")  # same bytes, another name
    bad = landing / f"bad_{names['IMG1-SCI']}"
    shutil.copy(landing / names["IMG1-SCI"], bad)
    fits.setval(bad, "OBSNAME", value="IMG1-XYZ")
    # A flat "was seen" 10 minutes ago (e.g. a scheduler backlog): its deadline is gone.
    late = next(e for e in scan_directory(landing, settle_seconds=0) if e.name == names["IMG1-NFF"])
    FrameLedger(Path(env["IRIS_STATE_DIR"]) / "ledger.sqlite").record_arrival(
        late.uri, late.size, late.mtime, seen_by="trigger",
        seen_at=isotime(dt.datetime.now(dt.UTC) - dt.timedelta(minutes=10)))
    return {"context": first, "names": names, "bad": bad.name, "duplicate": f"resent_{dark}"}


def _db(env: dict[str, str]) -> sqlite3.Connection:
    return sqlite3.connect(env["AIRFLOW__DATABASE__SQL_ALCHEMY_CONN"].removeprefix("sqlite:///"))


@pytest.mark.slow
@pytest.mark.services
def test_realtime_nightly_reprocess_end_to_end(tmp_path, migrated_db, seaweedfs):
    from iris_tasks.orchestration.ledger import FrameLedger

    prefix = f"e2e-{uuid.uuid4().hex[:8]}"
    env = _env(tmp_path, migrated_db, s3=seaweedfs, store_url=f"s3://iris-test/{prefix}?conn_id=iris_s3")
    night = _prepare_night(env, tmp_path / "sim")
    names = night["names"]
    ledger = FrameLedger(Path(env["IRIS_STATE_DIR"]) / "ledger.sqlite")
    s3 = seaweedfs.client()

    def keys(sub: str = "") -> list[str]:
        pages = s3.get_paginator("list_objects_v2").paginate(Bucket="iris-test", Prefix=f"{prefix}/{sub}")
        return sorted(o["Key"][len(prefix) + 1:] for p in pages for o in p.get("Contents", []))

    # 1. Real time: 5 good frames flow, the bad one is quarantined, the duplicate is dropped.
    # As in the stack, the frame task hands its frames to a compute server; its workers' log
    # lines and lineage come back into the tasks.
    from iris_tasks.orchestration.compute import running_server

    env["IRIS_COMPUTE_SOCKET"] = str(tmp_path / "compute.sock")
    # One worker: dag.test() runs the frame tasks one after the other.
    with running_server(env["IRIS_COMPUTE_SOCKET"], workers=1, env=env,
                        log_path=tmp_path / "compute.log"):
        result, log = _dagtest(env, "iris_realtime")
    assert result["state"] == "success", log[-6000:]
    # 5 good frames; the bad one is quarantined in claim and gets no frame tasks at all.
    assert log.count("computed by compute-server worker") == 5, "\n".join(
        line[-300:] for line in log.splitlines() if "compute" in line.lower())[-8000:]
    assert "Step ReadoutStep running" in log  # a worker's step log, replayed in the task
    states = _states(result)
    assert sorted(states[k] for k in states if k[0] == "frame") == ["success"] * 5
    frames = {f["filename"]: f for f in ledger.frames()}
    assert len(frames) == 6
    assert frames[night["bad"]]["status"] == "quarantined"
    assert all(f["status"] == "done" for n, f in frames.items() if n != night["bad"])
    (reason,) = (Path(env["IRIS_STATE_DIR"]) / "quarantine").rglob("reason.json")
    assert any(p["keyword"] == "OBSNAME" for p in json.loads(reason.read_text())["problems"])
    dups = [a for a in ledger.arrivals() if a["outcome"] == "duplicate"]
    assert len(dups) == 1 and frames[names["IMG1-DRK"]]["duplicates"] == 1
    late = frames[names["IMG1-NFF"]]
    assert late["deadline_missed"] == 1 and late["latency_seconds"] > 600
    assert any(a["kind"] == "deadline_missed" for a in ledger.alerts(frame_id=late["frame_id"]))
    sci = frames[names["IMG1-SCI"]]
    root = Path(names["IMG1-SCI"]).stem
    stored = keys()
    for key in (f"raw/{NIGHT}/IMG1/IMG1-SCI/{root}.fits", f"products/{NIGHT}/IMG1/IMG1-SCI/{root}_rate.fits",
                f"products/{NIGHT}/IMG1/IMG1-SCI/{root}_cal.fits", f"quicklook/{NIGHT}/IMG1/IMG1-SCI/{root}_ql.png"):
        assert key in stored, key
    assert not any("bad_" in k for k in keys("raw")) and any("bad_" in k for k in keys("quarantine"))
    # OpenLineage file events carry the datasets; `iris-drs lineage` answers from them.
    cal_url = f"s3://iris-test/{prefix}/products/{NIGHT}/IMG1/IMG1-SCI/{root}_cal.fits"
    info = _last_json(_run_py(env, """
        import json, sys
        from iris_tasks.lineage import lineage_of
        print("RESULT " + json.dumps(lineage_of(sys.argv[1])))
    """, cal_url))
    assert any(u.endswith(names["IMG1-SCI"]) for u in info["raw_frames"]), info
    assert any("tmt_iris_dark" in u for u in info["references"]) and info["header"]["CRDS_CTX"] == night["context"]
    assert "iris_realtime.frame" in {s["job"] for s in info["steps"]}

    # 2. Nightly calibrations: masters, QA, publish, asset event with the new context.
    result, log = _dagtest(env, "iris_nightly_calibrations", {"night": NIGHT})
    assert result["state"] == "success", log[-6000:]
    with _db(env) as db:
        (extra,) = [json.loads(r[0]) for r in db.execute(
            "SELECT e.extra FROM asset_event e JOIN asset a ON a.id = e.asset_id "
            "WHERE a.name = 'iris/crds-context'")]
        (event_partition,) = [r[0] for r in db.execute(
            "SELECT e.partition_key FROM asset_event e JOIN asset a ON a.id = e.asset_id "
            "WHERE a.name = 'iris/crds-context'")]
        queued = db.execute("SELECT target_dag_id, partition_key FROM asset_partition_dag_run").fetchall()
    new_ctx = extra["context"]
    assert extra["previous"] == night["context"] and new_ctx != night["context"] and extra["night"] == NIGHT
    assert event_partition == NIGHT, "the new context was not announced for the night's partition"
    assert ("iris_reprocess", NIGHT) in queued, "the asset event did not queue iris_reprocess for the night"
    assert len(keys(f"references/{NIGHT}/IMG1/")) == 2

    # 3. Reprocess with what the asset event says: the science frame gets new products.
    result, log = _dagtest(env, "iris_reprocess",
                           {"context": new_ctx, "night_from": extra["night"], "night_to": extra["night"]})
    assert result["state"] == "success", log[-6000:]
    assert sum(1 for k, v in _states(result).items() if k[0] == "rp.ingest" and v == "success") == 1
    stem = new_ctx.removesuffix(".pmap")
    new_key = f"products/{NIGHT}/IMG1/IMG1-SCI/{root}_cal.{stem}.fits"
    assert new_key in keys()
    from astropy.io import fits

    local = tmp_path / "reprocessed_cal.fits"
    s3.download_file("iris-test", f"{prefix}/{new_key}", str(local))
    assert fits.getval(local, "CRDS_CTX") == new_ctx
    assert ledger.frame(sci["frame_id"])["crds_context"] == new_ctx
    assert {p["version"] for p in ledger.products(sci["frame_id"]) if p["kind"] == "cal"} == {1, 2}
    assert ledger.frame(frames[names["IMG1-DRK"]]["frame_id"])["crds_context"] == night["context"]

    # 4. A backfill over past nights: one run per night, keyed by the night.
    proc = _run(env, ["-m", "airflow", "backfill", "create", "--dag-id", "iris_reprocess_nights",
                      "--from-date", "2026-11-21", "--to-date", "2026-11-22T12:00", "--dry-run"], timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "2026-11-21" in proc.stdout and "2026-11-22" in proc.stdout, proc.stdout


# -- the real scheduler, triggerer and API server -------------------------------------------
@pytest.mark.slow
@pytest.mark.services
def test_live_event_driven_run(tmp_path, migrated_db, seaweedfs):
    from live_airflow import AirflowAPI, running, wait_for

    from iris_devstack.services.seaweedfs import pick_ports
    from iris_tasks.orchestration.ledger import FrameLedger

    port = pick_ports(1)[0]
    env = _env(tmp_path, migrated_db, s3=seaweedfs, api_port=port,
               store_url=f"s3://iris-test/live-{uuid.uuid4().hex[:8]}?conn_id=iris_s3")
    env["AIRFLOW__CORE__DAGS_ARE_PAUSED_AT_CREATION"] = "True"
    night = _prepare_night(env, tmp_path / "sim")
    landing = Path(env["IRIS_LANDING"])
    held = tmp_path / "held"
    shutil.move(landing, held)  # frames go in only once the watcher runs
    landing.mkdir()
    components = (("api-server",), ("scheduler", "--skip-serve-logs"), ("triggerer", "--skip-serve-logs"),
                  ("dag-processor",))
    with running(env, tmp_path, components) as logs:
        api = AirflowAPI(env)
        wait_for(lambda: api.dag_registered("iris_realtime"), 180, "iris_realtime registered", logs)
        # Unpaused through the REST API, its file parsed again at once: the landing watcher
        # only runs for an unpaused DAG.
        api.unpause("iris_realtime", reparse=True)

        def watching() -> bool:
            with _db(env) as db:
                return bool(db.execute("SELECT 1 FROM trigger WHERE classpath LIKE '%LandingDirectoryTrigger'")
                            .fetchone())

        wait_for(watching, 180, "the landing watcher", logs)
        api.close()
        sci = night["names"]["IMG1-SCI"]
        shutil.copy(held / sci, landing / f".{sci}")
        os.rename(landing / f".{sci}", landing / sci)
        ledger = FrameLedger(Path(env["IRIS_STATE_DIR"]) / "ledger.sqlite")
        done = wait_for(lambda: [f for f in ledger.frames() if f["filename"] == sci and f["status"] == "done"],
                        240, f"{sci} reduced", logs, interval=0.5)
        assert done[0]["run_id"].startswith("asset_triggered__")
        (arrival,) = [a for a in ledger.arrivals() if a["frame_id"] == done[0]["frame_id"]]
        assert arrival["seen_by"] == "trigger"
        stages = {s["stage"]: s for s in ledger.stages(done[0]["frame_id"])}
        assert set(stages) == {"archive", "classify", "readout", "reduce", "quicklook", "early_upload",
                               "ingest"}
        assert stages["early_upload"]["status"] == "success"
        tasks = {json.loads(s["detail"])["task_id"] for s in stages.values()}
        assert tasks == {"claim", "frame"}  # classify: claim
        assert {p["kind"] for p in ledger.products(done[0]["frame_id"])} >= {"raw", "rate", "cal", "quicklook"}
        # The frame's products are an event of iris/products in the frame's night's partition
        # (registered when the task reports success, just after the ledger says done).
        def products_events() -> list:
            with _db(env) as db:
                return db.execute(
                    "SELECT e.partition_key, e.extra FROM asset_event e JOIN asset a ON a.id = e.asset_id "
                    "WHERE a.name = 'iris/products'").fetchall()

        products = wait_for(products_events, 60, "the iris/products event of the frame")
        assert [(key, json.loads(extra)) for key, extra in products] == [
            (NIGHT, {"context": done[0]["crds_context"], "frames": [done[0]["frame_id"]]})]
        # The task processes forked from workers that had the science stack preloaded.
        assert "preloaded" in (tmp_path / "scheduler.log").read_text()


@pytest.mark.slow
def test_nightly_qa_failure_fails_the_run_but_publishes_what_passed(tmp_path, migrated_db, monkeypatch):
    """A flat beyond its QA threshold and a telluric standard without a star: their qa tasks
    and the run fail, the dark and the good standard's telluric reference are published."""
    from test_nightly_telluric import standard_cube

    from iris_tasks.calib.testing import temporary_cache
    from iris_tasks.orchestration.local_run import process_paths
    from iris_tasks.simulate import NightPlan, simulate_night
    from iris_tasks.storage import open_store, product_key

    env = _env(tmp_path, migrated_db)  # local store: the frames are processed without Airflow
    for key in ("IRIS_STATE_DIR", "IRIS_LANDING", "IRIS_STORE_URL", "IRIS_CRDS_PATH"):
        monkeypatch.setenv(key, env[key])
    plan = NightPlan(n_dark=2, n_flat=2, n_sky=0, n_science=0, imager_filters=("Ks",))
    manifest = simulate_night(tmp_path / "sim", size=64, nreads=4, detectors=["IMG1"], seed=5,
                              night=NIGHT, plan=plan)
    with temporary_cache(env["IRIS_CRDS_PATH"]) as calib:
        first = calib.publish_references([str(tmp_path / "sim" / r["path"]) for r in manifest["references"]],
                                         "pre-night")
        results = process_paths([str(tmp_path / "sim" / f["path"]) for f in manifest["files"]], ingest=True)
    assert [r["status"] for r in results] == ["done"] * 4
    # Two SLI-TEL cubes reduced on another host: only in the store (products/<night>/...).
    store = open_store(env["IRIS_STORE_URL"])
    for name, star in (("tel_s3d.fits", True), ("tel_empty_s3d.fits", False)):
        cube = standard_cube(tmp_path / name, dt.datetime(2026, 11, 21, 8), star=star)
        store.put_file(cube, product_key(NIGHT, "IFS", "SLI-TEL", name), {})
    env["IRIS_QA_THRESHOLDS"] = json.dumps({"flat": {"median_ratio": [2.0, 3.0]}})
    result, log = _dagtest(env, "iris_nightly_calibrations", {"night": NIGHT})
    states = _states(result)
    assert result["state"] == "failed", log[-4000:]
    assert sorted(v for k, v in states.items() if k[0] == "qa") == ["failed", "failed", "success", "success"]
    assert states[("publish", -1)] == "success" and states[("qa_verdict", -1)] == "failed"
    assert "median_ratio=" in log and "failed QA" in log and "no star" in log
    with _db(env) as db:
        (extra,) = [json.loads(r[0]) for r in db.execute("SELECT extra FROM asset_event")]
    assert extra["previous"] == first
    assert sorted(n.rsplit("_", 1)[-1] for n in extra["references"]) == ["dark.fits", "telluric.fits"]


def test_realtime_trigger_keeps_the_ledger_location_out_of_the_dag(monkeypatch, tmp_path):
    """The watcher's kwargs are serialized into the metadata DB in plain text: the DAG hands
    the trigger the environment marker, which the triggerer resolves to its own ledger."""
    from iris_tasks.orchestration.triggers import LEDGER_FROM_ENV, landing_trigger, resolve_ledger

    url = "postgresql://drs:s3cret@127.0.0.1:5432/test"
    monkeypatch.setenv("IRIS_LEDGER_URL", url)
    trig = landing_trigger(str(tmp_path), ledger_path=LEDGER_FROM_ENV)
    _, kwargs = trig.serialize()
    assert "s3cret" not in repr(kwargs)
    assert resolve_ledger(kwargs["ledger_path"]) == url
    assert resolve_ledger(str(tmp_path / "l.sqlite")) == str(tmp_path / "l.sqlite")
    dag_source = (Path(__file__).resolve().parents[1] / "dags" / "iris_realtime.py").read_text()
    assert "ledger_path=LEDGER_FROM_ENV" in dag_source
