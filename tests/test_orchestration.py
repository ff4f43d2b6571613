"""The orchestration layer's plain functions, without Airflow: ledger, landing/claim,
quarantine, deadlines and alerts, the real-time chain, nightly QA/publish and reprocessing.

The chain tests run on a tiny simulated night (64x64, IMG1 only) with a temporary CRDS cache
and a LocalStore; the DAG tests (test_dags.py) run the same functions under Airflow on S3.
"""

from __future__ import annotations

import asyncio
import datetime as dt
import http.server
import json
import os
import threading
from pathlib import Path

import numpy as np
import pytest

from iris_tasks.config import settings
from iris_tasks.orchestration.ledger import FrameLedger, isotime

NIGHT = "2026-11-20"


@pytest.fixture
def state(iris_state, monkeypatch: pytest.MonkeyPatch):
    # These tests are about claiming, not about the landing contract (test_landing_contract):
    # every file in the landing area is taken as it is, whole or not.
    monkeypatch.setenv("IRIS_LANDING_SETTLE_SECONDS", "0")
    monkeypatch.setenv("IRIS_LANDING_STALE_SECONDS", "0")
    return settings()


def _ledger(cfg) -> FrameLedger:
    return FrameLedger(cfg.ledger_path)


# -- ledger ---------------------------------------------------------------------------------
def test_claim_is_idempotent_by_content_and_retries_failed_frames(state):
    led = _ledger(state)
    frame, outcome = led.claim(sha256="ab" * 32, filename="a.fits", source_uri="file:///a.fits",
                               landed_at=isotime(), run_id="r1")
    assert outcome == "new" and frame["frame_id"] == "ab" * 8 and frame["status"] == "claimed"
    again, outcome = led.claim(sha256="ab" * 32, filename="copy.fits", source_uri="file:///b.fits",
                               landed_at=isotime(), run_id="r2")
    assert outcome == "duplicate" and again["duplicates"] == 1 and again["run_id"] == "r1"
    led.update_frame(frame["frame_id"], status="failed", error="boom")
    retried, outcome = led.claim(sha256="ab" * 32, filename="a.fits", source_uri="file:///a.fits",
                                 landed_at=isotime(), run_id="r3")
    assert outcome == "retry" and retried["status"] == "claimed" and retried["error"] is None
    with pytest.raises(ValueError, match="unknown frames column"):
        led.update_frame(frame["frame_id"], nonsense=1)


def test_stages_products_versions_and_deadline(state):
    led = _ledger(state)
    landed = dt.datetime.now(dt.UTC) - dt.timedelta(seconds=45)
    frame, _ = led.claim(sha256="cd" * 32, filename="b.fits", source_uri="file:///b.fits",
                         landed_at=isotime(landed))
    fid = frame["frame_id"]
    led.update_frame(fid, deadline_seconds=30.0, deadline_at=isotime(landed + dt.timedelta(seconds=30)),
                     status="processing")
    assert [f["frame_id"] for f in led.overdue()] == [fid]
    with led.stage(fid, "readout", run_id="r") as detail:
        detail["x"] = 1
    with pytest.raises(RuntimeError), led.stage(fid, "reduce", run_id="r"):
        raise RuntimeError("bad")
    stages = led.stages(fid)
    assert [(s["stage"], s["status"]) for s in stages] == [("readout", "success"), ("reduce", "failed")]
    assert stages[0]["duration_seconds"] >= 0 and json.loads(stages[1]["detail"])["error"].startswith("RuntimeError")
    assert led.add_product(fid, "cal", key="k1", sha256="1", crds_context="tmt_0001.pmap") == 1
    assert led.add_product(fid, "cal", key="k1", sha256="1", crds_context="tmt_0001.pmap") == 1  # retry
    assert led.add_product(fid, "cal", key="k2", sha256="2", crds_context="tmt_0002.pmap") == 2
    current = led.products(fid, current_only=True)
    assert [(p["key"], p["version"]) for p in current] == [("k2", 2)]
    done = led.finish(fid)
    assert done["status"] == "done" and done["deadline_missed"] == 1 and done["latency_seconds"] >= 45
    assert led.snapshot(fid)["frames"][0]["products"][0]["key"] == "k1"


