"""The operations page in a real browser: headless Chromium loads it from a server on
127.0.0.1, takes a screenshot and dumps the DOM after the quicklook images have loaded.

Needs Debian's chromium (CI runs as root: ``apt-get install -y chromium``); skipped with that
hint when no Chromium binary is on PATH.
"""

from __future__ import annotations

import contextlib
import ctypes
import datetime as dt
import os
import re
import shutil
import signal
import socket
import subprocess
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from test_plugin_support import NIGHT, build_night, write_raw  # isort: skip

CHROMIUM = next((shutil.which(n) for n in ("chromium", "chromium-browser", "google-chrome")
                 if shutil.which(n)), None)
pytestmark = pytest.mark.skipif(
    CHROMIUM is None,
    reason="chromium not installed (as root: apt-get update && apt-get install -y chromium)",
)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@contextlib.contextmanager
def serve(app, port: int, on_start=None) -> Iterator[str]:
    """uvicorn in a thread of this process (nothing to orphan), bound to loopback only;
    ``on_start(server)`` is called once it listens."""
    import uvicorn

    server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=port, log_level="warning",
                                           lifespan="off"))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    deadline = time.monotonic() + 20
    while not server.started:
        if time.monotonic() > deadline or not thread.is_alive():
            raise RuntimeError("uvicorn did not start")
        time.sleep(0.05)
    if on_start is not None:
        on_start(server)
    try:
        yield f"http://127.0.0.1:{port}"
    finally:
        server.should_exit = True
        thread.join(10)


def chromium(args: list[str], profile: Path, timeout: float = 90) -> subprocess.CompletedProcess:
    """Run headless Chromium in its own process group and make sure nothing of it survives."""
    cmd = [CHROMIUM, "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic",
           "--no-first-run", "--disable-background-networking", "--disable-component-update",
           "--disable-sync", "--disable-dev-shm-usage", "--hide-scrollbars",
           "--disable-crash-reporter", "--disable-breakpad", "--no-zygote",
           f"--user-data-dir={profile}", "--window-size=1400,2400", *args]
    _set_subreaper(True)  # Chromium's helpers outlive it briefly: they must become ours to reap
    try:
        proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                start_new_session=True, env={**os.environ, "HOME": str(profile)})
        try:
            out, err = proc.communicate(timeout=timeout)
        finally:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(proc.pid, signal.SIGKILL)  # zygote, crashpad & co. share the group
            proc.wait()
            _reap_children()
    finally:
        _set_subreaper(False)
    return subprocess.CompletedProcess(cmd, proc.returncode, out.decode(errors="replace"),
                                       err.decode(errors="replace"))


def visible_text(dom: str) -> str:
    """The visible text of a DOM dump, one space between words."""
    return re.sub(r"\s+", " ", re.sub(r"<[^>]+>", " ", dom))


def _set_subreaper(on: bool) -> None:
    with contextlib.suppress(OSError, AttributeError):
        ctypes.CDLL(None, use_errno=True).prctl(36, int(on), 0, 0, 0)  # PR_SET_CHILD_SUBREAPER


def _reap_children(timeout: float = 10.0) -> None:
    """Reap Chromium's helpers re-parented to us (crashpad handlers run in sessions of their
    own, so the group kill misses them; they exit by themselves once Chromium is gone)."""
    import psutil

    me = psutil.Process()
    deadline = time.monotonic() + timeout
    while True:
        try:
            pid, _ = os.waitpid(-1, os.WNOHANG)
        except ChildProcessError:
            return
        if pid:
            continue
        left = [c for c in me.children() if "chrom" in c.name().lower()]
        if not left:
            return
        if time.monotonic() > deadline:
            for c in left:
                with contextlib.suppress(psutil.Error):
                    c.kill()
            deadline = time.monotonic() + timeout
        time.sleep(0.05)


EXTRA = 50  # frames landed before the fixture's five: the timeline has two pages


