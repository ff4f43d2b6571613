"""The operations plugin (plugins/iris_ops): the FastAPI app on a hand-made ledger night, the
ledger reader, auth inside Airflow, and registration through Airflow's plugin manager."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

pytest.importorskip("fastapi")
# test_plugin_support puts plugins/ on sys.path (as Airflow does): import it first.
from test_plugin_support import NIGHT, PLUGINS, ROOT, build_night  # noqa: E402, I001  # isort: skip
from fastapi.testclient import TestClient  # noqa: E402
from iris_ops.app import create_app, task_instance_url  # noqa: E402
from iris_ops.ledger import breakdown, landing_night, load_night  # noqa: E402
from iris_ops.views import NightView, percentile  # noqa: E402

from iris_tasks.storage import LocalStore  # noqa: E402


@pytest.fixture
def state(tmp_path: Path) -> Path:
    build_night(tmp_path)
    store = LocalStore(tmp_path / "store")
    src = tmp_path / "obj.fits"
    src.write_bytes(b"SIMPLE  =                    T")
    store.put_file(src, f"products/{NIGHT}/IMG1/IMG1-SCI/iris_0001_cal.fits")
    return tmp_path


@pytest.fixture
def client(state: Path) -> TestClient:
    app = create_app(
        lambda night, query: load_night(state / "ledger.sqlite", night, quarantine_dir=state / "quarantine",
                                        work_dir=state / "work", query=query),
        airflow_base_url="",
        require_auth=False,
        allowed_roots=[state],
        open_store=lambda: LocalStore(state / "store"),
    )
    return TestClient(app)


def test_ledger_reader_builds_the_night(state: Path):
    view = load_night(state / "ledger.sqlite", None, quarantine_dir=state / "quarantine",
                      work_dir=state / "work")
    assert view.night == NIGHT and view.nights == [NIGHT]
    assert len(view.frames) == 5
    groups = {(d, o): len(rows) for d, o, rows in view.groups()}
    assert groups == {("IFS", "LEN-SCI"): 1, ("IMG1", "IMG1-SCI"): 3, ("IMG2", "IMG1-DRK"): 1}
    done = [f for f in view.frames if f.status == "done"]
    assert len(done) == 3
    missed = [f for f in view.frames if f.deadline_missed]
    assert [f.filename for f in missed] == ["iris_0002_raw.fits"]
    f1 = next(f for f in view.frames if f.filename == "iris_0001_raw.fits")
    assert f1.breakdown == {"sensing": 0.5, "queueing": 2.5, "compute": 5.0, "ingest": 1.0}
    assert sum(f1.breakdown.values()) == pytest.approx(f1.latency_s)
    assert f1.ql_raw is None and f1.raw_path.endswith("iris_0001_raw.fits")  # rendered on demand
    assert f1.ql_reduced.endswith("_ql.png")
    assert f1.raw_key.startswith("raw/")
    assert [k.rsplit("_", 1)[1] for k in f1.product_keys] == ["rate.fits", "cal.fits"]
    assert (f1.task_id, f1.map_index) == ("frame", 0)
    (q,) = view.quarantine
    assert q.reason == "invalid IRIS metadata" and q.detail == "OBSNAME: missing keyword"
    assert q.location.endswith(q.frame_id)
    unreported, good, bad = sorted(view.masters, key=lambda m: m.name)
    assert good.qa_passed is True and good.qa["median_ratio"] == pytest.approx(1.0021)
    assert good.status == "published" and good.detector == "IMG1" and good.n_inputs == 3
    assert (good.task_id, good.mapped, good.run_id) == ("qa", True, "manual__2026-11-24")
    assert bad.qa_passed is False and bad.status == "rejected" and bad.failed == ["median_ratio"]
    assert unreported.status == "QA failed or pending" and unreported.qa_passed is False
    s = view.summary()
    assert s["frames"] == 5 and s["deadline_misses"] == 1 and s["quarantined"] == 1
    assert s["latency_p50_s"] == pytest.approx(9.0)


def test_missing_ledger_is_reported_not_created(tmp_path: Path):
    view = load_night(tmp_path / "nope.sqlite")
    assert "no ledger" in view.problem
    assert not (tmp_path / "nope.sqlite").exists()


def test_night_page_html(client: TestClient):
    r = client.get("/", headers={"accept": "text/html"})
    assert r.status_code == 200
    html = r.text
    assert f'<span id="night">{NIGHT}</span>' in html
    # The timeline: newest landing first.
    rows = [html[i:i + 200] for i in range(len(html)) if html.startswith('<tr class="frame"', i)]
    assert [r.split('data-landed="', 1)[1][:23] for r in rows] == sorted(
        (r.split('data-landed="', 1)[1][:23] for r in rows), reverse=True)
    assert len(rows) == 5 and 'id="timeline"' in html
    groups = client.get("/", params={"view": "groups"}).text
    assert groups.count('class="frame"') == 5
    assert 'data-detector="IMG1" data-obsname="IMG1-SCI"' in groups
    assert 'id="masters"' in html and "iris_img1_dark_0002.fits" in html
    assert 'id="quarantine"' in html and "invalid IRIS metadata" in html
    # Task-log links open the Airflow UI task-instance page outside the iframe.
    assert 'target="_top" href="/dags/iris_realtime/runs/rt__1/tasks/frame/mapped/0"' in html
    assert 'href="object?key=raw/2026-11-23/IMG1/IMG1-SCI/iris_0001_raw.fits"' in html
    assert 'href="/dags/iris_nightly_calibrations/runs/manual__2026-11-24/tasks/qa/mapped"' in html
    # Updated in place every 15 s by the script (a plain refresh without JavaScript).
    assert '<noscript><meta http-equiv="refresh" content="15"></noscript>' in html
    assert "setInterval(update, every)" in html
    off = client.get("/?refresh=0").text
    assert off.count("http-equiv") == 0 and "setInterval" not in off


def test_night_json(client: TestClient):
    data = client.get("/api/night", params={"night": NIGHT}).json()
    assert data["night"] == NIGHT
    assert data["summary"]["frames"] == 5
    assert data["summary"]["by_status"] == {"done": 3, "processing": 1, "quarantined": 1}
    assert {f["filename"] for f in data["frames"]} >= {"iris_0001_raw.fits"}
    assert data["quarantine"][0]["reason"] == "invalid IRIS metadata"
    assert client.get("/api/night", params={"night": "bad"}).status_code == 422
    assert client.get("/api/night", params={"night": "2026-01-01"}).json()["frames"] == []


def test_quicklooks_and_objects(client: TestClient, state: Path):
    data = client.get("/api/night").json()
    fid = next(f["frame_id"] for f in data["frames"] if f["filename"] == "iris_0001_raw.fits")
    for kind in ("raw", "reduced"):
        r = client.get(f"/ql/{fid}/{kind}")
        assert r.status_code == 200 and r.headers["content-type"] == "image/png"
        assert r.content.startswith(b"\x89PNG")
    assert client.get(f"/ql/{fid}/other").status_code == 404
    assert client.get("/ql/0000000000000000/raw").status_code == 404
    r = client.get("/ql-master/iris_img1_dark_0002.fits")
    assert r.status_code == 200 and r.content.startswith(b"\x89PNG")
    assert (state / "ops_cache" / f"{fid}_raw.png").is_file()  # raw preview rendered once
    key = f"products/{NIGHT}/IMG1/IMG1-SCI/iris_0001_cal.fits"
    r = client.get("/object", params={"key": key})
    assert r.status_code == 200 and r.content.startswith(b"SIMPLE")
    assert client.get("/object", params={"key": "../../etc/passwd"}).status_code == 400
    assert client.get("/object", params={"key": "products/none.fits"}).status_code == 404


def test_quicklook_outside_allowed_roots_is_refused(state: Path, tmp_path_factory):
    other = tmp_path_factory.mktemp("elsewhere") / "x.png"
    other.write_bytes(b"\x89PNG")
    view = load_night(state / "ledger.sqlite")
    view.frames[0].ql_raw = str(other)
    app = create_app(lambda n, q: view, airflow_base_url="", require_auth=False, allowed_roots=[state])
    assert TestClient(app).get(f"/ql/{view.frames[0].frame_id}/raw").status_code == 403


def test_html_is_escaped(state: Path):
    view = load_night(state / "ledger.sqlite")
    view.frames[0].filename = "<script>alert(1)</script>.fits"
    view.quarantine[0].detail = '"><img src=x onerror=alert(1)>'
    app = create_app(lambda n, q: view, airflow_base_url="", require_auth=False)
    html = TestClient(app).get("/", params={"view": "groups"}).text
    assert "<script>alert(1)" not in html and "&lt;script&gt;" in html
    assert "<img src=x" not in html


def test_broken_ledger_still_renders(tmp_path: Path):
    (tmp_path / "ledger.sqlite").write_bytes(b"not a database")
    app = create_app(lambda n, q: load_night(tmp_path / "ledger.sqlite", n, query=q), require_auth=False,
                     airflow_base_url="")
    r = TestClient(app).get("/")
    assert r.status_code == 200 and "could not read the ledger" in r.text


def test_routes_require_airflow_auth(state: Path):
    app = create_app(lambda n, q: load_night(state / "ledger.sqlite", n, query=q), airflow_base_url="",
                     require_auth=True)
    c = TestClient(app)
    assert c.get("/api/night").status_code == 401
    assert c.get("/api/health").status_code == 401
    assert c.get("/ql/x/raw").status_code == 401
    r = c.get("/", headers={"accept": "text/html"}, follow_redirects=False)
    assert r.status_code in (401, 303)


def test_helpers():
    assert percentile([], 50) is None
    assert percentile([1.0, 2.0, 3.0, 4.0], 50) == 2.5
    assert percentile([float(i) for i in range(1, 21)], 95) == pytest.approx(19.05)
    assert task_instance_url("", "d", "manual__2026-11-24T00:00:00+00:00", "t", None) == (
        "/dags/d/runs/manual__2026-11-24T00%3A00%3A00%2B00%3A00/tasks/t")
    assert breakdown({"latency_seconds": None}, [], None) == {}
    assert NightView(night=None).summary()["latency_p95_s"] is None


def test_plugin_registers_with_airflow(tmp_path: Path):
    """Airflow's own plugin manager loads plugins/ (the iris_ops package is .airflowignored)."""
    env = {**os.environ, "AIRFLOW_HOME": str(tmp_path), "AIRFLOW__CORE__PLUGINS_FOLDER": str(PLUGINS),
           "AIRFLOW__CORE__LOAD_EXAMPLES": "False",
           "AIRFLOW__DATABASE__SQL_ALCHEMY_CONN": f"sqlite:///{tmp_path / 'a.db'}"}
    proc = subprocess.run([sys.executable, "-m", "airflow", "plugins", "--output", "json"],
                          env=env, capture_output=True, text=True, timeout=120, cwd=ROOT)
    assert proc.returncode == 0, proc.stderr[-2000:]
    plugins = {p["name"]: p for p in json.loads(proc.stdout[proc.stdout.index("["):])}
    ours = plugins["iris_ops"]
    assert ours["fastapi_apps"][0]["url_prefix"] == "/iris-ops"
    view = ours["external_views"][0]
    assert view["href"] == "iris-ops/" and view["url_route"] == "iris-night"
    assert set(plugins) & {"app", "views", "ledger"} == set()


