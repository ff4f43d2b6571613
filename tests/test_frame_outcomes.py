"""Every frame reaches a terminal state with a reason, and a run with failed frames says so.

Found by a tester: a re-sent file (same name, new content) stayed "processing" forever after
an ObjectConflictError in archive, and a run with failed frames showed Success. These tests run
the real-time functions without a scheduler on a tiny simulated night (64x64, IMG1).
"""

from __future__ import annotations

import os
import shutil
import time
from pathlib import Path

import pytest

from iris_tasks.orchestration.ledger import TERMINAL_STATUSES, FrameLedger, isotime

NIGHT = "2026-11-20"


@pytest.fixture
def state(iris_state):
    return iris_state


@pytest.fixture(scope="module")
def night(tmp_path_factory: pytest.TempPathFactory):
    from iris_tasks.simulate import NightPlan, simulate_night

    out = tmp_path_factory.mktemp("outcomes_night")
    plan = NightPlan(n_dark=1, n_flat=1, n_sky=0, n_science=1, imager_filters=("Ks",))
    manifest = simulate_night(out, size=64, nreads=4, detectors=["IMG1"], seed=5, night=NIGHT,
                              plan=plan)
    return out, manifest


def test_a_resent_corrected_frame_is_a_new_version_and_supersedes_the_first(state, night, tmp_path):
    from astropy.io import fits

    from iris_tasks.calib.testing import temporary_cache
    from iris_tasks.orchestration.local_run import process_paths
    from iris_tasks.storage import open_store

    out, manifest = night
    sci = next(out / f["path"] for f in manifest["files"] if f["obsname"] == "IMG1-SCI")
    corrected = tmp_path / "resend" / sci.name
    corrected.parent.mkdir()
    shutil.copy(sci, corrected)
    fits.setval(corrected, "EXP_NO", value=99)  # same name, other bytes
    with temporary_cache(tmp_path / "crds") as calib:
        calib.publish_references([str(out / r["path"]) for r in manifest["references"]], "refs")
        (first,) = process_paths([str(sci)])
        (second,) = process_paths([str(corrected)])
    assert first["status"] == second["status"] == "done"
    led = FrameLedger(state.ledger_path)
    rows = {r["frame_id"]: r for r in led.frames()}
    assert rows[first["frame_id"]]["status"] == "superseded"
    assert second["frame_id"] in rows[first["frame_id"]]["error"]
    assert rows[second["frame_id"]]["status"] == "done"
    # Both raw files are archived, neither over the other.
    store = open_store(state.store_url)
    raws = sorted(i.key.rsplit("/", 1)[1] for i in store.list("raw/"))
    stem = sci.name.removesuffix(".fits")
    assert raws == sorted([sci.name, f"{stem}.{second['frame_id']}.fits"])
    assert all(r["status"] in TERMINAL_STATUSES for r in rows.values())


def test_a_failed_run_closes_the_frames_its_tasks_left_open(state, caplog):
    """The real-time DAG's failure callback: frames of the run left open by their tasks are
    closed as failed, and every failed frame is named with its error; other runs untouched."""
    from iris_tasks.orchestration.run_summary import close_failed_run, summarize_run

    led = FrameLedger(state.ledger_path)
    stuck, _ = led.claim(sha256="ab" * 32, filename="stuck.fits", source_uri="file:///s",
                         landed_at=isotime(), run_id="run-1")
    led.update_frame(stuck["frame_id"], status="processing")
    ok, _ = led.claim(sha256="cd" * 32, filename="ok.fits", source_uri="file:///o",
                      landed_at=isotime(), run_id="run-1")
    led.finish(ok["frame_id"])
    other, _ = led.claim(sha256="ef" * 32, filename="other.fits", source_uri="file:///x",
                         landed_at=isotime(), run_id="run-2")
    with caplog.at_level("ERROR"):
        summary = close_failed_run("run-1", ledger=led)
    assert summary["failed"] == 1 and summary["failed_frames"][0]["filename"] == "stuck.fits"
    assert "stuck.fits" in caplog.text and "without closing it" in caplog.text
    row = led.frame(stuck["frame_id"])
    assert row["status"] == "failed" and "without closing it" in row["error"]
    assert led.frame(ok["frame_id"])["status"] == "done"
    assert led.frame(other["frame_id"])["status"] == "claimed"  # another run's frame: untouched
    assert summarize_run("run-2-none", ledger=led)["failed"] == 0