# -- landing --------------------------------------------------------------------------------
def test_scan_ignores_partial_hidden_and_foreign_files(state):
    from iris_tasks.orchestration.landing import scan_landing

    land = Path(state.landing)
    for name in ("a.fits", ".b.fits", "c.fits.part", "d.fits.tmp", "notes.txt"):
        (land / name).write_bytes(b"x")
    (land / "sub").mkdir()
    (land / "sub" / "e.fits").write_bytes(b"x")
    assert [e.name for e in scan_landing()] == ["a.fits"]


def test_claim_moves_new_frames_and_sets_duplicates_aside(state):
    from iris_tasks.orchestration.landing import claim_frames

    land = Path(state.landing)
    (land / "one.fits").write_bytes(b"frame-one")
    (land / "two.fits").write_bytes(b"frame-two")
    (land / "one-again.fits").write_bytes(b"frame-one")
    frames = claim_frames(run_id="run-1")
    assert sorted(f.filename for f in frames) in (["one.fits", "two.fits"], ["one-again.fits", "two.fits"])
    assert not list(land.iterdir()), "the landing area is emptied"
    for f in frames:
        assert Path(f.raw_path).is_file() and Path(f.raw_path).parent.name == f.frame_id
    led = _ledger(state)
    assert sorted(a["outcome"] for a in led.arrivals()) == ["duplicate", "new", "new"]
    assert sum(f["duplicates"] for f in led.frames()) == 1
    assert len(list((state.state_dir / "duplicates").rglob("*.fits"))) == 1
    # The same bytes landing later are a duplicate too, and nothing is processed.
    (land / "one-later.fits").write_bytes(b"frame-one")
    assert claim_frames(run_id="run-2") == []


def test_claim_takes_landing_time_from_the_first_sighting(state):
    from iris_tasks.orchestration.landing import claim_frames, scan_landing

    (Path(state.landing) / "late.fits").write_bytes(b"late")
    entry = scan_landing()[0]
    seen = dt.datetime.now(dt.UTC) - dt.timedelta(minutes=10)
    _ledger(state).record_arrival(entry.uri, entry.size, entry.mtime, seen_by="trigger", seen_at=isotime(seen))
    frame = claim_frames(run_id="r")[0]
    assert frame.landed_at == isotime(seen)


def test_claim_limit_leaves_the_rest_for_the_next_run(state):
    from iris_tasks.orchestration.landing import claim_frames

    for i in range(3):
        (Path(state.landing) / f"f{i}.fits").write_bytes(f"f{i}".encode())
    assert len(claim_frames(limit=2, run_id="a")) == 2
    assert len(claim_frames(run_id="b")) == 1


# -- alerts ---------------------------------------------------------------------------------
class _Hook(http.server.BaseHTTPRequestHandler):
    received: list = []

    def do_POST(self):  # noqa: N802 - http.server API
        body = self.rfile.read(int(self.headers["Content-Length"]))
        _Hook.received.append(json.loads(body))
        self.send_response(204)
        self.end_headers()

    def log_message(self, *args):
        pass


def _overdue_frame(led: FrameLedger, sha: str = "ef" * 32, run_id: str = "run-x") -> str:
    landed = dt.datetime.now(dt.UTC) - dt.timedelta(seconds=90)
    frame, _ = led.claim(sha256=sha, filename="slow.fits", source_uri="file:///slow.fits",
                         landed_at=isotime(landed), run_id=run_id, dag_id="iris_realtime")
    led.update_frame(frame["frame_id"], status="processing", deadline_seconds=60.0, obsname="LEN-SCI",
                     deadline_at=isotime(landed + dt.timedelta(seconds=60)))
    return frame["frame_id"]


