"""The frame ledger on both backends: the same behaviours against a SQLite file and against the
local PostgreSQL (127.0.0.1:5432, database ``test``, trust auth), plus what only matters with
several processes - concurrent claims, concurrent first use - and the read-only reader of the
operations plugin.

Every PostgreSQL test works in its own schema (``?schema=iris_test_<random>``, created by the
ledger itself on first use, dropped afterwards), so pytest-xdist workers never collide. The
PostgreSQL cases are skipped, with the reason, only when no server answers.
"""

from __future__ import annotations

import concurrent.futures
import datetime as dt
import json
import multiprocessing
import threading
import uuid
from pathlib import Path
from typing import Any

import pytest
import sqlalchemy as sa

from iris_tasks.config import settings
from iris_tasks.orchestration.ledger import (
    FAILED,
    SCHEMA_VERSION,
    FrameLedger,
    LedgerConnectionError,
    connect_postgres,
    isotime,
    open_ledger,
    parse_location,
    redact_url,
)

psycopg2 = pytest.importorskip("psycopg2")
# test_plugin_support puts plugins/ on sys.path (as Airflow does): import it first.
from test_plugin_support import NIGHT, build_night  # noqa: E402, I001  # isort: skip
from iris_ops.ledger import load_night  # noqa: E402

PG_SERVER = "127.0.0.1:5432"
PG_DATABASE = "test"
CONCURRENCY = 8


def _find_pg_user() -> tuple[str | None, str]:
    """The first of the usual trust-auth roles the local server accepts, or why none did."""
    why = ""
    for user in ("postgres", "root"):
        try:
            psycopg2.connect(f"postgresql://{user}@{PG_SERVER}/{PG_DATABASE}", connect_timeout=3).close()
            return user, ""
        except psycopg2.Error as exc:
            why = " ".join(str(exc).split())
    return None, why


PG_USER, PG_WHY = _find_pg_user()


def _admin() -> Any:
    conn = psycopg2.connect(f"postgresql://{PG_USER}@{PG_SERVER}/{PG_DATABASE}")
    conn.autocommit = True
    return conn


def _schema_exists(name: str) -> bool:
    with _admin() as conn, conn.cursor() as cur:
        cur.execute("SELECT 1 FROM pg_namespace WHERE nspname = %s", (name,))
        return cur.fetchone() is not None


@pytest.fixture
def pg_schema() -> Any:
    """A fresh schema name (not created: the ledger must create it), dropped afterwards."""
    if PG_USER is None:
        pytest.skip(f"PostgreSQL not reachable at {PG_SERVER}/{PG_DATABASE}: {PG_WHY}")
    name = f"iris_test_{uuid.uuid4().hex[:12]}"
    yield name
    conn = _admin()
    try:
        conn.cursor().execute(f"DROP SCHEMA IF EXISTS {name} CASCADE")
    finally:
        conn.close()


@pytest.fixture
def pg_url(pg_schema: str) -> str:
    return f"postgresql://{PG_USER}@{PG_SERVER}/{PG_DATABASE}?schema={pg_schema}"


@pytest.fixture(params=["sqlite", "postgresql"])
def target(request: pytest.FixtureRequest, tmp_path: Path) -> str | Path:
    if request.param == "sqlite":
        return tmp_path / "ledger.sqlite"
    return request.getfixturevalue("pg_url")


@pytest.fixture
def led(target: str | Path) -> FrameLedger:
    return FrameLedger(target)


def _claim(led: FrameLedger, sha: str, **kw: Any) -> tuple[dict[str, Any], str]:
    kw.setdefault("filename", "f.fits")
    kw.setdefault("source_uri", "file:///landing/f.fits")
    kw.setdefault("landed_at", isotime())
    return led.claim(sha256=sha, **kw)


def _together(n: int, fn: Any) -> list[Any]:
    """``fn(i)`` for i in range(n) in n threads released at the same instant (each ledger call
    opens its own connection, so these are n concurrent database sessions)."""
    barrier = threading.Barrier(n)

    def run(i: int) -> Any:
        barrier.wait()
        return fn(i)

    with concurrent.futures.ThreadPoolExecutor(n) as pool:
        return list(pool.map(run, range(n)))


