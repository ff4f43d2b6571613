"""The night page's queries, each on a small hand-made ledger or landing area: which night a
frame is listed under (header or landing time), the live timeline (newest first, filters,
pages), the work in progress, the health checks and their time limits, the landing area, and
the pending approvals as the page shows them."""

from __future__ import annotations

import datetime as dt
import os
import socket
import threading
from pathlib import Path

import pytest
import sqlalchemy as sa

pytest.importorskip("fastapi")
from test_plugin_support import write_raw  # noqa: E402, I001  # isort: skip
# The local PostgreSQL's fresh-schema fixtures (skipped with the reason when it is not there).
from test_ledger_postgres import pg_schema, pg_url  # noqa: E402, F401  # isort: skip
from fastapi.testclient import TestClient  # noqa: E402
from iris_ops import health  # noqa: E402
from iris_ops.airflow_db import approval_row, components_from_report, workers_line  # noqa: E402
from iris_ops.app import create_app  # noqa: E402
from iris_ops.landing import landing_view, look  # noqa: E402
from iris_ops.ledger import (  # noqa: E402
    TimelineQuery,
    attributed_night,
    attributed_nights,
    landing_night,
    landing_window,
    load_night,
    night_frames,
    timeline,
    work_in_progress,
)
from iris_ops.views import ComponentHealth, LandingView, NightView, WaitingRow  # noqa: E402

from iris_tasks.orchestration.approval import ApprovalSettings, approval_request  # noqa: E402
from iris_tasks.orchestration.landing import survey_directory  # noqa: E402
from iris_tasks.orchestration.ledger import FrameLedger, frames, isotime  # noqa: E402

N = "2026-11-23"  # the night under test; it lands from 2026-11-23T22:00Z to 2026-11-24T22:00Z


def _landed(night: str, hours_after_start: float) -> str:
    start = dt.datetime.fromisoformat(landing_window(night)[0])
    return isotime(start + dt.timedelta(hours=hours_after_start))


def _frame(led: FrameLedger, name: str, landed: str, *, night: str | None, status: str,
           detector: str = "IMG1", obsname: str = "IMG1-SCI", missed: bool = False) -> str:
    row, _ = led.claim(sha256=f"{abs(hash(name)):016x}".ljust(64, "0")[:64], filename=name,
                       source_uri=f"/landing/{name}", landed_at=landed)
    fields = dict(status=status, detector=detector, obsname=obsname, deadline_missed=missed)
    if night is not None:
        fields["night"] = night
    if status == "done":
        fields["finished_at"] = isotime(dt.datetime.fromisoformat(landed) + dt.timedelta(seconds=8))
        fields["latency_seconds"] = 8.0
    led.update_frame(row["frame_id"], **fields)
    return row["frame_id"]


# -- which night a frame is listed under -------------------------------------------------------
def test_landing_window_and_night_agree():
    lo, hi = landing_window(N)
    assert (lo, hi) == ("2026-11-23T22:00:00.000+00:00", "2026-11-24T22:00:00.000+00:00")
    assert landing_night(lo) == N and landing_night("2026-11-24T21:59:59.999+00:00") == N
    assert landing_night(hi) == "2026-11-24"


@pytest.fixture(params=["sqlite", pytest.param("postgresql", marks=pytest.mark.services)])
def where(request: pytest.FixtureRequest, tmp_path: Path) -> Path | str:
    """A new ledger: a SQLite file, or a fresh schema of the local PostgreSQL (the queries
    are SQLAlchemy expressions; both dialects must list the same frames)."""
    if request.param == "sqlite":
        return tmp_path / "ledger.sqlite"
    return request.getfixturevalue("pg_url")


@pytest.fixture
def nights(where: Path | str) -> tuple[Path | str, dict[str, str]]:
    """Frames around night N: header nights that can and cannot be trusted, and a newer night."""
    led = FrameLedger(where)
    ids = {
        "good": _frame(led, "good.fits", _landed(N, 2), night=N, status="done"),
        # quarantined without a night (failed validation), and with a 1999 DATE-OBS: landing time
        "no_night": _frame(led, "no_night.fits", _landed(N, 3), night=None, status="quarantined"),
        "y1999": _frame(led, "y1999.fits", _landed(N, 4), night="1999-06-01", status="quarantined"),
        # a quarantined frame whose header night looks plausible: still the landing night
        "q_header": _frame(led, "q_header.fits", _landed(N, 5), night="2026-11-22", status="quarantined"),
        # failed before classification the next night
        "failed": _frame(led, "failed.fits", _landed("2026-11-24", 1), night=None, status="failed"),
        # re-sent the next night with a good header: its header night
        "resent": _frame(led, "resent.fits", _landed("2026-11-24", 2), night=N, status="done"),
        # processed with a header night far from its landing (a clock off by days): landing time
        "skewed": _frame(led, "skewed.fits", _landed(N, 6), night="2026-11-15", status="done"),
        # a newer night starts: nothing of N moves there
        "newer": _frame(led, "newer.fits", _landed("2026-11-25", 1), night="2026-11-25", status="done"),
    }
    return where, ids