def test_deadline_alert_is_recorded_and_posted_to_the_webhook(state, monkeypatch):
    from iris_tasks.orchestration import alerts

    server = http.server.HTTPServer(("127.0.0.1", 0), _Hook)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        led = _ledger(state)
        fid = _overdue_frame(led)
        # Off by default: recorded, not sent.
        assert alerts.check_overdue(ledger=led)[0]["frame_id"] == fid
        assert led.alerts()[0]["delivered"] is None
        assert led.frame(fid)["deadline_missed"] == 1
        assert alerts.check_overdue(ledger=led) == []  # flagged once only
        monkeypatch.setenv("IRIS_ALERT_WEBHOOK", f"http://127.0.0.1:{server.server_port}/hook")
        fid2 = _overdue_frame(led, sha="12" * 32)
        alerts.check_overdue(ledger=led)
        assert _Hook.received[-1]["alert"]["frame_id"] == fid2
        assert "deadline missed" in _Hook.received[-1]["text"]
        assert led.alerts(frame_id=fid2)[0]["delivered"] == "webhook:204"
    finally:
        server.shutdown()


def test_async_deadline_callback_flags_the_runs_late_frames(state):
    from iris_tasks.orchestration.alerts import realtime_run_deadline_missed

    led = _ledger(state)
    fid = _overdue_frame(led, run_id="asset_triggered__1")
    other = _overdue_frame(led, sha="34" * 32, run_id="another-run")
    context = {"dag_run": {"dag_id": "iris_realtime", "dag_run_id": "asset_triggered__1"},
               "deadline": {"deadline_time": isotime()}}
    asyncio.run(realtime_run_deadline_missed(context=context, label="IFS 60 s"))
    assert led.frame(fid)["deadline_missed"] == 1
    assert led.frame(other)["deadline_missed"] == 0
    assert led.alerts(frame_id=fid)[0]["run_id"] == "asset_triggered__1"


# -- quarantine -----------------------------------------------------------------------------
def test_invalid_header_is_quarantined_with_reason(state):
    from astropy.io import fits

    from iris_tasks.orchestration.landing import claim_frames
    from iris_tasks.orchestration.realtime import classify_frame

    bad = Path(state.landing) / "bad.fits"
    hdr = fits.Header({"INSTRUME": "IRIS", "DETECTOR": "IMG9", "OBSTYPE": "SCI", "OBSNAME": "IMG1-XYZ"})
    fits.HDUList([fits.PrimaryHDU(header=hdr), fits.ImageHDU(np.zeros((1, 2, 4, 4), np.uint16), name="SCI")]
                 ).writeto(bad)
    frame = claim_frames(run_id="r")[0]
    assert classify_frame(frame) is None
    reason_files = list(state.quarantine_dir.rglob("reason.json"))
    assert len(reason_files) == 1
    reason = json.loads(reason_files[0].read_text())
    keywords = {p["keyword"] for p in reason["problems"]}
    assert {"DETECTOR", "OBSNAME"} <= keywords
    assert (reason_files[0].parent / "bad.fits").is_file()
    row = _ledger(state).frame(frame.frame_id)
    assert row["status"] == "quarantined" and "OBSNAME" in row["error"]
    # Best-effort copy to the store under quarantine/.
    assert list((Path(state.store_url.removeprefix("file://")) / "quarantine").rglob("bad.fits"))


# -- the real-time chain, nightly and reprocessing on a tiny night ---------------------------
@pytest.fixture(scope="module")
def tiny_night(tmp_path_factory: pytest.TempPathFactory):
    from iris_tasks.simulate import NightPlan, simulate_night

    out = tmp_path_factory.mktemp("tiny_night")
    plan = NightPlan(n_dark=2, n_flat=2, n_sky=1, n_science=1, imager_filters=("Ks",))
    manifest = simulate_night(out, size=64, nreads=4, detectors=["IMG1"], seed=3, night=NIGHT, plan=plan)
    return out, manifest


