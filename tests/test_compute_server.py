"""The compute server (iris_tasks.orchestration.compute): a real server process on a Unix
socket, driven through the same client the ``frame`` task uses.

One server runs for the module on a tiny simulated night (64x64 IMG1) with a temporary CRDS
cache; the tests check that a frame computed by a warm worker is the frame computed in the
task, that logs, lineage and the task identity come back, and every way the client falls back
or fails: no server, other configuration, stale code (the server restarts itself), a worker
killed mid-request, a remote exception.
"""

from __future__ import annotations

import json
import logging
import os
import signal
import socket
import threading
import time
from pathlib import Path

import numpy as np
import pytest

from iris_tasks.orchestration import compute

NIGHT = "2026-11-20"


@pytest.fixture(scope="module")
def served(tmp_path_factory: pytest.TempPathFactory):
    """(env, socket path, server pid, raw frames) with a server listening for the module."""
    from iris_tasks.calib.testing import temporary_cache
    from iris_tasks.simulate import NightPlan, simulate_night

    root = tmp_path_factory.mktemp("compute")
    plan = NightPlan(n_dark=1, n_flat=1, n_sky=1, n_science=5, imager_filters=("Ks",))
    manifest = simulate_night(root / "night", size=64, nreads=4, detectors=["IMG1"], seed=5,
                              night=NIGHT, plan=plan)
    raws = [str(root / "night" / f["path"]) for f in manifest["files"] if f["obsname"] == "IMG1-SCI"]
    sock = root / "run" / "compute.sock"
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("IRIS_STATE_DIR", str(root / "state"))
        mp.setenv("IRIS_LANDING", str(root / "landing"))
        mp.setenv("IRIS_STORE_URL", (root / "store").as_uri())
        mp.setenv("IRIS_COMPUTE_SOCKET", str(sock))
        mp.setenv("IRIS_CRDS_PATH", str(root / "crds"))  # the server finds the cache by it
        mp.setenv("OMP_NUM_THREADS", "1")
        mp.delenv("IRIS_ALERT_WEBHOOK", raising=False)
        with temporary_cache(root / "crds") as calib:
            calib.publish_references([str(root / "night" / r["path"]) for r in manifest["references"]],
                                     "pre-night")
            env = dict(os.environ)
            with compute.running_server(sock, workers=1, env=env, log_path=root / "server.log") as pid:
                yield {"env": env, "socket": sock, "pid": pid, "raws": raws, "root": root}


@pytest.fixture
def client_env(served, monkeypatch: pytest.MonkeyPatch):
    """This test process configured exactly as the server is."""
    for key in [k for k in os.environ if k.startswith(("IRIS_", "CRDS_"))]:
        monkeypatch.delenv(key)
    for key, value in served["env"].items():
        monkeypatch.setenv(key, value)
    return served


def _claim(raw: str) -> dict:
    from iris_tasks.orchestration.landing import claim_paths

    (frame,) = claim_paths([raw])
    return frame


def _worker_pid() -> int:
    return compute.run("ping")["pid"]


