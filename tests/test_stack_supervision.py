"""The stack supervises its components: a dead one is restarted (with backoff, given up on
after repeated fast crashes), a half-up stack is repaired by `start`, and `stop` leaves no
process behind - not even orphans with a blank environment that ignore SIGTERM."""

from __future__ import annotations

import contextlib
import json
import os
import signal
import sys
import time
from pathlib import Path

import psutil
import pytest

from iris_devstack.services import supervisor as sup_mod
from iris_devstack.stack import Stack, StackError, free_port

pytestmark = [pytest.mark.services, pytest.mark.slow]

# A component shaped like a scheduler with LocalExecutor workers: it starts a worker with a
# blank environment (as after setproctitle), in a session of its own, ignoring SIGTERM, which
# forks a task process of its own; the worker writes the tree's PIDs for the test.
FAKE_SCHEDULER = r"""
import os, signal, subprocess, sys, time
out = sys.argv[1]
worker = (
    "import os, signal, sys, time\n"
    "signal.signal(signal.SIGTERM, signal.SIG_IGN)\n"
    "pid = os.fork()\n"
    "if pid == 0:\n"
    "    time.sleep(600); os._exit(0)\n"
    "open(sys.argv[1] + '.tmp', 'w').write(f'{os.getppid()} {os.getpid()} {pid}')\n"
    "os.replace(sys.argv[1] + '.tmp', sys.argv[1])\n"
    "time.sleep(600)\n"
)
subprocess.Popen(["/usr/bin/env", "-i", sys.executable, "-c", worker, out],
                 start_new_session=True, env={})
time.sleep(600)
"""


def _wait(pred, timeout: float, what: str, step: float = 0.2):
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        value = pred()
        if value:
            return value
        time.sleep(step)
    raise AssertionError(f"timed out after {timeout:.0f} s waiting for {what}")


def _tree(pidfile: Path, old: str | None = None) -> list[psutil.Process]:
    """The fake scheduler's worker tree as written by the worker (main, worker, task)."""
    text = pidfile.read_text() if pidfile.exists() else ""
    if not text or text == old:
        return []
    return [psutil.Process(int(p)) for p in text.split()]


def _alive(p: psutil.Process) -> bool:
    try:
        return p.is_running() and p.status() != psutil.STATUS_ZOMBIE
    except psutil.Error:
        return False


@pytest.fixture
def fake_scheduler(tmp_path: Path) -> tuple[list[str], Path]:
    script = tmp_path / "fake_scheduler.py"
    script.write_text(FAKE_SCHEDULER)
    pidfile = tmp_path / "tree.pids"
    return [sys.executable, str(script), str(pidfile)], pidfile


def test_backoff_policy():
    assert sup_mod.backoff_delay(0) == sup_mod.BASE_DELAY_S
    assert [sup_mod.backoff_delay(n) for n in (1, 2, 3)] == [
        sup_mod.BASE_DELAY_S, 2 * sup_mod.BASE_DELAY_S, 4 * sup_mod.BASE_DELAY_S]
    assert sup_mod.backoff_delay(50) == sup_mod.MAX_DELAY_S