# -- where the ledger is ------------------------------------------------------------------------
def test_locations_and_redaction(tmp_path: Path):
    loc = parse_location(tmp_path / "l.sqlite")
    assert (loc.backend, loc.path) == ("sqlite", tmp_path / "l.sqlite")
    assert parse_location("sqlite:////abs/l.sqlite").path == Path("/abs/l.sqlite")
    assert parse_location("sqlite:///rel/l.sqlite").path == Path("rel/l.sqlite")
    loc = parse_location("postgresql+psycopg2://u:pw@db:5432/iris?schema=ledger&sslmode=require")
    assert loc.is_postgres and loc.schema == "ledger"
    assert loc.dsn == "postgresql://u:pw@db:5432/iris?sslmode=require"
    assert loc.display == "postgresql+psycopg2://u:***@db:5432/iris?schema=ledger&sslmode=require"
    loc = parse_location("postgres://u@db/iris?options=-csearch_path%3Diris")
    assert loc.schema == "iris" and loc.options == "-csearch_path=iris" and "options" not in loc.dsn
    assert redact_url("postgresql://u@h/d?password=pw") == "postgresql://u@h/d?password=***"
    assert FrameLedger("postgresql://u:pw@h/d").path == "postgresql://u:***@h/d"
    with pytest.raises(ValueError, match="unsupported ledger URL mysql://u:\\*\\*\\*@h/d"):
        parse_location("mysql://u:pw@h/d")
    with pytest.raises(ValueError, match="lower-case identifier"):
        parse_location("postgresql://u@h/d?schema=Bad-Name")


def test_settings_choose_the_ledger(monkeypatch: pytest.MonkeyPatch, tmp_path: Path):
    monkeypatch.setenv("IRIS_STATE_DIR", str(tmp_path))
    monkeypatch.delenv("IRIS_LEDGER_URL", raising=False)
    monkeypatch.delenv("IRIS_LEDGER_SCHEMA", raising=False)
    assert settings().ledger_path == tmp_path.resolve() / "ledger.sqlite"
    assert open_ledger().backend == "sqlite"
    monkeypatch.setenv("IRIS_LEDGER_URL", "postgresql://u:pw@db:5432/airflow")
    monkeypatch.setenv("IRIS_LEDGER_SCHEMA", "iris_ledger")
    assert settings().ledger_path == "postgresql://u:pw@db:5432/airflow?schema=iris_ledger"
    led = open_ledger()  # nothing connects before the first call
    assert led.backend == "postgresql" and led.location.schema == "iris_ledger"
    monkeypatch.setenv("IRIS_LEDGER_URL", "postgresql://u@db/airflow?sslmode=require&schema=mine")
    assert settings().ledger_path.endswith("sslmode=require&schema=mine")


def test_unreachable_postgres_names_the_url_without_the_password():
    # Port 1 on the loopback: nothing listens there, so the refusal is immediate.
    led = FrameLedger("postgresql://bob:s3cret@127.0.0.1:1/test?schema=x")
    with pytest.raises(LedgerConnectionError) as err:
        led.frames()
    text = str(err.value)
    assert "postgresql://bob:***@127.0.0.1:1/test?schema=x" in text
    assert "s3cret" not in text and "refused" in text.lower()
    assert isinstance(err.value.__cause__, psycopg2.OperationalError)


# -- the same behaviours on both backends ---------------------------------------------------------
def test_schema_is_created_once_and_versioned(target: str | Path):
    for _ in range(2):  # a second ledger object on the same database finds the tables
        led = FrameLedger(target)
        assert led.frames() == []
        with led.connect() as conn:
            assert conn.execute(sa.text("SELECT value FROM meta WHERE key = 'schema_version'")) \
                .scalar_one() == str(SCHEMA_VERSION)


def test_first_use_from_many_processes_at_once(target: str | Path):
    # Concurrent CREATE TABLE IF NOT EXISTS can collide in PostgreSQL's catalog; the ledger
    # serializes its first use, so every session just sees the tables.
    assert _together(CONCURRENCY, lambda i: FrameLedger(target).frames()) == [[]] * CONCURRENCY