@pytest.fixture
def state(tmp_path: Path) -> Path:
    """The fixture night, busier (55 frames), and a landing area holding a frame not claimed
    yet and a compressed file the DRS ignores."""
    from iris_tasks.orchestration.ledger import isotime

    state = tmp_path / "state"
    led = build_night(state)
    first = dt.datetime.fromisoformat(led.frames(night=NIGHT)[0]["landed_at"])
    for i in range(EXTRA):
        landed = first - dt.timedelta(seconds=30 * (EXTRA - i))
        row, _ = led.claim(sha256=f"{i:04d}".ljust(64, "c"), filename=f"iris_early_{i:03d}.fits",
                           source_uri="/landing/x", landed_at=isotime(landed))
        led.update_frame(row["frame_id"], night=NIGHT, detector="IFS" if i % 2 else "IMG1",
                         obsname="LEN-SCI" if i % 2 else "IMG1-SCI", deadline_seconds=30.0)
        led.finish(row["frame_id"], when=landed + dt.timedelta(seconds=6 + i % 5))
    landing = state / "landing"
    raw = write_raw(landing / "iris_0099_raw.fits", seed=99)
    os.utime(raw, (raw.stat().st_atime - 30, raw.stat().st_mtime - 30))
    (landing / "iris_0098_raw.fits.gz").write_bytes(b"compressed")
    return state


def night_app(state: Path, loader=None):
    from iris_ops import health
    from iris_ops.app import create_app
    from iris_ops.landing import look
    from iris_ops.ledger import load_night

    from iris_tasks.storage import LocalStore

    def load(night, query):
        return load_night(state / "ledger.sqlite", night, quarantine_dir=state / "quarantine",
                          work_dir=state / "work", query=query)

    return create_app(
        loader or load, airflow_base_url="", require_auth=False, allowed_roots=[state],
        open_store=lambda: LocalStore(state / "store"), look_at_landing=lambda: look(str(state / "landing")),
        checks={"compute": lambda: health.compute_server(None)},
    )


def test_timeline_in_headless_chromium(state: Path, tmp_path: Path):
    with serve(night_app(state), _free_port()) as base:
        page_url = f"{base}/?refresh=0"
        shot = tmp_path / "night.png"
        r = chromium([f"--screenshot={shot}", "--virtual-time-budget=5000", page_url], tmp_path / "p1")
        assert shot.is_file(), r.stderr[-2000:]
        data = shot.read_bytes()
        assert data.startswith(b"\x89PNG") and len(data) > 20_000  # a real page, not a blank one
        keep = os.environ.get("IRIS_SCREENSHOT_DIR")
        if keep:  # for looking at it: IRIS_SCREENSHOT_DIR=/tmp pytest tests/test_plugin_browser.py
            shutil.copy(shot, Path(keep) / "iris_night.png")
        dom = chromium(["--dump-dom", "--virtual-time-budget=5000", page_url], tmp_path / "p2").stdout
    assert f'<span id="night">{NIGHT}</span>' in dom
    # Newest first: the fixture's five on top (the last one quarantined), 50 rows a page.
    rows = re.findall(r'<tr class="frame" id="frame-\w+" data-status="(\w+)" data-landed="([^"]+)"', dom)
    assert len(rows) == 50 and [landed for _, landed in rows] == sorted((x for _, x in rows), reverse=True)
    assert rows[0][0] == "quarantined" and "page 1 of 2" in dom
    assert dom.count('class="quarantined"') == 1 and 'id="masters"' in dom
    # The landing area: the frame not claimed yet, the compressed file and why.
    assert re.search(r'<tr class="waiting" data-state="ready"><td[^>]*>iris_0099_raw.fits', dom)
    assert "iris_0098_raw.fits.gz" in dom and "compressed frame" in dom
    # Every quicklook <img> was fetched and decoded by the browser (onload ran).
    n_img = dom.count('class="ql"')
    assert n_img == 11  # 3 done x (raw, reduced) + quarantined raw + 1 processing raw + 3 masters
    assert dom.count('data-loaded="1"') == n_img


def test_page_updates_itself_in_place(state: Path, tmp_path: Path):
    """With ?refresh=1 the script fetches the page again and swaps the live part: a frame that
    lands after the first load appears without a reload."""
    from iris_ops.ledger import load_night

    from iris_tasks.orchestration.ledger import FrameLedger, isotime

    calls = []

    def load(night, query):
        calls.append(night)
        if len(calls) == 2:  # the first update: a new frame has landed meanwhile
            led = FrameLedger(state / "ledger.sqlite")
            newest = max(f["landed_at"] for f in led.frames(night=NIGHT))
            row, _ = led.claim(sha256="f" * 64, filename="iris_late_raw.fits", source_uri="/landing/late",
                               landed_at=isotime(dt.datetime.fromisoformat(newest) + dt.timedelta(seconds=5)))
            led.update_frame(row["frame_id"], night=NIGHT, detector="IMG1", obsname="IMG1-SCI",
                             status="processing")
        return load_night(state / "ledger.sqlite", night, quarantine_dir=state / "quarantine",
                          work_dir=state / "work", query=query)

    with serve(night_app(state, load), _free_port()) as base:
        dom = chromium(["--dump-dom", "--virtual-time-budget=4000", f"{base}/?refresh=1"],
                       tmp_path / "p").stdout
    assert len(calls) >= 2, calls
    first_row = re.search(r'<tr class="frame"[^>]*>.*?</tr>', dom, re.DOTALL).group(0)
    assert "iris_late_raw.fits" in first_row
    assert 'id="lost" role="alert"></div>' in dom  # no lost-contact warning