def test_frames_are_listed_under_a_trusted_night_and_stay_there(nights):
    path, ids = nights
    by_id = {v: k for k, v in ids.items()}
    assert load_night(path).night == "2026-11-25"  # the newest night is the default
    night_n = {by_id[f.frame_id] for f in load_night(path, N).frames}
    assert night_n == {"good", "no_night", "y1999", "q_header", "resent", "skewed"}
    assert {by_id[f.frame_id] for f in load_night(path, "2026-11-24").frames} == {"failed"}
    assert {by_id[f.frame_id] for f in load_night(path, "2026-11-25").frames} == {"newer"}
    # Nights with nothing listed under them are not offered (no 1999, no 2026-11-15).
    assert load_night(path).nights == ["2026-11-25", "2026-11-24", N]
    view = load_night(path, N)
    rows = {by_id[f.frame_id]: f for f in view.frames}
    assert rows["y1999"].header_night == "1999-06-01" and rows["y1999"].night_source == "landing"
    assert rows["no_night"].header_night == "" and rows["skewed"].header_night == "2026-11-15"
    assert rows["good"].header_night is None and rows["resent"].night_source == "header"
    assert {by_id[q.frame_id] for q in view.quarantine} == {"no_night", "y1999", "q_header"}
    assert {q.header_night for q in view.quarantine} == {"", "1999-06-01", "2026-11-22"}


def test_the_sql_rule_is_the_python_rule(nights):
    path, _ = nights
    with FrameLedger(path, readonly=True).reader() as reader:
        every = reader.frames_by_id(reader.conn.execute(sa.select(frames.c.frame_id)).scalars())
        listed = {n: {r["frame_id"] for r in night_frames(reader, n)} for n in attributed_nights(reader)}
    expected: dict[str, set[str]] = {}
    for row in every:
        expected.setdefault(attributed_night(row)[0], set()).add(row["frame_id"])
    assert listed == expected


# -- the live timeline ------------------------------------------------------------------------
@pytest.fixture
def busy_night(where: Path | str) -> Path | str:
    led = FrameLedger(where)
    for i in range(12):
        det, obs = ("IFS", "LEN-SCI") if i % 3 == 0 else ("IMG1", "IMG1-SCI")
        status = "failed" if i == 7 else "done"
        _frame(led, f"f{i:02d}.fits", _landed(N, 1 + i / 60), night=N, status=status, detector=det,
               obsname=obs, missed=i in (4, 9))
    return where


def test_timeline_is_newest_first_in_pages_and_filters(busy_night: Path):
    with FrameLedger(busy_night, readonly=True).reader() as reader:
        rows, total = timeline(reader, N, TimelineQuery(per_page=5))
        assert total == 12 and [r["filename"] for r in rows] == [f"f{i:02d}.fits" for i in (11, 10, 9, 8, 7)]
        rows, _ = timeline(reader, N, TimelineQuery(per_page=5, page=3))
        assert [r["filename"] for r in rows] == ["f01.fits", "f00.fits"]
        rows, total = timeline(reader, N, TimelineQuery(detector="IFS"))
        assert total == 4 and [r["filename"] for r in rows] == ["f09.fits", "f06.fits", "f03.fits", "f00.fits"]
        assert [r["filename"] for r in timeline(reader, N, TimelineQuery(status="missed"))[0]] == [
            "f09.fits", "f04.fits"]
        assert timeline(reader, N, TimelineQuery(status="failed", obsname="IMG1-SCI"))[1] == 1
        assert timeline(reader, "2026-11-01", TimelineQuery())[1] == 0
    view = load_night(busy_night, N, query=TimelineQuery(detector="IMG1", per_page=5, page=2))
    t = view.timeline
    assert (t.total, t.pages, t.page, len(t.frames)) == (8, 2, 2, 3)
    assert t.choices == {"detector": ["IFS", "IMG1"], "obsname": ["IMG1-SCI", "LEN-SCI"],
                         "status": ["done", "failed", "missed"]}
    # The tiles count the whole night, not the page.
    assert view.summary()["frames"] == 12 and view.summary()["deadline_misses"] == 2