def test_seaweedfs_killed_comes_back(tmp_path: Path):
    stack = Stack(tmp_path / "state")
    cfg = stack.start(components=("seaweedfs",), api_port=free_port(), timeout=90)
    try:
        from iris_devstack.stack import seaweed_endpoint

        client = seaweed_endpoint(stack.state_dir, cfg.s3_port, stack._ensure_secrets()).client()
        client.put_object(Bucket="iris-drs", Key="raw/a.fits", Body=b"frame")
        status = stack.health()
        assert status["supervisor"]["alive"] and status["supervisor"]["subreaper"]
        sw = status["components"]["seaweedfs"]
        assert sw["alive"] and sw["healthy"] and sw["restarts"] == 0 and sw["state"] == "running"
        wrapper = psutil.Process(sw["pid"])
        weed = [c for c in wrapper.children(recursive=True) if c.name() == "weed"]
        assert len(weed) == 1
        # 1: weed itself dies.
        weed[0].kill()
        # `status` is truthful at once: S3 does not answer any more (a listening relay socket
        # is not mistaken for a working server).
        assert stack.health()["s3"] is False or stack.health()["components"]["seaweedfs"]["restarts"] >= 1
        # Generous timeouts: under a loaded CI machine weed's start alone can take tens of s.
        _wait(lambda: (c := stack.health()["components"]["seaweedfs"])["restarts"] >= 1 and c["healthy"],
              180, "SeaweedFS restarted")
        assert client.get_object(Bucket="iris-drs", Key="raw/a.fits")["Body"].read() == b"frame"
        # 2: the component process (wrapper and relay) dies.
        os.kill(stack.health()["components"]["seaweedfs"]["pid"], signal.SIGKILL)
        _wait(lambda: (c := stack.health()["components"]["seaweedfs"])["restarts"] >= 2 and c["healthy"],
              180, "SeaweedFS restarted again")
        assert client.get_object(Bucket="iris-drs", Key="raw/a.fits")["Body"].read() == b"frame"
        log = (stack.logs_dir / "supervisor.log").read_text()
        assert "seaweedfs" in log and "died" in log and "restarted" in log
    finally:
        stack.stop()
    assert stack.leftovers() == []


@pytest.mark.parametrize("cgroup", ["auto", "off"])
def test_killed_component_leaves_no_orphans(tmp_path: Path, fake_scheduler, monkeypatch, cgroup: str):
    """The fake scheduler is SIGKILLed: its SIGTERM-ignoring blank-environment tree is killed
    before it is restarted, and `stop` (from another process, like `make stop`) leaves
    nothing - with the cgroup and with only the subreaper (IRIS_STACK_CGROUP=off)."""
    argv, pidfile = fake_scheduler
    monkeypatch.setenv("IRIS_STACK_CGROUP", cgroup)
    stack = Stack(tmp_path / "state")
    stack.configure(api_port=free_port(), extra={"fakesched": argv})
    stack._spawn_supervisor(["fakesched"], stack.env())
    seen: list[psutil.Process] = []
    try:
        stack.wait_healthy(["fakesched"], timeout=30)
        first = _wait(lambda: _tree(pidfile), 30, "the worker tree")
        seen += first
        main, worker, task = first
        assert worker.environ() == {} or "IRIS_STACK_ID" not in worker.environ()
        status = stack.health()["supervisor"]
        assert (status["cgroup"] is not None) == (cgroup == "auto")
        old = pidfile.read_text()
        main.kill()
        # Orphaned, the worker and its task re-parent to the supervisor (subreaper) ...
        second = _wait(lambda: _tree(pidfile, old), 60, "the restarted tree")
        seen += second
        # ... which killed them before the restart.
        assert not _alive(worker) and not _alive(task), "orphans of the dead component survived"
        comp = stack.health()["components"]["fakesched"]
        assert comp["restarts"] == 1 and comp["alive"]
        # The new tree: orphan it too, then stop from another process.
        second[0].kill()
        time.sleep(0.3)
    finally:
        import subprocess

        out = subprocess.run([sys.executable, "-m", "iris_devstack.stack", "--state-dir",
                              str(stack.state_dir), "stop"], capture_output=True, text=True,
                             timeout=180)
    assert out.returncode == 0, out.stdout + out.stderr
    assert "leftovers: []" in out.stdout
    assert [p.pid for p in seen if _alive(p)] == []
    assert stack.leftovers() == []