def test_whole_chain_then_nightly_then_reprocess(state, tiny_night, tmp_path, monkeypatch):
    from astropy.io import fits

    from iris_tasks.calib.testing import temporary_cache
    from iris_tasks.lineage import lineage_of
    from iris_tasks.orchestration import nightly, reprocess
    from iris_tasks.orchestration.local_run import process_paths

    out, manifest = tiny_night
    monkeypatch.setenv("IRIS_MIN_MASTER_FRAMES", "2")
    raws = [str(out / f["path"]) for f in manifest["files"]]
    with temporary_cache(tmp_path / "crds") as calib:
        first = calib.publish_references([str(out / r["path"]) for r in manifest["references"]], "pre-night")
        results = process_paths(raws)
        assert [r["status"] for r in results] == ["done"] * len(raws), results
        again = process_paths(raws[:1])
        assert again[0]["status"] == "duplicate"
        led = _ledger(state)
        sci = next(f for f in led.frames() if f["obsname"] == "IMG1-SCI")
        assert sci["crds_context"] == first and sci["night"] == NIGHT and sci["deadline_seconds"] == 30.0
        stages = [s["stage"] for s in led.stages(sci["frame_id"])]
        assert stages == ["classify", "archive", "readout", "reduce", "quicklook", "ingest"]
        keys = {p["kind"]: p["key"] for p in led.products(sci["frame_id"])}
        assert keys["cal"] == f"products/{NIGHT}/IMG1/IMG1-SCI/{Path(sci['filename']).stem}_cal.fits"
        assert keys["raw"].startswith(f"raw/{NIGHT}/IMG1/IMG1-SCI/")
        assert keys["quicklook"].endswith("_ql.png")

        # Re-ingesting a finished frame from its work area is idempotent and keeps it closed.
        from iris_tasks.orchestration.ingest import ingest_files, ingest_frame_dir

        before = led.frame(sci["frame_id"])
        again_objects = ingest_frame_dir(sci["frame_id"])["objects"]
        assert again_objects["cal"].endswith(keys["cal"])
        assert led.frame(sci["frame_id"])["finished_at"] == before["finished_at"]
        stored = ingest_files([raws[0]])
        assert stored[0]["skipped"] and stored[0]["key"].startswith(f"raw/{NIGHT}/IMG1/")

        # Lineage of the stored product: raw frame, references and context.
        info = lineage_of(keys["cal"])  # the object key (a bare name identifies nothing)
        assert any(u.endswith(sci["filename"]) for u in info["raw_frames"])
        assert any("tmt_iris_flat" in u for u in info["references"])
        assert any(u.endswith(first) for u in info["contexts"])
        assert info["header"]["CRDS_CTX"] == first

        # Nightly: masters from the 2 darks and 2 flats, QA against the pre-night set, publish.
        gathered = nightly.gather_calibrations(NIGHT)
        assert len(gathered["dark"]) == 2 and len(gathered["flat"]) == 2
        masters = nightly.build_masters(gathered)
        reports = [nightly.qa_master(m) for m in masters]
        assert all(r["passed"] for r in reports) and {r["reftype"] for r in reports} == {"dark", "flat"}
        published = nightly.publish_masters(reports, NIGHT)
        assert published["previous"] == first and published["context"] != first
        assert calib.operational_context() == published["context"]
        assert led.calibrations(NIGHT)[-1]["context"] == published["context"]

        # The night is stale: its science and sky frames' references change (not the cals').
        (state,) = reprocess.night_states()
        assert (state["night"], state["context"], state["stale"]) == (NIGHT, published["context"], True)
        assert (state["frames"], state["current"], state["stale_frames"], state["unknown"]) == (2, 0, 2, 0)
        assert state["contexts"] == {first: 2} and reprocess.stale_nights() == [NIGHT]
        assert reprocess.stale_nights(first) == [] and reprocess.stale_nights(nights=["2026-11-21"] * 2) == []

        # Reprocess exactly the frames whose references change (science and sky, not cals).
        request = reprocess.resolve_request({}, [published])
        assert request["nights"] == [NIGHT, NIGHT] and request["source"] == "asset-event"
        chosen = reprocess.select_frames(request["context"], request["nights"])
        assert {f.obsname for f in chosen} == {"IMG1-SCI", "IMG1-SKY"}
        assert all({"dark", "flat"} <= set(f.changes) for f in chosen)
        outs = [reprocess.reprocess_frame(f) for f in chosen]
        new_ctx = published["context"]
        stem = new_ctx.removesuffix(".pmap")
        for o in outs:
            assert o["objects"]["cal"].endswith(f"_cal.{stem}.fits")
            local = Path(o["objects"]["cal"].removeprefix("file://"))
            assert fits.getval(local, "CRDS_CTX") == new_ctx
        row = led.frame(sci["frame_id"])
        assert row["crds_context"] == new_ctx
        cal_versions = [(p["version"], p["current"]) for p in led.products(sci["frame_id"]) if p["kind"] == "cal"]
        assert cal_versions == [(1, 0), (2, 1)]
        # Nothing left to do under the same context: the night is current.
        assert reprocess.select_frames(new_ctx, [NIGHT, NIGHT]) == []
        (state,) = reprocess.night_states()
        assert (state["stale"], state["current"], state["contexts"]) == (False, 2, {})
        summary = reprocess.summarize(outs, request)
        assert summary["by_night"] == {NIGHT: [o["frame_id"] for o in outs]} and summary["stale_nights"] == []

        # An IPC kernel is used only when the readout's ipc option asks for it (off by
        # default): publishing one changes no product and reprocesses nothing.
        import numpy as np

        from iris_tasks.masters.ipc import ipc_reference

        kernel = np.full((3, 3), 0.002)
        kernel[1, 0], kernel[1, 2], kernel[0, 1], kernel[2, 1] = 0.02, 0.02, 0.013, 0.013
        kernel[1, 1] = 1.0 - (kernel.sum() - kernel[1, 1])
        ipc_path = tmp_path / "ipc_IMG1.fits"
        ipc_reference(kernel, detector="IMG1", useafter="2026-01-01T00:00:00",
                      source="a lab measurement (test)").save(str(ipc_path))
        with_ipc = calib.publish_references([str(ipc_path)], "IPC kernel")
        assert reprocess.select_frames(with_ipc, [NIGHT, NIGHT]) == []