def test_arrivals_record_take_close(led: FrameLedger):
    first = led.record_arrival("file:///landing/a.fits", 2**33, 1764000000.123456, etag="e1")
    again = led.record_arrival("file:///landing/a.fits", 2**33, 1764000000.123456)
    assert again == first and first["etag"] == "e1" and first["outcome"] is None
    assert isinstance(first["id"], int) and first["size"] == 2**33  # 64-bit sizes survive
    assert isinstance(first["mtime"], float) and first["mtime"] == 1764000000.123456
    assert led.arrival_keys() == {("file:///landing/a.fits", 2**33, 1764000000.123456)}
    assert led.take_arrival(first["id"], "run-1") is True
    assert led.take_arrival(first["id"], "run-2") is False
    assert led.take_arrival(first["id"], "run-1") is True  # a retry of the same task
    led.close_arrival(first["id"], frame_id="abc", outcome="new")
    assert led.take_arrival(first["id"], "run-1") is False
    other = led.record_arrival("file:///landing/b.fits", 5, 2.0, seen_by="trigger")
    assert [a["id"] for a in led.arrivals(open_only=True)] == [other["id"]]
    assert [a["outcome"] for a in led.arrivals()] == ["new", None]


def test_only_one_concurrent_claimer_takes_an_arrival(led: FrameLedger):
    for n in range(3):
        arrival = led.record_arrival(f"s3://landing/{n}.fits", 100, float(n))
        won = _together(CONCURRENCY, lambda i, a=arrival: led.take_arrival(a["id"], f"run-{i}"))
        assert won.count(True) == 1, won
        winner = f"run-{won.index(True)}"
        assert next(a for a in led.arrivals() if a["id"] == arrival["id"])["claimed_by"] == winner


def test_claim_is_idempotent_by_content(led: FrameLedger):
    frame, outcome = _claim(led, "ab" * 32, run_id="r1")
    assert outcome == "new" and frame["frame_id"] == "ab" * 8 and frame["status"] == "claimed"
    again, outcome = _claim(led, "ab" * 32, filename="copy.fits", run_id="r2")
    assert outcome == "duplicate" and again["duplicates"] == 1 and again["run_id"] == "r1"
    led.update_frame(frame["frame_id"], status=FAILED, error="boom")
    retried, outcome = _claim(led, "ab" * 32, run_id="r3")
    assert outcome == "retry" and retried["status"] == "claimed" and retried["error"] is None
    assert led.frame_by_sha("ab" * 32)["run_id"] == "r3"
    with pytest.raises(ValueError, match="unknown frames column"):
        led.update_frame(frame["frame_id"], nonsense=1)
    with pytest.raises(KeyError):
        led.update_frame("0" * 16, status="done")


def test_concurrent_claims_of_the_same_bytes(led: FrameLedger):
    for n in range(3):
        sha = f"{n:02d}" + "cd" * 31
        outcomes = _together(CONCURRENCY, lambda i, s=sha: _claim(led, s, run_id=f"run-{i}")[1])
        assert sorted(outcomes) == ["duplicate"] * (CONCURRENCY - 1) + ["new"]
        assert led.frame_by_sha(sha)["duplicates"] == CONCURRENCY - 1
        # A failed frame arriving again from several runs is retried by exactly one.
        led.update_frame(sha[:16], status=FAILED)
        outcomes = _together(CONCURRENCY, lambda i, s=sha: _claim(led, s, run_id=f"again-{i}")[1])
        assert sorted(outcomes) == ["duplicate"] * (CONCURRENCY - 1) + ["retry"]
    assert len(led.frames()) == 3


def _claim_in_process(target: str, sha: str, arrival_id: int, start: Any, i: int) -> tuple[bool, str]:
    start.wait()
    led = FrameLedger(target)
    took = led.take_arrival(arrival_id, f"proc-{i}")
    return took, _claim(led, sha, run_id=f"proc-{i}")[1]


def test_concurrent_claims_from_separate_processes(target: str | Path):
    led = FrameLedger(target)
    arrival = led.record_arrival("s3://landing/p.fits", 1, 1.0)
    ctx = multiprocessing.get_context("spawn")  # fresh interpreters, as on separate pods
    n = 4
    with ctx.Manager() as manager, concurrent.futures.ProcessPoolExecutor(n, mp_context=ctx) as pool:
        start = manager.Barrier(n)
        futures = [pool.submit(_claim_in_process, str(target), "ef" * 32, arrival["id"], start, i)
                   for i in range(n)]
        results = [f.result(timeout=120) for f in futures]
    assert [took for took, _ in results].count(True) == 1
    assert sorted(outcome for _, outcome in results) == ["duplicate"] * (n - 1) + ["new"]
    assert led.frame_by_sha("ef" * 32)["duplicates"] == n - 1