def test_timeline_page_through_the_app(busy_night: Path | str, tmp_path: Path):
    app = create_app(lambda n, q: load_night(busy_night, n, query=q), airflow_base_url="",
                     require_auth=False, allowed_roots=[tmp_path])
    c = TestClient(app)
    html = c.get("/", params={"per_page": 5, "page": 2, "detector": "IMG1"}).text
    assert html.count('class="frame"') == 3 and "page 2 of 2" in html
    assert 'href="?detector=IMG1&amp;per_page=5"' in html  # "newest": back to page 1, filter kept
    assert '<option value="IMG1" selected>IMG1</option>' in html
    data = c.get("/api/night", params={"status": "missed"}).json()
    assert [f["filename"] for f in data["frames"]] == ["f09.fits", "f04.fits"]
    assert data["timeline"]["filters"] == {"status": "missed"}


def test_work_in_progress_is_the_last_frame_done_and_the_oldest_open(tmp_path: Path):
    led = FrameLedger(tmp_path / "ledger.sqlite")
    now = dt.datetime(2026, 11, 24, 8, 0, tzinfo=dt.UTC)
    _frame(led, "done1.fits", isotime(now - dt.timedelta(minutes=30)), night=N, status="done")
    _frame(led, "done2.fits", isotime(now - dt.timedelta(minutes=10)), night=N, status="done")
    _frame(led, "open.fits", isotime(now - dt.timedelta(minutes=5)), night=N, status="processing")
    _frame(led, "left.fits", isotime(now - dt.timedelta(days=3)), night="2026-11-20", status="claimed")
    with led.reader() as reader:
        last, oldest = work_in_progress(reader, now)
    assert last == isotime(now - dt.timedelta(minutes=10, seconds=-8))
    assert oldest == isotime(now - dt.timedelta(minutes=5))  # the 3-day-old open frame is not tonight's


# -- health -----------------------------------------------------------------------------------
def test_frame_flow_is_red_only_when_frames_wait_too_long():
    now = dt.datetime(2026, 11, 24, 8, 0, tzinfo=dt.UTC)
    view = NightView(night=N, last_done_at=isotime(now - dt.timedelta(minutes=20)))
    idle = health.frame_flow(view, None, now, limit=120)
    assert idle.state == "ok" and "20 min ago" in idle.summary
    view.open_since = isotime(now - dt.timedelta(seconds=30))
    assert health.frame_flow(view, None, now, limit=120).state == "ok"
    view.open_since = None
    landing = LandingView(waiting=[WaitingRow("a.fits", "ready", since=isotime(now - dt.timedelta(minutes=5))),
                                   WaitingRow("b.fits", "being written", since=isotime(now - dt.timedelta(hours=1)))])
    stale = health.frame_flow(view, landing, now, limit=120)
    assert stale.state == "bad" and "waited 5 min" in stale.summary  # a file being written is not late
    assert health.frame_flow(NightView(night=None), None, now, limit=120).summary == "no frame processed yet"


def test_stale_limit_from_the_environment(monkeypatch):
    monkeypatch.setenv(health.ENV_STALE, "300")
    assert health.stale_after() == 300
    monkeypatch.setenv(health.ENV_STALE, "soon")
    assert health.stale_after() == health.DEFAULT_STALE_SECONDS


def test_compute_server_check(tmp_path: Path):
    assert health.compute_server(None)[0].state == "off"
    path = tmp_path / "c.sock"
    assert health.compute_server(path)[0].state == "warn"  # nobody listens: tasks compute themselves
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as server:
        server.bind(os.fspath(path))
        server.listen(1)
        (line,) = health.compute_server(path)
    assert (line.state, line.summary) == ("ok", "listening")


@pytest.mark.services
def test_object_store_check(tmp_path: Path, s3_store):
    from iris_tasks.storage import LocalStore
    from iris_tasks.storage.s3 import S3Store

    (tmp_path / "store").mkdir()
    assert health.object_store(LocalStore(tmp_path / "store"))[0].state == "ok"
    assert health.object_store(LocalStore(tmp_path / "gone"))[0].state == "bad"
    assert health.object_store(s3_store)[0].state == "ok"  # SeaweedFS answers
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        closed = s.getsockname()[1]
    down = S3Store("b", endpoint_url=f"http://127.0.0.1:{closed}", access_key="k", secret_key="s")
    (line,) = health.object_store(down)
    assert line.state == "bad" and f"127.0.0.1:{closed}" in line.detail