def test_a_frame_computed_by_the_server_equals_the_one_computed_in_the_task(client_env, monkeypatch, caplog):
    from astropy.io import fits

    from iris_tasks import lineage
    from iris_tasks.config import settings
    from iris_tasks.orchestration.frame_task import run_frame_task
    from iris_tasks.orchestration.ledger import FrameLedger
    from iris_tasks.orchestration.realtime import process_frame

    recorded: list[tuple[list, list, str | None]] = []
    monkeypatch.setattr(lineage, "record",
                        lambda ins, outs, job=None, **_: recorded.append((list(ins), list(outs), job)))
    frame = _claim(client_env["raws"][0])
    with caplog.at_level(logging.INFO):
        report = run_frame_task(frame)
    assert report["status"] == "done" and report["obsname"] == "IMG1-SCI"
    assert Path(report["product_path"]).is_file()

    # The worker's step logs were re-emitted here, and the result names the worker.
    replayed = [r for r in caplog.records if r.pathname == "(compute server)"]
    assert replayed and any("readout" in r.getMessage().lower() or "step" in r.getMessage().lower()
                            for r in replayed)
    worker = _worker_pid()
    assert worker != os.getpid()
    assert any(f"worker {worker}" in r.getMessage() for r in caplog.records)

    # Lineage was reported to this process (as an Airflow task would to its collector): the
    # worker's steps in order, and the task's own store steps.
    jobs = [job for _, _, job in recorded]
    assert [j for j in jobs if j.split(".")[1] in ("classify", "readout", "reduce", "quicklook")] == [
        "iris_realtime.classify", "iris_realtime.readout", "iris_realtime.reduce",
        "iris_realtime.quicklook"]
    assert {"iris_realtime.archive", "iris_realtime.early_upload", "iris_realtime.ingest"} <= set(jobs)
    assert any(str(frame.raw_path) in " ".join(ins) for ins, _, _ in recorded)

    # The ledger stages carry this process's identity, not the worker's.
    led = FrameLedger(settings().ledger_path)
    stages = led.stages(frame.frame_id)
    assert {s["stage"] for s in stages} == {"archive", "classify", "readout", "reduce", "quicklook",
                                            "early_upload", "ingest"}
    assert {s["run_id"] for s in stages} == {f"cli-{os.getpid()}"}
    assert all(json.loads(s["detail"])["cpu_seconds"] >= 0 for s in stages)
    _assert_rate_stored_once_early(led, frame.frame_id, report)

    # The same frame computed in this process gives the same science arrays.
    served_sci = fits.getdata(report["product_path"], "SCI").copy()
    served_rate = fits.getdata(report["rate_path"], "SCI").copy()
    local_out = process_frame(frame)
    assert local_out.product_path == report["product_path"]
    np.testing.assert_array_equal(fits.getdata(local_out.product_path, "SCI"), served_sci)
    np.testing.assert_array_equal(fits.getdata(local_out.rate_path, "SCI"), served_rate)


def _assert_rate_stored_once_early(led, frame_id: str, report: dict) -> None:
    """The rate went to the store from the early upload, beside the compute, and ingest did
    not store it again."""
    from iris_tasks.storage import sha256_file

    (early,) = [s for s in led.stages(frame_id) if s["stage"] == "early_upload"]
    assert early["status"] == "success"
    (rate,) = [p for p in led.products(frame_id) if p["kind"] == "rate"]
    assert rate["version"] == 1
    stored = Path(rate["url"].removeprefix("file://"))
    assert stored.is_file() and rate["sha256"] == sha256_file(report["rate_path"])
    (ingest,) = [s for s in led.stages(frame_id) if s["stage"] == "ingest"]
    assert "rate" not in json.loads(ingest["detail"])["objects"]
    assert report["objects"]["rate"] == rate["url"]


def test_in_process_the_rate_is_stored_early_too_and_ingest_skips_it(client_env, monkeypatch):
    from iris_tasks.config import settings
    from iris_tasks.orchestration.frame_task import run_frame_task
    from iris_tasks.orchestration.ledger import FrameLedger

    monkeypatch.setenv("IRIS_COMPUTE_SOCKET", "off")
    frame = _claim(client_env["raws"][2])
    report = run_frame_task(frame)
    assert report["status"] == "done"
    _assert_rate_stored_once_early(FrameLedger(settings().ledger_path), frame.frame_id, report)


def test_a_failed_early_upload_leaves_the_rate_to_ingest(client_env, monkeypatch, caplog):
    from iris_tasks.config import settings
    from iris_tasks.orchestration import frame_task
    from iris_tasks.orchestration.ledger import FrameLedger

    def unreachable(*args, **kwargs):
        raise ConnectionError("store unreachable")

    frame = _claim(client_env["raws"][3])
    with monkeypatch.context() as mp, caplog.at_level(logging.WARNING):
        mp.setattr(frame_task, "store_item", unreachable)  # the early upload's, only
        report = frame_task.run_frame_task(frame)
    assert "early upload of" in caplog.text and "unreachable" in caplog.text
    led = FrameLedger(settings().ledger_path)
    assert led.frame(frame.frame_id)["status"] == "done"
    (early,) = [s for s in led.stages(frame.frame_id) if s["stage"] == "early_upload"]
    assert early["status"] == "failed"
    assert report["objects"]["rate"].endswith("_rate.fits")
    assert [p["kind"] for p in led.products(frame.frame_id)].count("rate") == 1


def _variant(raw: str, name: str, exp_no: int) -> str:
    """The same exposure with other bytes: a frame of its own."""
    from astropy.io import fits

    variant = Path(raw).parent / name
    variant.write_bytes(Path(raw).read_bytes())
    fits.setval(variant, "EXP_NO", value=exp_no)
    return str(variant)