def test_stages_products_finish_and_overdue(led: FrameLedger):
    landed = dt.datetime.now(dt.UTC) - dt.timedelta(seconds=45)
    frame, _ = _claim(led, "cd" * 32, landed_at=isotime(landed))
    fid = frame["frame_id"]
    led.update_frame(fid, deadline_seconds=30, deadline_at=isotime(landed + dt.timedelta(seconds=30)),
                     status="processing", night="2026-11-20", kind="science")
    assert [f["frame_id"] for f in led.overdue()] == [fid]
    assert led.overdue(run_id="another") == []
    assert led.frame(fid)["deadline_seconds"] == 30.0 and isinstance(led.frame(fid)["deadline_seconds"], float)
    with led.stage(fid, "readout", run_id="r", try_number=2) as detail:
        detail["x"] = 1
    with pytest.raises(RuntimeError), led.stage(fid, "reduce", run_id="r"):
        raise RuntimeError("bad")
    stages = led.stages(fid)
    assert [(s["stage"], s["status"]) for s in stages] == [("readout", "success"), ("reduce", "failed")]
    assert stages[0]["try_number"] == 2 and isinstance(stages[0]["duration_seconds"], float)
    assert json.loads(stages[0]["detail"]) == {"x": 1}
    assert json.loads(stages[1]["detail"])["error"].startswith("RuntimeError")
    assert led.add_product(fid, "cal", key="k1", sha256="1", crds_context="tmt_0001.pmap") == 1
    assert led.add_product(fid, "cal", key="k1", sha256="1", crds_context="tmt_0001.pmap") == 1  # retry
    assert led.add_product(fid, "cal", key="k2", sha256="2", crds_context="tmt_0002.pmap") == 2
    assert led.add_product(fid, "quicklook", path="/w/q.png", size=2**32) == 1  # NULL key and sha
    assert led.add_product(fid, "quicklook", path="/w/q.png", size=2**32) == 1
    current = led.products(fid, current_only=True)
    assert [(p["kind"], p["key"], p["version"], p["current"]) for p in current] == [
        ("cal", "k2", 2, 1), ("quicklook", None, 1, 1)]
    assert [p["current"] for p in led.products(fid)] == [0, 1, 1]
    done = led.finish(fid)
    assert done["status"] == "done" and done["deadline_missed"] == 1 and done["latency_seconds"] >= 45
    assert led.overdue() == []
    assert [f["frame_id"] for f in led.frames(night="2026-11-20", status="done", kind=("science", "dark"))] \
        == [fid]
    assert led.frames(nights=("2026-11-21", "2026-11-30")) == []
    with pytest.raises(KeyError):
        led.finish("0" * 16)


def test_stages_of_a_dead_try_are_abandoned(led: FrameLedger):
    """A killed host never ends its stages: the next try of the run closes them as abandoned
    (other runs' and the same try's stages untouched), and so does the failed run's end."""
    frame, _ = _claim(led, "ce" * 32)
    fid = frame["frame_id"]
    led.update_frame(fid, status="processing", run_id="r")
    led.start_stage(fid, "archive", run_id="r", try_number=1, detail={"host": "iris-h1"})
    led.start_stage(fid, "readout", run_id="r", try_number=1, detail={"host": "iris-h1"})
    led.start_stage(fid, "readout", run_id="other", try_number=1)
    led.start_stage(fid, "archive", run_id="r", try_number=2, detail={"host": "iris-h2"})
    by = {(s["run_id"], s["try_number"], s["stage"]): s for s in led.stages(fid)}
    for stage in ("archive", "readout"):
        dead = by[("r", 1, stage)]
        assert dead["status"] == "abandoned" and dead["ended_at"], dead
        assert json.loads(dead["detail"]) == {"host": "iris-h1", "abandoned": "try 2 started"}
    assert by[("other", 1, "readout")]["status"] == "running"
    assert by[("r", 2, "archive")]["status"] == "running"
    led.close_open_frames(run_id="r", reason="killed")
    by = {(s["run_id"], s["try_number"], s["stage"]): s for s in led.stages(fid)}
    assert by[("r", 2, "archive")]["status"] == "abandoned"
    assert json.loads(by[("r", 2, "archive")]["detail"])["abandoned"] == "the run ended"
    assert by[("other", 1, "readout")]["status"] == "running"
    assert led.frame(fid)["status"] == "failed"


def test_concurrent_products_get_distinct_versions(led: FrameLedger):
    fid = _claim(led, "12" * 32)[0]["frame_id"]
    versions = _together(CONCURRENCY, lambda i: led.add_product(fid, "cal", key=f"k{i}", sha256=str(i)))
    assert sorted(versions) == list(range(1, CONCURRENCY + 1))
    assert len(led.products(fid, current_only=True)) == 1