def test_the_realtime_dag_closes_failed_runs_by_callback_not_by_a_task():
    """No task per run for the clean-up: the DAG's failure callback does it (a successful run
    has nothing open), and it reaches the run summary."""
    import importlib.util

    spec = importlib.util.spec_from_file_location(
        "iris_realtime_dag", Path(__file__).resolve().parents[1] / "dags" / "iris_realtime.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    dag = module.iris_realtime()  # the decorated function builds the DAG object
    assert sorted(dag.task_ids) == ["claim", "frame"]
    callbacks = dag.on_failure_callback
    callbacks = callbacks if isinstance(callbacks, list) else [callbacks]
    assert module.close_failed_run in callbacks


def test_unreadable_files_are_quarantined_at_claim_not_crashed_on(state):
    from iris_tasks.orchestration.landing import claim_frames
    from iris_tasks.orchestration.realtime import admit_frames

    land = Path(state.landing)
    (land / "garbage.fits").write_bytes(b"SIMPLE  = this is not a FITS file" * 200)
    (land / "empty.fits").write_bytes(b"")

    past = time.time() - 600  # long past the stale time: claimed as they are
    for p in land.iterdir():
        os.utime(p, (past, past))
    claimed = claim_frames(run_id="r")
    assert sorted(f.filename for f in claimed) == ["empty.fits", "garbage.fits"]
    assert admit_frames(claimed) == []
    led = FrameLedger(state.ledger_path)
    for f in led.frames():
        assert f["status"] == "quarantined" and f["error"].startswith("quarantined ("), f
    assert len(list(state.quarantine_dir.rglob("reason.json"))) == 2


def _can_mount_tmpfs(where: Path) -> bool:
    import subprocess

    where.mkdir(parents=True, exist_ok=True)
    ok = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=64k", "tmpfs", str(where)],
                        capture_output=True).returncode == 0
    if ok:
        subprocess.run(["umount", str(where)], check=True)
    return ok


def test_a_full_work_area_fails_the_frame_it_hits_and_the_next_one_goes_on(state, night, tmp_path):
    """Disk full in the work area (a 4 MiB tmpfs filled up): the frame being reduced fails with
    the error in the ledger, the file is kept, and once space is back the next frame is done."""
    import errno
    import subprocess

    from iris_tasks.calib.testing import temporary_cache
    from iris_tasks.orchestration.landing import claim_paths
    from iris_tasks.orchestration.local_run import run_chain

    work = state.work_dir
    if os.geteuid() != 0 or not _can_mount_tmpfs(work):
        pytest.skip("needs root and tmpfs mounts to make a small full file system")
    out, manifest = night
    raws = [str(out / f["path"]) for f in manifest["files"]][:2]
    subprocess.run(["mount", "-t", "tmpfs", "-o", "size=4m", "tmpfs", str(work)], check=True)
    try:
        first, second = claim_paths(raws)
        filler = work / "filler"
        with open(filler, "wb") as f:  # fill to the last byte
            try:
                while True:
                    f.write(b"\0" * 65536)
                    f.flush()
            except OSError as exc:
                assert exc.errno == errno.ENOSPC
        with temporary_cache(tmp_path / "crds") as calib:
            calib.publish_references([str(out / r["path"]) for r in manifest["references"]], "r")
            with pytest.raises(OSError, match="No space left"):
                run_chain(first)
            filler.unlink()
            done = run_chain(second)
    finally:
        subprocess.run(["umount", "-l", str(work)], check=False)
    led = FrameLedger(state.ledger_path)
    row = led.frame(first.frame_id)
    assert row["status"] == "failed" and "No space left" in row["error"], row
    assert done["status"] == "done" and led.frame(second.frame_id)["status"] == "done"