def test_bounded_calls_answer_in_time_and_are_not_stacked():
    release = threading.Event()
    started = []

    def hangs():
        started.append(1)
        release.wait(30)
        return [ComponentHealth("slow", "ok", "late")]

    first = health.bounded({"test:slow": hangs, "test:fast": lambda: 42}, timeout=0.3)
    assert isinstance(first["test:slow"], health.NoAnswer) and first["test:fast"] == 42
    again = health.bounded({"test:slow": hangs}, timeout=0.1)
    assert isinstance(again["test:slow"], health.NoAnswer) and len(started) == 1
    release.set()
    # The hung run's own answer once it comes (or a new run's, if it ended meanwhile).
    done = health.bounded({"test:slow": hangs}, timeout=5)
    assert isinstance(done["test:slow"], list) and len(started) in (1, 2)
    view = health.assemble([first["test:slow"], ValueError("boom")], ["slow", "broken"], dt.datetime.now(dt.UTC))
    assert [c.state for c in view.components] == ["unknown", "unknown"] and view.state == "bad"


def test_airflow_report_and_workers_lines():
    now = dt.datetime(2026, 11, 24, 8, 0, tzinfo=dt.UTC)
    report = {"metadatabase": {"status": "healthy"},
              "scheduler": {"status": "unhealthy", "latest_scheduler_heartbeat": "2026-11-24T07:55:00+00:00"},
              "triggerer": {"status": "healthy", "latest_triggerer_heartbeat": "2026-11-24T07:59:58+00:00"},
              "dag_processor": {"status": None, "latest_dag_processor_heartbeat": None}}
    lines = {c.name: c for c in components_from_report(report, now)}
    assert lines["scheduler"].state == "bad" and "5 min ago" in lines["scheduler"].detail
    assert lines["triggerer"].state == "ok" and lines["dag-processor"].summary == "never started"
    assert lines["airflow-db"].state == "ok"
    assert workers_line(2, 0, None, now).state == "ok"
    assert workers_line(0, 3, now - dt.timedelta(seconds=20), now).state == "ok"
    late = workers_line(0, 3, (now - dt.timedelta(minutes=4)).replace(tzinfo=None), now)
    assert late.state == "bad" and "4 min" in late.summary


def test_a_hanging_check_makes_the_banner_red_without_holding_the_page(busy_night: Path | str,
                                                                        tmp_path: Path):
    release = threading.Event()

    def scheduler_hangs():
        release.wait(30)
        return []

    app = create_app(lambda n, q: load_night(busy_night, n, query=q), airflow_base_url="",
                     require_auth=False, allowed_roots=[tmp_path], read_timeout=0.5,
                     checks={"airflow": scheduler_hangs, "compute": lambda: health.compute_server(None)})
    try:
        data = TestClient(app).get("/api/night").json()
    finally:
        release.set()
    states = {c["name"]: c["state"] for c in data["health"]["components"]}
    assert states == {"airflow": "unknown", "compute": "off", "ledger": "ok", "frames": "ok"}
    assert data["health"]["state"] == "bad" and data["summary"]["frames"] == 12


# -- the landing area -------------------------------------------------------------------------
def test_landing_area_waiting_and_ignored(tmp_path: Path):
    landing = tmp_path / "landing"
    landing.mkdir()
    whole = write_raw(landing / "whole.fits", seed=1)
    os.utime(whole, (whole.stat().st_atime - 60, whole.stat().st_mtime - 60))  # settled
    (landing / "fresh.fits").write_bytes(whole.read_bytes()[:5000])  # being written right now
    (landing / "x.fits.gz").write_bytes(b"gz")
    (landing / "night2").mkdir()
    (landing / ".tmp.fits.part").write_bytes(b"in flight")  # a writer's name: not reported
    view = look(str(landing))
    states = {w.name: w.state for w in view.waiting}
    assert states == {"whole.fits": "ready", "fresh.fits": "being written"}
    fresh = next(w for w in view.waiting if w.name == "fresh.fits")
    assert "modified" in fresh.reason or "incomplete" in fresh.reason
    assert {i.name: i.reason.split(":")[0] for i in view.ignored} == {
        "x.fits.gz": "compressed frame", "night2": "sub-directory"}
    # The ledger's record gives the time an ignored entry was first seen.
    from iris_ops.views import IgnoredRow

    uri = next(i.uri for i in view.ignored if i.name == "x.fits.gz")
    seen = landing_view(str(landing), survey_directory(landing),
                        [IgnoredRow("x.fits.gz", "compressed", since="2026-11-24T01:00:00.000+00:00", uri=uri)])
    assert next(i.since for i in seen.ignored if i.name == "x.fits.gz").startswith("2026-11-24T01:00")