def test_plugin_module_mounts_lazily(state: Path, monkeypatch):
    """The plugin's ASGI app builds the page app on first request, behind Airflow auth."""
    import importlib

    from fastapi import FastAPI

    monkeypatch.setenv("IRIS_STATE_DIR", str(state))
    mod = importlib.import_module("iris_ops_plugin")
    spec = mod.IrisOpsPlugin.fastapi_apps[0]
    assert spec["url_prefix"] == "/iris-ops"
    parent = FastAPI()
    parent.mount(spec["url_prefix"], mod._LazyApp())
    c = TestClient(parent)
    assert c.get("/iris-ops/api/night").status_code == 401  # no Airflow session
    (view,) = mod.IrisOpsPlugin.external_views
    assert view["href"] == "iris-ops/" and view["nav_top_level"] is True


def test_page_lists_what_the_landing_area_ignores_and_reads_the_new_quarantine_format(tmp_path):
    from iris_tasks.orchestration.ledger import FrameLedger, isotime

    led = FrameLedger(tmp_path / "ledger.sqlite")
    led.note_ignored([("file:///landing/f.fits.gz", "f.fits.gz", 12, "compressed frame")],
                     scope="file:///landing/")
    frame, _ = led.claim(sha256="ab" * 32, filename="bad.fits", source_uri="file:///b",
                         landed_at=isotime())
    led.update_frame(frame["frame_id"], status="quarantined", night=NIGHT,
                     error="quarantined (truncated raw file): file: HDU 1 (SCI) is cut off")
    # Quarantined: listed under the night it landed in (tonight), not the header's.
    assert load_night(tmp_path / "ledger.sqlite", NIGHT).quarantine == []
    view = load_night(tmp_path / "ledger.sqlite")
    assert view.night == landing_night(frame["landed_at"]) != NIGHT
    assert [(i.name, i.reason) for i in view.ignored] == [("f.fits.gz", "compressed frame")]
    assert view.summary()["ignored_in_landing"] == 1
    (q,) = view.quarantine
    assert (q.reason, q.detail) == ("truncated raw file", "file: HDU 1 (SCI) is cut off")
    assert q.header_night == NIGHT
    app = create_app(lambda night, query: view, airflow_base_url="", require_auth=False,
                     allowed_roots=[tmp_path], open_store=lambda: LocalStore(tmp_path / "store"))
    html = TestClient(app).get("/").text
    assert 'id="ignored"' in html and "f.fits.gz" in html and "compressed frame" in html