def test_qa_metrics_catch_bad_masters():
    from iris_tasks.orchestration.nightly import QA_THRESHOLDS, qa_metrics

    rng = np.random.default_rng(1)
    shape = (32, 32)
    old_dark = {"sci": np.full(shape, 0.01) + rng.normal(0, 0.001, shape), "dq": np.zeros(shape, np.uint32)}
    good = {"sci": old_dark["sci"] + rng.normal(0, 0.5, shape), "err": np.full(shape, 0.5),
            "dq": np.zeros(shape, np.uint32)}
    m = qa_metrics(good, old_dark, "dark")
    limits = QA_THRESHOLDS["dark"]
    assert m["median_shift"] <= limits["median_shift"][1] and m["residual_rms"] <= limits["residual_rms"][1]
    leak = {**good, "sci": good["sci"] + 5.0}  # a light leak: every pixel 10 sigma up
    assert qa_metrics(leak, old_dark, "dark")["median_shift"] > limits["median_shift"][1]
    hot_dq = np.zeros(shape, np.uint32)
    hot_dq[:4] = 2048  # HOT on 12 % of the pixels
    assert qa_metrics({**good, "dq": hot_dq}, old_dark, "dark")["hot_change"] > limits["hot_change"][1]
    flat = {"sci": 1 + rng.normal(0, 0.02, shape), "dq": np.zeros(shape, np.uint32)}
    assert 0.9 < qa_metrics(flat, flat, "flat")["median_ratio"] < 1.1
    assert qa_metrics({**flat, "sci": flat["sci"] * 1.5}, flat, "flat")["median_ratio"] > 1.1