def test_a_store_fault_fails_the_try_and_the_retry_only_stores(client_env, monkeypatch):
    """A transient store fault after the compute: the try fails with a retriable error, the
    frame stays open (a retry is pending), the computed frame is kept, and the next try
    stores it without computing again."""
    from iris_tasks.config import settings
    from iris_tasks.errors import is_retriable
    from iris_tasks.orchestration import context, frame_task, realtime
    from iris_tasks.orchestration.ledger import FrameLedger
    from iris_tasks.storage import StorageError

    frame = _claim(_variant(client_env["raws"][4], "store_fault.fits", 5151))
    real_store_item = realtime.store_item

    def cal_fails(store, f, kind, path, **kw):
        if kind == "cal":
            raise StorageError("products/x_cal.fits", "upload failed: 503 SlowDown")
        return real_store_item(store, f, kind, path, **kw)

    # the first of five tries of an Airflow task (the identity a task hands its stages)
    first_try = {"dag_id": "iris_realtime", "run_id": "store-fault", "try_number": 1,
                 "max_tries": 4, "task_id": "frame", "map_index": 0}
    with monkeypatch.context() as mp, context.serving(first_try, lineage=None, events=None):
        mp.setattr(realtime, "store_item", cal_fails)
        with pytest.raises(StorageError) as err:
            frame_task.run_frame_task(frame)
    assert is_retriable(err.value)
    led = FrameLedger(settings().ledger_path)
    row = led.frame(frame.frame_id)  # open while its retry is pending, the fault noted
    assert row["status"] == "processing" and "ingest: StorageError" in row["error"], row
    assert (settings().work_dir / frame.frame_id / frame_task.PROCESSED_FILE).is_file()

    def no_compute(*args, **kwargs):
        raise AssertionError("the retry computed the frame again")

    monkeypatch.setattr(compute, "run", no_compute)
    report = frame_task.run_frame_task(frame)
    assert report["status"] == "done" and led.frame(frame.frame_id)["status"] == "done"
    kinds = [p["kind"] for p in led.products(frame.frame_id)]
    assert sorted(kinds) == ["cal", "quicklook", "rate", "raw"]  # each stored once
    assert [s["stage"] for s in led.stages(frame.frame_id)].count("readout") == 1


def test_a_failed_compute_still_archives_the_raw_frame(client_env, monkeypatch):
    from iris_tasks.config import settings
    from iris_tasks.errors import ProcessingError
    from iris_tasks.orchestration.frame_task import PROCESSED_FILE, run_frame_task
    from iris_tasks.orchestration.ledger import FrameLedger

    frame = _claim(_variant(client_env["raws"][4], "compute_fails.fits", 5252))

    def fails(*args, **kwargs):
        raise ProcessingError("reduce: the flat field did not converge")

    monkeypatch.setattr(compute, "run", fails)
    with pytest.raises(ProcessingError):
        run_frame_task(frame)
    led = FrameLedger(settings().ledger_path)
    assert [p["kind"] for p in led.products(frame.frame_id)] == ["raw"]
    assert not (settings().work_dir / frame.frame_id / PROCESSED_FILE).exists()


def test_the_server_answers_as_the_requesting_task(client_env):
    from iris_tasks.orchestration.common import task_identity

    answer = compute.run("ping")
    assert answer["pid"] != os.getpid()
    assert answer["code"] == compute.code_fingerprint()
    assert answer["identity"] == task_identity()


def test_a_remote_exception_is_raised_with_its_type_and_traceback(client_env):
    with pytest.raises(compute.ComputeError, match="ValueError") as err:
        compute.run("ping", delay="soon")
    assert not isinstance(err.value, compute.ComputeServerLost)
    assert err.value.remote_type == "builtins.ValueError"
    assert "float" in err.value.remote_traceback
    assert _worker_pid() != os.getpid()  # the worker carried on


def test_unknown_operations_are_refused_before_anything_is_sent(client_env):
    with pytest.raises(ValueError, match="unknown compute operation 'os.system'"):
        compute.run("os.system", "true")