def test_alerts_calibrations_and_snapshot(led: FrameLedger):
    fid = _claim(led, "34" * 32, run_id="r", dag_id="iris_realtime")[0]["frame_id"]
    aid = led.record_alert("deadline_missed", "late", frame_id=fid, run_id="r", detail={"elapsed": 31.5})
    assert isinstance(aid, int) and led.frame(fid)["deadline_missed"] == 1
    led.record_alert("other", "note")
    led.mark_alert_delivered(aid, "webhook:204")
    (alert,) = led.alerts(frame_id=fid)
    assert alert["delivered"] == "webhook:204" and json.loads(alert["detail"]) == {"elapsed": 31.5}
    assert [a["kind"] for a in led.alerts()] == ["deadline_missed", "other"]
    assert [a["kind"] for a in led.alerts(kind="other")] == ["other"]
    cid = led.record_calibration("2026-11-20", status="published", context="tmt_0002.pmap",
                                 masters=["/m/dark.fits"], qa=[{"passed": True}], run_id="n")
    led.record_calibration("2026-11-21", status="nothing-published")
    (cal,) = led.calibrations("2026-11-20")
    assert cal["id"] == cid and json.loads(cal["masters"]) == ["/m/dark.fits"] and cal["qa"] is not None
    assert len(led.calibrations()) == 2
    snap = led.snapshot(fid)
    assert snap["schema_version"] == SCHEMA_VERSION and snap["ledger"] == str(led.path)
    (frame,) = snap["frames"]
    assert frame["alerts"][0]["id"] == aid and frame["stages"] == [] and frame["products"] == []
    assert led.snapshot("0" * 16)["frames"] == []
    json.dumps(led.snapshot())  # JSON-ready


def _script(led: FrameLedger) -> None:
    """One frame's life, with fixed times, for the backend comparison."""
    t0 = dt.datetime(2026, 11, 24, 7, 0, tzinfo=dt.UTC)
    arr = led.record_arrival("s3://l/a.fits", 320 * 2**20, 1.25, etag="x", seen_at=isotime(t0))
    led.take_arrival(arr["id"], "run")
    fid = _claim(led, "56" * 32, landed_at=isotime(t0), run_id="run")[0]["frame_id"]
    _claim(led, "56" * 32, landed_at=isotime(t0))
    led.close_arrival(arr["id"], frame_id=fid, outcome="new")
    led.update_frame(fid, night="2026-11-23", deadline_seconds=30, deadline_at=isotime(t0), status="processing")
    with led.stage(fid, "readout", try_number=1) as detail:
        detail["n"] = 3
    led.add_product(fid, "cal", key="k", sha256="s", size=7)
    led.add_product(fid, "cal", key="k2", sha256="s2", size=8)
    led.record_alert("deadline_missed", "late", frame_id=fid)
    led.record_calibration("2026-11-23", status="published", masters=["m"], qa={"a": 1.5})
    led.finish(fid, when=t0 + dt.timedelta(seconds=12.5))


_VARYING = {"seen_at", "claimed_at", "updated_at", "started_at", "ended_at", "duration_seconds",
            "created_at"}


def _dump(led: FrameLedger) -> dict[str, list[dict[str, Any]]]:
    out = {}
    with led.connect() as conn:
        for table in ("meta", "arrivals", "frames", "stages", "products", "alerts", "calibrations"):
            # Plain SQL on purpose: the columns as the database has them, not as the code says.
            rows = [dict(r) for r in conn.execute(sa.text(f"SELECT * FROM {table} ORDER BY 1")).mappings()]
            out[table] = [{k: (type(v).__name__ if k in _VARYING else (type(v).__name__, v))
                           for k, v in r.items()} for r in rows]
    return out


def test_both_backends_return_the_same_rows(tmp_path: Path, pg_url: str):
    lite, pg = FrameLedger(tmp_path / "ledger.sqlite"), FrameLedger(pg_url)
    _script(lite)
    _script(pg)
    a, b = _dump(lite), _dump(pg)
    assert list(a["frames"][0]) == list(b["frames"][0])  # same columns in the same order
    assert a == b