def test_resolve_request_precedence(tmp_path):
    from iris_tasks.calib.testing import temporary_cache
    from iris_tasks.errors import ConfigurationError
    from iris_tasks.orchestration.reprocess import resolve_request

    with temporary_cache(tmp_path / "crds") as calib:
        op = calib.operational_context()
        # A partitioned run (iris_reprocess on a night's event, iris_reprocess_nights, a
        # backfill): its night only, the event's context.
        event = {"context": op, "night": "2026-11-02"}
        assert resolve_request({}, [event], partition_key="2026-11-02") == {
            "context": op, "nights": ["2026-11-02", "2026-11-02"], "force": False, "source": "partition"}
        assert resolve_request({}, [], partition_key="2026-11-20")["nights"] == ["2026-11-20"] * 2
        with pytest.raises(ConfigurationError, match="partition key '2026-11-20' and night_from"):
            resolve_request({"night_from": "2026-11-01"}, partition_key="2026-11-20")
        with pytest.raises(ConfigurationError, match="partition key 'tonight'"):
            resolve_request({}, partition_key="tonight")
        # A manual run without a key: its params, else an event's night, else everything.
        assert resolve_request({"night_from": "2026-11-01", "night_to": "2026-11-03"})["nights"] == \
            ["2026-11-01", "2026-11-03"]
        assert resolve_request({}, [event])["nights"] == ["2026-11-02", "2026-11-02"]
        assert resolve_request({})["nights"] is None


def test_night_partitions_follow_the_night_convention():
    """The partition key of a night is its name (metadata.observing_night) and the partition
    timetables' site time zone is the one the night names use."""
    import zoneinfo

    from iris_tasks import metadata
    from iris_tasks.errors import ConfigurationError
    from iris_tasks.orchestration.nights import (
        SITE_TIMEZONE,
        check_night,
        night_of_datetime,
        night_of_run,
    )

    offset = zoneinfo.ZoneInfo(SITE_TIMEZONE).utcoffset(dt.datetime(2026, 7, 1))
    assert offset == dt.timedelta(hours=metadata.SITE_UTC_OFFSET_HOURS)
    assert zoneinfo.ZoneInfo(SITE_TIMEZONE).utcoffset(dt.datetime(2026, 12, 7)) == offset  # no DST
    # 08:00 Hawaii on the 8th (the nightly run): the night of the 7th.
    assert night_of_datetime(dt.datetime(2026, 12, 8, 18, 0, tzinfo=dt.UTC)) == "2026-12-07"

    class Run:
        partition_key = "2026-12-07"
        run_after = dt.datetime(2026, 12, 20, 18, 0, tzinfo=dt.UTC)

    assert night_of_run({"dag_run": Run(), "params": {"night": "2026-11-01"}}) == "2026-12-07"
    Run.partition_key = None
    assert night_of_run({"dag_run": Run(), "params": {"night": "2026-11-01"}}) == "2026-11-01"
    assert night_of_run({"dag_run": Run(), "params": {}, "logical_date": None}) == "2026-12-19"
    for bad in ("2026-13-01", "2026-12-7", "", None):
        with pytest.raises(ConfigurationError, match="night"):
            check_night(bad)


def test_versioned_object_names():
    from iris_tasks.orchestration.common import versioned_name

    assert versioned_name("x_cal.fits", "tmt_0007.pmap") == "x_cal.tmt_0007.fits"
    assert versioned_name("x_ql.png", "tmt_0007") == "x_ql.tmt_0007.png"
    assert versioned_name("x_cal.fits", None) == "x_cal.fits"