def test_landing_area_unreadable_falls_back_to_the_ledger(tmp_path: Path):
    led = FrameLedger(tmp_path / "ledger.sqlite")
    led.note_ignored([("s3://raw/in/a.fits.fz", "a.fits.fz", 9, "compressed frame")], scope="s3://raw/in/")
    _frame(led, "f.fits", isotime(), night=landing_night(isotime()), status="done")

    def no_s3():
        raise ConnectionError("endpoint http://127.0.0.1:1 refused")

    app = create_app(lambda n, q: load_night(tmp_path / "ledger.sqlite", n, query=q), airflow_base_url="",
                     require_auth=False, look_at_landing=no_s3)
    html = TestClient(app).get("/").text
    assert 'id="landing-problem"' in html and "endpoint http://127.0.0.1:1 refused" in html
    assert "a.fits.fz" in html and "compressed frame" in html


# -- pending approvals ------------------------------------------------------------------------
def _approval(night: str, masters: list[str]) -> dict:
    reports = [{"master": m, "reftype": "dark", "previous": "/crds/old_dark.fits", "passed": True,
                "metrics": {"median_shift": 0.2, "residual_rms": 1.1},
                "thresholds": {"median_shift": (None, 1.0)}, "failed": []} for m in masters]
    req = approval_request(reports, masters, night, ApprovalSettings(), current_context="tmt_0001.pmap",
                           base_url="http://127.0.0.1:8080")
    return {"subject": req["subject"], "body": req["body"] + "\n\n<script>alert(1)</script>",
            "options": req["options"], "defaults": req["defaults"],
            "created_at": dt.datetime(2026, 11, 24, 8, 0, tzinfo=dt.UTC), "dag_id": "iris_nightly_calibrations",
            "run_id": "manual__2026-11-24T08:00:00+00:00", "task_id": "approve", "map_index": -1,
            "conf": {"night": night}}


def test_pending_approval_on_the_page(tmp_path: Path):
    from test_plugin_support import NIGHT, build_night

    build_night(tmp_path)
    masters = tmp_path / "work" / "nightly" / NIGHT / "masters"
    row = approval_row(_approval(NIGHT, [str(masters / "iris_ifs_flat_0002.fits")]))
    assert row.night == NIGHT and row.masters == ["iris_ifs_flat_0002.fits"]
    assert approval_row({**_approval(NIGHT, []), "conf": {}}).night == NIGHT  # from the subject
    app = create_app(
        lambda n, q: load_night(tmp_path / "ledger.sqlite", n, quarantine_dir=tmp_path / "quarantine",
                                work_dir=tmp_path / "work", query=q),
        airflow_base_url="/airflow", require_auth=False, allowed_roots=[tmp_path],
        load_approvals=lambda: [row])
    c = TestClient(app)
    html = c.get("/").text
    assert 'id="approvals"' in html and row.subject in html
    assert ('target="_top" href="/airflow/dags/iris_nightly_calibrations/runs/'
            'manual__2026-11-24T08%3A00%3A00%2B00%3A00/tasks/approve/required_actions"') in html
    assert 'href="/airflow/required_actions?response_received=false"' in html
    assert "<table>" in html and "<td>median_shift</td>" in html  # the QA table, as HTML
    assert "<script>alert(1)" not in html and "&lt;script&gt;alert(1)" in html
    assert f'src="ql-master/iris_ifs_flat_0002.fits?night={NIGHT}"' in html
    r = c.get("/ql-master/iris_ifs_flat_0002.fits", params={"night": NIGHT})
    assert r.status_code == 200 and r.content.startswith(b"\x89PNG")
    data = c.get("/api/night").json()
    assert data["summary"]["approvals_pending"] == 1
    assert {m["name"]: m["status"] for m in data["masters"]}["iris_ifs_flat_0002.fits"] == "awaiting approval"