# -- the operations plugin's reader ---------------------------------------------------------------
def test_plugin_reads_the_same_night_from_postgres(tmp_path: Path, pg_url: str,
                                                   monkeypatch: pytest.MonkeyPatch):
    from dataclasses import asdict

    from iris_ops.ledger import load_night_from_env

    lite_state, pg_state = tmp_path / "lite", tmp_path / "pg"
    build_night(lite_state)
    build_night(pg_state, ledger=pg_url)
    views = []
    for state, where in ((lite_state, lite_state / "ledger.sqlite"), (pg_state, pg_url)):
        view = load_night(where, None, quarantine_dir=state / "quarantine", work_dir=state / "work")
        assert not view.problem and view.night == NIGHT and len(view.frames) == 5
        views.append(json.loads(json.dumps(asdict(view), default=str).replace(str(state), "<state>")))
    lite, pg = views
    assert pg["source"] == pg_url
    lite.pop("source"), pg.pop("source")
    assert pg == lite
    # As the api-server finds it: from the environment the chart sets.
    monkeypatch.setenv("IRIS_STATE_DIR", str(pg_state))
    monkeypatch.setenv("IRIS_LEDGER_URL", pg_url)
    view = load_night_from_env()
    assert view.source == pg_url and len(view.frames) == 5 and len(view.masters) == 3


def test_plugin_reports_a_missing_or_unreachable_postgres_ledger(pg_url: str, pg_schema: str):
    view = load_night(pg_url)
    assert view.problem.startswith("no ledger yet at") and pg_schema in view.problem
    assert not _schema_exists(pg_schema), "the reader must never create the ledger"
    view = load_night("postgresql://ops:s3cret@127.0.0.1:1/test")
    assert view.problem.startswith("no ledger yet") and "127.0.0.1:1" in view.problem
    assert "s3cret" not in view.problem and "s3cret" not in view.source
    FrameLedger(pg_url).frames()
    view = load_night(pg_url)
    assert not view.problem and view.frames == [] and view.night is None
    # The reader's sessions cannot write, whatever SQL would run in them.
    conn = connect_postgres(parse_location(pg_url), readonly=True)
    try:
        with pytest.raises(psycopg2.errors.ReadOnlySqlTransaction):
            conn.cursor().execute("DELETE FROM frames")
    finally:
        conn.close()


# -- the call sites, unchanged, on the configured ledger -------------------------------------------
def test_landing_and_alerts_use_the_configured_ledger(target: str | Path, tmp_path: Path,
                                                      monkeypatch: pytest.MonkeyPatch):
    from iris_tasks.orchestration import alerts
    from iris_tasks.orchestration.landing import claim_frames

    state, land = tmp_path / "state", tmp_path / "landing"
    land.mkdir()
    monkeypatch.setenv("IRIS_STATE_DIR", str(state))
    monkeypatch.setenv("IRIS_LANDING", str(land))
    monkeypatch.setenv("IRIS_STORE_URL", (tmp_path / "store").as_uri())
    monkeypatch.setenv("IRIS_LEDGER_URL", str(target))
    monkeypatch.delenv("IRIS_LEDGER_SCHEMA", raising=False)
    monkeypatch.delenv("IRIS_ALERT_WEBHOOK", raising=False)
    # Bytes, not whole FITS files: taken as they are (the landing contract has its own tests).
    monkeypatch.setenv("IRIS_LANDING_SETTLE_SECONDS", "0")
    monkeypatch.setenv("IRIS_LANDING_STALE_SECONDS", "0")
    for name, data in (("one.fits", b"frame-one"), ("two.fits", b"frame-two"), ("one-again.fits", b"frame-one")):
        (land / name).write_bytes(data)
    frames = claim_frames(run_id="run-1")
    assert len(frames) == 2 and not list(land.iterdir())
    led = open_ledger()
    assert led.backend == parse_location(target).backend
    assert sorted(a["outcome"] for a in led.arrivals()) == ["duplicate", "new", "new"]
    assert sum(f["duplicates"] for f in led.frames()) == 1
    landed = dt.datetime.now(dt.UTC) - dt.timedelta(seconds=90)
    fid = frames[0].frame_id
    led.update_frame(fid, status="processing", landed_at=isotime(landed), deadline_seconds=60.0,
                     deadline_at=isotime(landed + dt.timedelta(seconds=60)))
    assert [a["frame_id"] for a in alerts.check_overdue(run_id="run-1")] == [fid]
    assert led.frame(fid)["deadline_missed"] == 1
    if led.backend == "postgresql":
        assert not (state / "ledger.sqlite").exists()