def test_airflow_env(tmp_path):
    from iris_devstack.airflow_env import REPO_DIR, airflow_env

    class FakeS3:
        endpoint_url = "http://127.0.0.1:9999"

        def airflow_conn_uri(self):
            return "aws://k:s@/?endpoint_url=http%3A%2F%2F127.0.0.1%3A9999"

    env = airflow_env(tmp_path / "st", s3=FakeS3(), parallelism=2)
    assert env["AIRFLOW_HOME"] == str(tmp_path / "st" / "airflow")
    assert env["AIRFLOW__CORE__DAGS_FOLDER"] == str(REPO_DIR / "dags")
    assert env["AIRFLOW__CORE__PLUGINS_FOLDER"] == str(REPO_DIR / "plugins")
    assert env["AIRFLOW__DATABASE__SQL_ALCHEMY_CONN"].startswith("sqlite:///")
    assert env["AIRFLOW__CORE__EXECUTOR"] == "iris_tasks.orchestration.warm.WarmLocalExecutor"
    assert env["AIRFLOW__CORE__PARALLELISM"] == "2"
    assert env["AIRFLOW__CORE__LOAD_EXAMPLES"] == "False" and env["AIRFLOW__API__HOST"] == "127.0.0.1"
    transport = json.loads(env["AIRFLOW__OPENLINEAGE__TRANSPORT"])
    assert transport == {"type": "file", "log_file_path": str(tmp_path / "st" / "lineage" / "ol")}
    assert env["AIRFLOW_CONN_IRIS_S3"].startswith("aws://")
    assert json.loads(env["AIRFLOW_CONN_FS_DEFAULT"])["conn_type"] == "fs"
    assert env["IRIS_STORE_URL"] == "s3://iris-drs?conn_id=iris_s3"
    assert env["IRIS_LANDING"] == str(tmp_path / "st" / "landing")
    # The JWT secret is stable per AIRFLOW_HOME (scheduler and API server must agree).
    again = airflow_env(tmp_path / "st")
    assert again["AIRFLOW__API_AUTH__JWT_SECRET"] == env["AIRFLOW__API_AUTH__JWT_SECRET"]
    assert again["AIRFLOW__CORE__FERNET_KEY"] == env["AIRFLOW__CORE__FERNET_KEY"]
    from cryptography.fernet import Fernet

    Fernet(env["AIRFLOW__CORE__FERNET_KEY"])  # a valid key
    pg = airflow_env(tmp_path / "st", sql_alchemy_conn="postgresql+psycopg2://u@127.0.0.1/af",
                     base={"PATH": os.environ.get("PATH", "")})
    assert pg["AIRFLOW__DATABASE__SQL_ALCHEMY_CONN"].startswith("postgresql") and "PATH" in pg
    assert pg["IRIS_STORE_URL"] == (tmp_path / "st" / "store").as_uri()


def test_cli_commands_are_registered(state, capsys):
    import argparse

    from iris_devstack.cli import register_cli as register_devstack_cli
    from iris_tasks.orchestration.cli import register_cli

    parser = argparse.ArgumentParser()
    sub = parser.add_subparsers(dest="command")
    register_cli(sub)
    register_devstack_cli(sub)  # airflow-env: the dev stack's command (iris_drs.cli entry point)
    for cmd in ("process-frame", "ingest", "lineage", "ledger", "nightly", "reprocess", "nights", "airflow-env"):
        assert cmd in sub.choices
    args = parser.parse_args(["ledger", "--json"])
    assert args.handler(args) == 0
    assert json.loads(capsys.readouterr().out)["frames"] == []
    args = parser.parse_args(["airflow-env", "--state", str(state.state_dir)])
    args.handler(args)
    assert "export AIRFLOW__API__HOST=127.0.0.1" in capsys.readouterr().out