def test_other_configuration_falls_back_to_this_process(client_env, monkeypatch, caplog):
    monkeypatch.setenv("IRIS_MAX_FRAMES", "7")
    with caplog.at_level(logging.WARNING):
        answer = compute.run("ping")
    assert answer["pid"] == os.getpid()
    warning = " ".join(r.getMessage() for r in caplog.records)
    assert "configuration differs: IRIS_MAX_FRAMES" in warning
    assert "7" not in warning.split("IRIS_MAX_FRAMES", 1)[1][:20]  # names, never values


def test_a_process_pointed_at_another_crds_cache_is_not_served(client_env, tmp_path, caplog):
    from iris_tasks.calib.testing import temporary_cache

    with temporary_cache(tmp_path / "other-crds"), caplog.at_level(logging.WARNING):
        answer = compute.run("ping")
    assert answer["pid"] == os.getpid()
    assert "CRDS cache in use" in caplog.text


def test_no_server_or_a_dead_socket_falls_back_to_this_process(client_env, monkeypatch, tmp_path):
    monkeypatch.setenv("IRIS_COMPUTE_SOCKET", str(tmp_path / "absent.sock"))
    assert compute.run("ping")["pid"] == os.getpid()
    dead = tmp_path / "dead.sock"
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as s:
        s.bind(str(dead))  # a socket file nobody listens on, as a crashed server leaves it
    monkeypatch.setenv("IRIS_COMPUTE_SOCKET", str(dead))
    assert compute.run("ping")["pid"] == os.getpid()
    monkeypatch.setenv("IRIS_COMPUTE_SOCKET", "off")
    assert compute.socket_path() is None
    assert compute.run("ping")["pid"] == os.getpid()


def test_a_worker_killed_mid_request_fails_the_call_and_is_replaced(client_env):
    worker = _worker_pid()
    outcome: dict = {}

    def call():
        try:
            outcome["value"] = compute.run("ping", delay=30)
        except Exception as exc:  # noqa: BLE001 - inspected below
            outcome["error"] = exc

    thread = threading.Thread(target=call)
    thread.start()
    time.sleep(0.5)
    os.kill(worker, signal.SIGKILL)
    thread.join(timeout=20)
    assert isinstance(outcome.get("error"), compute.ComputeServerLost), outcome
    assert "lost ping" in str(outcome["error"]) and "worker died" in str(outcome["error"])
    deadline = time.monotonic() + 20
    while True:  # the master starts another worker
        try:
            replacement = _worker_pid()
            if replacement != os.getpid():
                break
        except compute.ComputeError:
            pass
        assert time.monotonic() < deadline, "no replacement worker"
        time.sleep(0.2)
    assert replacement != worker


def test_a_lost_worker_is_retried_in_the_task_process_once(client_env, monkeypatch):
    """Losing a worker is transient: the frame is computed again here (not on the server, so
    a frame that kills workers cannot take the others down); a second loss fails it."""
    from iris_tasks.config import settings
    from iris_tasks.orchestration.frame_task import compute_frame
    from iris_tasks.orchestration.ledger import FrameLedger

    frame = _claim(client_env["raws"][1])

    def lost(*args, **kwargs):
        raise compute.ComputeServerLost("the compute server at x lost process_frame(y)")

    monkeypatch.setattr(compute, "run", lost)
    out = compute_frame(frame)
    assert Path(out.final_path).is_file()
    ledger = FrameLedger(settings().ledger_path)
    alerts = ledger.alerts(frame_id=frame.frame_id, kind="compute_retry")
    assert len(alerts) == 1 and "lost process_frame" in alerts[0]["message"]

    frame2 = _claim(_variant(client_env["raws"][1], "lost_twice.fits", 4242))
    monkeypatch.setattr(compute, "run_local", lost)
    with pytest.raises(compute.ComputeServerLost):
        compute_frame(frame2)
    row = ledger.frame(frame2.frame_id)
    assert row["status"] == "failed" and "lost process_frame" in row["error"]


def test_stale_code_is_computed_here_and_the_server_restarts_on_the_new_code(client_env, monkeypatch, caplog):
    real = compute.code_fingerprint()
    monkeypatch.setattr(compute.protocol, "code_fingerprint", lambda *a, **k: "new-code")
    with caplog.at_level(logging.WARNING):
        answer = compute.run("ping")
    assert answer["pid"] == os.getpid()
    assert "stale code" in caplog.text
    monkeypatch.setattr(compute.protocol, "code_fingerprint", lambda *a, **k: real)
    deadline = time.monotonic() + 90
    while True:  # the master re-executes itself (same PID) and listens again
        time.sleep(0.5)
        try:
            pid = compute.run("ping")["pid"]
        except compute.ComputeError:
            pid = None
        if pid not in (None, os.getpid()):
            break
        assert time.monotonic() < deadline, "server did not come back"
    log_text = (client_env["root"] / "server.log").read_text()
    assert "new code deployed, restarting" in log_text
    assert os.path.exists(f"/proc/{client_env['pid']}")  # the same process, re-executed