def test_stop_after_the_supervisor_was_killed(tmp_path: Path, fake_scheduler, monkeypatch):
    """Without cgroups and with the supervisor SIGKILLed, the orphans go to init with a blank
    environment: `stop` still finds them through the PIDs the supervisor tracked."""
    argv, pidfile = fake_scheduler
    monkeypatch.setenv("IRIS_STACK_CGROUP", "off")
    stack = Stack(tmp_path / "state")
    stack.configure(api_port=free_port(), extra={"fakesched": argv})
    sup = stack._spawn_supervisor(["fakesched"], stack.env())
    stack.wait_healthy(["fakesched"], timeout=30)
    tree = _wait(lambda: _tree(pidfile), 30, "the worker tree")
    _wait(lambda: (stack.run_dir / "tracked.json").exists()
          and {p.pid for p in tree} <= {e["pid"] for e in json.loads((stack.run_dir / "tracked.json").read_text())},
          30, "the supervisor's tracked PIDs")
    sup.kill()
    tree[0].kill()  # the fake scheduler: its worker tree is orphaned to init now
    time.sleep(0.5)
    assert _alive(tree[1]) and _alive(tree[2])
    assert "IRIS_STACK_ID" not in tree[1].environ()  # the marker sweep alone cannot find it
    killed = stack.stop()
    assert {tree[1].pid, tree[2].pid} <= set(killed)  # they ignored SIGTERM
    assert [p.pid for p in tree if _alive(p)] == []
    assert stack.leftovers() == []


def test_repeated_fast_crashes_give_up_then_start_retries(tmp_path: Path, monkeypatch):
    monkeypatch.setenv("IRIS_SUPERVISOR_BASE_DELAY", "0.1")
    monkeypatch.setenv("IRIS_SUPERVISOR_MAX_FAST_CRASHES", "3")
    stack = Stack(tmp_path / "state")
    stack.configure(api_port=free_port(),
                    extra={"crasher": [sys.executable, "-c", "import sys; sys.exit(3)"]})
    stack._spawn_supervisor(["crasher"], stack.env())
    try:
        _wait(lambda: stack.health()["components"]["crasher"]["state"] == "failed", 60,
              "the supervisor to give up")
        comp = stack.health()["components"]["crasher"]
        assert not comp["alive"] and not comp["healthy"] and comp["restarts"] == 2
        assert comp["last_exit"].startswith("exit 3")
        assert "gave up after 3 crashes" in comp["message"]
        assert "gave up" in (stack.logs_dir / "supervisor.log").read_text()
        with pytest.raises(StackError, match=r"keep crashing: crasher: gave up after 3 crashes"):
            stack.wait_healthy(["crasher"], timeout=10)
        # `start` on this half-up stack asks for a new attempt (which fails the same way).
        with contextlib.suppress(StackError):
            stack.start(components=["crasher"], timeout=10)
        _wait(lambda: (c := stack.health()["components"]["crasher"])["state"] == "failed"
              and c["restarts"] >= 4, 60, "the new attempt")
    finally:
        stack.stop()
    assert stack.leftovers() == []


def test_start_repairs_a_half_up_stack(tmp_path: Path, fake_scheduler):
    """The supervisor is gone (killed), a component still runs: `start` does not refuse, it
    starts a new supervisor that adopts the running component and supervises it again."""
    argv, pidfile = fake_scheduler
    stack = Stack(tmp_path / "state")
    stack.configure(api_port=free_port(), extra={"fakesched": argv})
    sup = stack._spawn_supervisor(["fakesched"], stack.env())
    try:
        stack.wait_healthy(["fakesched"], timeout=30)
        main = _wait(lambda: _tree(pidfile), 30, "the worker tree")[0]
        sup.kill()
        sup.wait(10)
        assert stack.health()["supervisor"]["alive"] is False
        with pytest.raises(StackError, match="already running"):
            stack.configure(api_port=free_port())
        stack.start(components=["fakesched"], timeout=60)  # repairs
        status = stack.health()
        assert status["supervisor"]["alive"] and status["supervisor"]["pid"] != sup.pid
        assert status["components"]["fakesched"]["pid"] == main.pid  # adopted, not restarted
        old = pidfile.read_text()
        main.kill()
        _wait(lambda: _tree(pidfile, old), 60, "the restarted tree")
        assert stack.health()["components"]["fakesched"]["restarts"] == 1
    finally:
        stack.stop()
    assert stack.leftovers() == []
