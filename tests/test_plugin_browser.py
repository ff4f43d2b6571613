"""The operations page in a real browser: headless Chromium loads it from a server on
127.0.0.1, takes a screenshot and dumps the DOM after the quicklook images have loaded.

Needs Debian's chromium (CI runs as root: ``apt-get install -y chromium``); skipped with that
hint when no Chromium binary is on PATH.
"""

from __future__ import annotations

import contextlib
import ctypes
import os
import shutil
import signal
import socket
import subprocess
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from test_plugin_support import NIGHT, build_night  # isort: skip

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
def serve(app, port: int) -> Iterator[str]:
    """uvicorn in a thread of this process (nothing to orphan), bound to loopback only."""
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


@pytest.fixture
def page_url(tmp_path: Path) -> Iterator[str]:
    from iris_ops.app import create_app
    from iris_ops.ledger import load_night

    from iris_tasks.storage import LocalStore

    state = tmp_path / "state"
    build_night(state)
    app = create_app(
        lambda night, query: load_night(state / "ledger.sqlite", night, quarantine_dir=state / "quarantine",
                                        work_dir=state / "work", query=query),
        airflow_base_url="", require_auth=False, allowed_roots=[state],
        open_store=lambda: LocalStore(state / "store"),
    )
    with serve(app, _free_port()) as base:
        yield f"{base}/?refresh=0"


def test_page_in_headless_chromium(page_url: str, tmp_path: Path):
    shot = tmp_path / "night.png"
    r = chromium([f"--screenshot={shot}", "--virtual-time-budget=5000", page_url], tmp_path / "p1")
    assert shot.is_file(), r.stderr[-2000:]
    data = shot.read_bytes()
    assert data.startswith(b"\x89PNG") and len(data) > 20_000  # a real page, not a blank one
    keep = os.environ.get("IRIS_SCREENSHOT_DIR")
    if keep:  # for looking at it: IRIS_SCREENSHOT_DIR=/tmp pytest tests/test_plugin_browser.py
        shutil.copy(shot, Path(keep) / "iris_night.png")

    r = chromium(["--dump-dom", "--virtual-time-budget=5000", page_url], tmp_path / "p2")
    dom = r.stdout
    assert f'<span id="night">{NIGHT}</span>' in dom, r.stderr[-2000:]
    assert dom.count('class="frame"') == 5
    assert dom.count('class="quarantined"') == 1
    assert 'id="masters"' in dom
    # Every quicklook <img> was fetched and decoded by the browser (onload ran).
    n_img = dom.count('class="ql"')
    assert n_img == 11  # 3 done x (raw, reduced) + quarantined raw + 1 processing raw + 3 masters
    assert dom.count('data-loaded="1"') == n_img