def test_a_task_that_goes_away_does_not_fail_its_frame(client_env):
    """A task killed at its timeout closes the socket; the worker still finishes the frame
    (its log, lineage and events have nowhere to go) instead of failing it in the ledger."""
    from iris_tasks.config import settings
    from iris_tasks.orchestration.common import task_identity
    from iris_tasks.orchestration.ledger import FrameLedger

    frame = _claim(client_env["raws"][4])
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as sock:
        sock.connect(str(client_env["socket"]))
        compute.protocol.send(sock, {"protocol": compute.protocol.PROTOCOL, "op": "process_frame", "args": [frame.to_dict()],
                             "kwargs": {}, "code": compute.code_fingerprint(),
                             "config": compute.current_config(), "identity": task_identity(),
                             "log_level": logging.INFO})
        compute.protocol.recv(sock)  # the first log record: the worker has started
    led = FrameLedger(settings().ledger_path)
    deadline = time.monotonic() + 60
    while not any(s["stage"] == "quicklook" and s["status"] == "success"
                  for s in led.stages(frame.frame_id)):
        assert time.monotonic() < deadline, led.stages(frame.frame_id)
        time.sleep(0.2)
    assert led.frame(frame.frame_id)["status"] == "processing"
    assert {s["status"] for s in led.stages(frame.frame_id)} == {"success"}


def test_ping_reports_up_refused_absent_and_off(client_env, monkeypatch, tmp_path, capsys):
    from iris_tasks.cli import main

    assert main(["compute-server", "--ping"]) == 0
    report = json.loads(capsys.readouterr().out)
    assert report["status"] == "up" and report["worker_pid"] != os.getpid()
    assert report["code"] == compute.code_fingerprint()
    monkeypatch.setenv("IRIS_MAX_FRAMES", "3")
    assert compute.probe() == {"socket": str(client_env["socket"]), "status": "refused",
                               "reason": "configuration differs: IRIS_MAX_FRAMES"}
    assert compute.probe(tmp_path / "none.sock")["status"] == "absent"
    monkeypatch.setenv("IRIS_COMPUTE_SOCKET", "off")
    assert main(["compute-server", "--ping"]) == 1
    assert json.loads(capsys.readouterr().out) == {"socket": None, "status": "off"}


def test_a_second_server_on_the_same_socket_is_refused(client_env):
    server = compute.ComputeServer(client_env["socket"])
    with pytest.raises(RuntimeError, match="already listens"):
        server.bind()


def test_a_socket_path_too_long_is_named(tmp_path):
    long_path = tmp_path / ("x" * 120) / "compute.sock"
    with pytest.raises(ValueError, match="IRIS_COMPUTE_SOCKET"):
        compute.ComputeServer(long_path).bind()


def test_fingerprints(tmp_path):
    for sub in ("iris_tasks", "readout_cy"):
        (tmp_path / sub).mkdir()
    mod = tmp_path / "iris_tasks" / "m.py"
    mod.write_text("x = 1\n")
    first = compute.code_fingerprint(tmp_path)
    assert compute.code_fingerprint(tmp_path) == first
    mod.write_text("x = 22\n")
    assert compute.code_fingerprint(tmp_path) != first

    a = compute.config_fingerprint({"IRIS_A": "1", "CRDS_CONTEXT": "tmt_0001.pmap", "CRDS_PATH": "/c",
                                    "HOME": "/h", "IRIS_PRELOAD": "0"})
    b = compute.config_fingerprint({"IRIS_A": "2", "IRIS_B": "x"})
    assert set(a) == {"IRIS_A", "CRDS_CONTEXT"}
    assert compute.config_difference(a, b) == ["CRDS_CONTEXT", "IRIS_A", "IRIS_B"]
    assert "secret" not in str(compute.config_fingerprint({"IRIS_LEDGER_URL": "postgresql://u:secret@h/db"}))