def test_page_says_when_the_api_server_stops_answering(state: Path, tmp_path: Path):
    """The api-server goes away after the first load: the page does not keep showing what it
    last knew as current, it says in red since when it has had no update."""
    from iris_ops.ledger import load_night

    servers = []

    def load(night, query):
        view = load_night(state / "ledger.sqlite", night, query=query)
        servers[0].should_exit = True  # this answer is the server's last
        return view

    with serve(night_app(state, load), _free_port(), on_start=servers.append) as base:
        dom = chromium(["--dump-dom", "--virtual-time-budget=4000", f"{base}/?refresh=1"],
                       tmp_path / "p").stdout
    lost = re.search(r'<div id="lost" role="alert" class="on">([^<]*)</div>', dom)
    assert lost and "No update from the api-server since" in lost.group(1), dom[:3000]
    assert 'class="frame"' in dom  # what it knew stays on the page, marked as stale


# -- inside a live Airflow ------------------------------------------------------------------
APPROVAL_DAG = "iris_ops_browser_approval"
# A DAG asking the question iris_nightly_calibrations asks (the same request, built by
# approval.approval_request from QA reports of the fixture night's masters), without building
# masters first: what the page reads is Airflow's pending request, whoever parked it.
_DAG_FILE = '''
import datetime as dt
import os
from pathlib import Path

from airflow.providers.standard.operators.hitl import HITLOperator
from airflow.sdk import DAG

from iris_tasks.orchestration.approval import approval_request

NIGHT = "{night}"
masters = Path(os.environ["IRIS_STATE_DIR"]) / "work" / "nightly" / NIGHT / "masters"
names = ["iris_img1_dark_0002.fits", "iris_ifs_flat_0002.fits"]
reports = [{{"master": str(masters / n), "reftype": "dark", "previous": "/crds/tmt_iris_dark_0001.fits",
            "passed": True, "metrics": {{"median_shift": 0.21, "residual_rms": 1.07}},
            "thresholds": {{"median_shift": [None, 1.0], "residual_rms": [None, 3.0]}}, "failed": []}}
           for n in names]
request = approval_request(reports, [str(masters / n) for n in names], NIGHT,
                           current_context="tmt_0001.pmap", base_url=os.environ["AIRFLOW__API__BASE_URL"])
with DAG("{dag_id}", schedule=None, start_date=dt.datetime(2026, 1, 1), catchup=False):
    HITLOperator(task_id="approve", subject=request["subject"], body=request["body"],
                 options=request["options"], defaults=request["defaults"], multiple=True)
'''


def _dom(url: str, tmp_path: Path, name: str) -> str:
    return chromium(["--dump-dom", "--virtual-time-budget=8000", url], tmp_path / name).stdout


def screenshot(url: str, tmp_path: Path, name: str, size: str = "1400,1600",
               budget_ms: int = 8000) -> Path:
    """A PNG of ``url`` (a real page, not a blank one), kept as ``iris_<name>.png`` in
    ``$IRIS_SCREENSHOT_DIR`` when that is set (to look at it)."""
    shot = tmp_path / f"{name}.png"
    r = chromium([f"--screenshot={shot}", f"--window-size={size}",
                  f"--virtual-time-budget={budget_ms}", url], tmp_path / f"p-{name}")
    assert shot.is_file() and shot.stat().st_size > 20_000, r.stderr[-2000:]
    keep = os.environ.get("IRIS_SCREENSHOT_DIR")
    if keep:
        shutil.copy(shot, Path(keep) / f"iris_{name}.png")
    return shot