def _states() -> list:
    from iris_ops.views import NightState

    return [NightState(night="2026-11-23", context="tmt_0003.pmap", frames=4, current=1,
                       stale_frames=2, unknown=1, contexts={"tmt_0002.pmap": 3}, stale=True),
            NightState(night="2026-11-22", context="tmt_0003.pmap", frames=2, unchanged=2,
                       contexts={"tmt_0001.pmap": 2}, stale=False)]


def test_stale_nights_on_the_page_and_over_rest(state: Path):
    """The nights table (operational context, stale counts, what reprocesses them) and
    GET /api/nights[?stale=true]; a loader that fails says so and the page still renders."""
    app = create_app(lambda n, q: load_night(state / "ledger.sqlite", n, query=q), airflow_base_url="/ui",
                     require_auth=False, allowed_roots=[state], load_night_states=_states)
    client = TestClient(app)
    html = client.get("/").text
    assert 'id="night-states"' in html and "tmt_0003.pmap" in html
    assert "1 stale night(s)" in html and 'href="/ui/dags/iris_reprocess"' in html
    assert 'class="stale" data-night="2026-11-23"' in html and 'class="current" data-night="2026-11-22"' in html
    assert "tmt_0002.pmap (3)" in html
    every = client.get("/api/nights").json()
    assert [n["night"] for n in every] == ["2026-11-23", "2026-11-22"]
    assert every[0]["stale_frames"] == 2 and every[0]["unknown"] == 1
    assert [n["night"] for n in client.get("/api/nights", params={"stale": "true"}).json()] == ["2026-11-23"]
    assert client.get("/api/night").json()["night_states"][0]["stale"] is True

    def broken() -> list:
        raise RuntimeError("CRDS cache /x has no operational context")

    app = create_app(lambda n, q: load_night(state / "ledger.sqlite", n, query=q), airflow_base_url="",
                     require_auth=False, allowed_roots=[state], load_night_states=broken)
    client = TestClient(app)
    html = client.get("/").text
    assert "stale nights not known yet: CRDS cache /x has no operational context" in html
    r = client.get("/api/nights")
    assert r.status_code == 503 and "no operational context" in r.json()["detail"]


def test_stale_nights_are_computed_once_per_context_and_ttl():
    from iris_ops.nights import CachedNightStates

    calls, context = [], ["tmt_0003.pmap"]

    def load():
        calls.append(context[0])
        return context[0], _states()

    cached = CachedNightStates(load, current_context=lambda: context[0], ttl=3600)
    assert cached() == _states() and cached() == _states()
    assert calls == ["tmt_0003.pmap"]  # the page's refreshes do not recompute
    context[0] = "tmt_0004.pmap"  # a new context was published: recomputed at once
    cached()
    assert calls == ["tmt_0003.pmap", "tmt_0004.pmap"]
    expired = CachedNightStates(load, current_context=lambda: context[0], ttl=0)
    expired(), expired()
    assert len(calls) == 4