@pytest.mark.slow
@pytest.mark.services
def test_night_page_in_live_airflow_pending_approval_and_dead_scheduler(tmp_path: Path, migrated_db: Path):
    """The plugin in a real api-server (Airflow's auth, its metadata DB): a request parked by
    a real scheduler shows on the page with its QA; killing the scheduler turns the banner
    red while the approval stays listed; the page also renders inside the Airflow UI."""
    import subprocess
    import sys

    from live_airflow import AirflowAPI, airflow_test_env, running, wait_for

    env = airflow_test_env(tmp_path, migrated_db, api_port=_free_port(),
                           executor="LocalExecutor")
    state = Path(env["IRIS_STATE_DIR"])
    build_night(state)
    (state / "store").mkdir(exist_ok=True)
    (state / "landing").mkdir(exist_ok=True)
    dags = tmp_path / "dags"
    dags.mkdir()
    (dags / f"{APPROVAL_DAG}.py").write_text(_DAG_FILE.format(night=NIGHT, dag_id=APPROVAL_DAG))
    env.update({
        "AIRFLOW__CORE__DAGS_FOLDER": str(dags),
        "IRIS_COMPUTE_SOCKET": "off",  # no compute server in this stack: the banner says "off"
        # A dead scheduler shows within seconds (default: 30 s without a heartbeat).
        "AIRFLOW__SCHEDULER__SCHEDULER_HEARTBEAT_SEC": "2",
        "AIRFLOW__SCHEDULER__SCHEDULER_HEALTH_CHECK_THRESHOLD": "8",
    })
    base = f"http://127.0.0.1:{env['AIRFLOW__API__PORT']}"
    page = f"{base}/iris-ops/?refresh=0"
    with open(tmp_path / "scheduler.log", "w") as log, running(
            env, tmp_path, components=(("api-server",), ("dag-processor",), ("triggerer", "--skip-serve-logs"))) as logs:
        scheduler = subprocess.Popen([sys.executable, "-m", "airflow", "scheduler", "--skip-serve-logs"],
                                     env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
        logs["scheduler"] = tmp_path / "scheduler.log"
        try:
            api = AirflowAPI(env)  # every user is admin in this stack: a token without login
            wait_for(lambda: api.dag_registered(APPROVAL_DAG), 180, "the DAG registered", logs)
            api.unpause(APPROVAL_DAG)
            run_id = api.trigger(APPROVAL_DAG)
            wait_for(lambda: api.pending_actions(APPROVAL_DAG, run_id), 180, "the approval request", logs)

            def health() -> dict:
                return api.request("GET", "/api/health", prefix="/iris-ops")

            def states() -> dict:
                return {c["name"]: c["state"] for c in health()["components"]}

            alive = wait_for(lambda: (s := states()) and s.get("triggerer") == "ok" and s, 90,
                             "the triggerer's heartbeat", logs)
            assert alive["scheduler"] == "ok" and alive["compute"] == "off", alive
            data = api.request("GET", "/api/night", prefix="/iris-ops")
            (approval,) = data["approvals"]
            assert (approval["dag_id"], approval["run_id"], approval["night"]) == (APPROVAL_DAG, run_id, NIGHT)
            assert approval["masters"] == ["iris_img1_dark_0002.fits", "iris_ifs_flat_0002.fits"]

            # The browser, logged in by Airflow's own login redirect (all admins).
            dom = _dom(page, tmp_path, "d1")
            assert 'id="approvals"' in dom and "Answer in Airflow" in dom, dom[-3000:]
            assert "<td>median_shift</td>" in dom and f"/dags/{APPROVAL_DAG}/runs/" in dom
            screenshot(page, tmp_path, "approval_pending")

            os.killpg(scheduler.pid, signal.SIGKILL)
            scheduler.wait(30)
            dead = wait_for(lambda: (s := states()) and s.get("scheduler") == "bad" and s, 60,
                            "the page to see the scheduler dead", logs)
            assert dead["triggerer"] == "ok", dead
            dom = _dom(page, tmp_path, "d2")
            assert 'data-state="bad"' in dom and "ATTENTION: scheduler" in dom, dom[-3000:]
            assert 'class="chip bad" data-component="scheduler"' in dom
            assert 'id="approvals"' in dom  # still waiting for an answer
            screenshot(page, tmp_path, "scheduler_dead")
            # The same page inside the Airflow UI (external view, an iframe).
            screenshot(f"{base}/plugin/iris-night", tmp_path, "in_airflow_ui", "1400,1000")
            api.close()
        finally:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(scheduler.pid, signal.SIGKILL)
            scheduler.wait(30)
