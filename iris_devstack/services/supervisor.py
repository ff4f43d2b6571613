"""The stack's supervisor: one small process that starts the components of the local stack,
watches them, restarts the ones that die (exponential backoff, giving up after repeated fast
crashes) and, when told to stop, stops them so that nothing is left behind.

``iris_devstack.stack`` starts it (``python -m iris_devstack.stack _supervise``); it records itself in
``<state>/pids/supervisor.json`` and its view of the components in
``<state>/run/supervisor.json`` (what ``stack status`` merges into its report)::

    {"pid": ..., "state": "running", "cgroup": "...", "subreaper": true,
     "components": {"seaweedfs": {"pid": 123, "state": "running", "restarts": 1,
                                  "last_exit": "exit 1 after 12.0 s", ...}, ...}}

Component states: ``running``; ``backoff`` (dead, restart due at ``next_start``); ``failed``
(gave up: :data:`MAX_FAST_CRASHES` crashes in a row, each within :data:`FAST_CRASH_S` of its
start - see the component's log; ``stack start`` / ``make serve`` asks for a new attempt);
``stopped``.

Process tracking (:mod:`iris_devstack.services.proctrack`): the supervisor is a child subreaper,
so orphans of any component (e.g. LocalExecutor workers of a killed scheduler, which ignore
SIGTERM and whose environment setproctitle has overwritten) are re-parented to it and found
as its descendants; each component runs in a cgroup leaf of its own when cgroup v2 is
writable. When a component dies, whatever it left behind is killed before it is restarted:
the restarted scheduler then resets the dead scheduler's queued/running task instances
(Airflow's orphaned-task adoption, thresholds in ``Stack.env``) and they run again.
"""

from __future__ import annotations

import contextlib
import logging
import os
import signal
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import psutil

from . import proctrack

if TYPE_CHECKING:  # pragma: no cover
    from iris_devstack.stack import Stack

log = logging.getLogger(__name__)

# The policy; IRIS_SUPERVISOR_BASE_DELAY / _MAX_DELAY / _FAST_CRASH / _MAX_FAST_CRASHES override
# it (tests use short delays).
BASE_DELAY_S = float(os.environ.get("IRIS_SUPERVISOR_BASE_DELAY", 1.0))  # first restart delay
MAX_DELAY_S = float(os.environ.get("IRIS_SUPERVISOR_MAX_DELAY", 60.0))  # backoff cap
FAST_CRASH_S = float(os.environ.get("IRIS_SUPERVISOR_FAST_CRASH", 30.0))  # shorter run: fast crash
MAX_FAST_CRASHES = int(os.environ.get("IRIS_SUPERVISOR_MAX_FAST_CRASHES", 5))  # then give up
LEFTOVER_GRACE_S = 3.0  # SIGTERM -> SIGKILL for what a dead component left behind
POLL_S = 0.5


@dataclass
class Component:
    """What the supervisor knows about one component."""

    name: str
    proc: psutil.Process | None = None
    state: str = "pending"
    restarts: int = 0
    fast_crashes: int = 0
    started_at: float = 0.0
    next_start: float = 0.0
    last_exit: str | None = None
    message: str | None = None
    adopted: bool = False
    history: list[str] = field(default_factory=list)

    def report(self) -> dict[str, Any]:
        alive = self.proc is not None and _alive(self.proc)
        return {
            "pid": self.proc.pid if alive and self.proc else None,
            "alive": alive,
            "state": self.state,
            "restarts": self.restarts,
            "fast_crashes": self.fast_crashes,
            "started_at": self.started_at or None,
            "next_start": self.next_start if self.state == "backoff" else None,
            "last_exit": self.last_exit,
            "message": self.message,
            "adopted": self.adopted,
        }


def _alive(proc: psutil.Process) -> bool:
    try:
        return proc.is_running() and proc.status() != psutil.STATUS_ZOMBIE
    except psutil.Error:
        return False


def backoff_delay(fast_crashes: int) -> float:
    """Delay before the next start: 1, 2, 4, ... s after consecutive fast crashes (capped);
    a component that ran long enough before dying is restarted after BASE_DELAY_S."""
    if fast_crashes <= 0:
        return BASE_DELAY_S
    return min(MAX_DELAY_S, BASE_DELAY_S * 2 ** (fast_crashes - 1))


class Supervisor:
    """Run, watch and restart ``components`` of ``stack`` until SIGTERM/SIGINT."""

    def __init__(self, stack: Stack, components: list[str]):
        self.stack = stack
        self.order = list(components)
        self.comps = {n: Component(n) for n in self.order}
        self.status_path = stack.run_dir / "supervisor.json"
        self.retry_path = stack.run_dir / "supervisor.retry"
        self.tracked_path = stack.run_dir / "tracked.json"
        self.cgroup: Path | None = None
        self.subreaper = False
        self._stop = False
        self._exit_codes: dict[int, int] = {}
        self._last_snapshot = 0.0

    # ------------------------------------------------------------------ main loop
    def run(self) -> int:
        self.subreaper = proctrack.set_child_subreaper()
        rec = self.stack._record("supervisor") or {}
        # The supervisor runs in the leaf "supervisor" of the stack's cgroup; the components
        # get leaves next to it.
        self.cgroup = Path(rec["cgroup"]).parent if rec.get("cgroup") else None
        for sig in (signal.SIGTERM, signal.SIGINT):
            signal.signal(sig, self._on_signal)
        log.info("supervisor pid %d: components %s, subreaper %s, cgroup %s", os.getpid(),
                 ", ".join(self.order), self.subreaper, self.cgroup or "none")
        env = self.stack.env()
        cfg = self.stack.config()
        now = time.monotonic()
        for comp in self.comps.values():  # adopt what already runs (repair of a half-up stack)
            proc = self.stack._process(comp.name)
            if proc is not None:
                comp.proc, comp.state, comp.adopted = proc, "running", True
                comp.started_at = time.time()
                log.info("adopted running %s pid %d", comp.name, proc.pid)
            else:
                rec = self.stack._record(comp.name)
                if rec:
                    log.info("%s: recorded pid %s is not running; starting it", comp.name, rec.get("pid"))
                comp.state, comp.next_start = "backoff", now
        try:
            while not self._stop:
                self._reap()
                self._check_retry_request()
                for name in self.order:
                    self._step(self.comps[name], cfg, env)
                    if self._stop:
                        break
                self._write_status("running")
                self._sleep(POLL_S)
        finally:
            self._shutdown()
        return 0

    def _on_signal(self, signum: int, frame: Any) -> None:  # noqa: ARG002
        self._stop = True

    def _sleep(self, seconds: float) -> None:
        end = time.monotonic() + seconds
        while not self._stop and (left := end - time.monotonic()) > 0:
            time.sleep(min(0.1, left))

    def _step(self, comp: Component, cfg: Any, env: dict[str, str]) -> None:
        now = time.monotonic()
        if comp.state == "running" and (comp.proc is None or not _alive(comp.proc)):
            self._on_exit(comp)
        if comp.state == "backoff" and now >= comp.next_start:
            self._start(comp, cfg, env)

    def _start(self, comp: Component, cfg: Any, env: dict[str, str]) -> None:
        first = comp.started_at == 0.0
        try:
            argv = self.stack.component_argv(comp.name, cfg, env)
            leaf = proctrack.leaf(self.cgroup, comp.name)
            comp.proc = self.stack.spawn(comp.name, argv, env, cgroup=leaf, reap_in_thread=False)
        except Exception as exc:  # a start that cannot even spawn counts as a fast crash
            comp.proc = None
            comp.started_at = time.time()
            comp.last_exit = f"could not start: {exc}"
            log.error("%s: could not start: %s", comp.name, exc)
            self._schedule_restart(comp, ran=0.0)
            return
        comp.state, comp.adopted, comp.started_at = "running", False, time.time()
        comp.message = None
        if not first:
            comp.restarts += 1
            log.warning("%s restarted (restart %d, pid %d)", comp.name, comp.restarts, comp.proc.pid)

    def _on_exit(self, comp: Component) -> None:
        pid = comp.proc.pid if comp.proc else None
        code = self._exit_codes.pop(pid, None) if pid else None
        ran = time.time() - comp.started_at if comp.started_at else 0.0
        comp.last_exit = (f"exit {code}" if code is not None and code >= 0 else
                          f"signal {-code}" if code is not None else "gone") + f" after {ran:.1f} s"
        log.error("%s (pid %s) died: %s; see %s", comp.name, pid, comp.last_exit,
                  self.stack.logs_dir / f"{comp.name}.log")
        killed = self._kill_leftovers(comp)
        if killed:
            log.warning("%s: killed %d process(es) it left behind: %s", comp.name, len(killed),
                        killed[:20])
        self.stack._pid_path(comp.name).unlink(missing_ok=True)
        comp.proc = None
        self._schedule_restart(comp, ran)

    def _schedule_restart(self, comp: Component, ran: float) -> None:
        comp.fast_crashes = comp.fast_crashes + 1 if ran < FAST_CRASH_S else 0
        if comp.fast_crashes >= MAX_FAST_CRASHES:
            comp.state = "failed"
            comp.message = (f"gave up after {comp.fast_crashes} crashes in a row, each within "
                            f"{FAST_CRASH_S:.0f} s of its start (last: {comp.last_exit}); see "
                            f"{self.stack.logs_dir / (comp.name + '.log')}; `make serve` retries")
            log.error("%s: %s", comp.name, comp.message)
            return
        delay = backoff_delay(comp.fast_crashes)
        comp.state, comp.next_start = "backoff", time.monotonic() + delay
        comp.message = f"restarting in {delay:.0f} s"
        log.warning("%s: restart in %.1f s (fast crashes in a row: %d)", comp.name, delay,
                    comp.fast_crashes)

    def _kill_leftovers(self, comp: Component) -> list[int]:
        """Everything the dead component left: its cgroup leaf; else the processes of its
        session / process group (its PID: it was started in a session of its own) among our
        descendants (orphans are re-parented to us) and the whole machine."""
        rec_pid = comp.proc.pid if comp.proc else None
        leaf = self.cgroup / comp.name if self.cgroup else None
        killed: list[int] = []
        if leaf is not None and leaf.is_dir():
            procs = [p for p in (_proc(x) for x in proctrack.cgroup_pids(leaf)) if p]
            killed += proctrack.terminate_all(procs, LEFTOVER_GRACE_S)
            proctrack.cgroup_kill(leaf)
            return [p.pid for p in procs]
        if rec_pid is None:
            return killed
        found: dict[int, psutil.Process] = {}
        for p in psutil.process_iter():
            with contextlib.suppress(psutil.Error, OSError):
                if p.pid != os.getpid() and (os.getsid(p.pid) == rec_pid or os.getpgid(p.pid) == rec_pid):
                    found[p.pid] = p
        live = {c.proc.pid for c in self.comps.values() if c.proc is not None and c is not comp}
        done: set[int] = set()
        for _ in range(5):
            # Orphans re-parented to us that left the session (setsid): children of ours that
            # are not a component (nothing of the stack is legitimately orphaned), with their
            # descendants - which become our orphans in turn as their parents die.
            with contextlib.suppress(psutil.Error):
                for p in psutil.Process().children():
                    if p.pid not in live and p.pid not in done:
                        found[p.pid] = p
            batch = [p for pid, p in found.items() if pid not in done]
            for p in list(batch):
                with contextlib.suppress(psutil.Error):
                    batch += [c for c in p.children(recursive=True) if c.pid not in done]
            batch = [p for p in {p.pid: p for p in batch}.values() if _alive(p)]
            if not batch:
                break
            proctrack.terminate_all(batch, LEFTOVER_GRACE_S)
            done.update(p.pid for p in batch)
            found.update({p.pid: p for p in batch})
            self._reap()
        return sorted(done)

    def _reap(self) -> None:
        """Collect the exit status of every child, our components and adopted orphans alike
        (a subreaper that does not reap fills the process table with zombies)."""
        while True:
            try:
                pid, status = os.waitpid(-1, os.WNOHANG)
            except ChildProcessError:
                return
            if pid == 0:
                return
            self._exit_codes[pid] = os.waitstatus_to_exitcode(status)
            if len(self._exit_codes) > 1000:
                self._exit_codes.pop(next(iter(self._exit_codes)))

    def _check_retry_request(self) -> None:
        if not self.retry_path.exists():
            return
        self.retry_path.unlink(missing_ok=True)
        for comp in self.comps.values():
            if comp.state == "failed":
                log.info("%s: new attempt requested", comp.name)
                comp.fast_crashes, comp.state, comp.next_start = 0, "backoff", time.monotonic()

    # ------------------------------------------------------------------ status
    def _write_status(self, state: str) -> None:
        data = {
            "pid": os.getpid(),
            "state": state,
            "updated_at": time.time(),
            "subreaper": self.subreaper,
            "cgroup": str(self.cgroup) if self.cgroup else None,
            "components": {n: self.comps[n].report() for n in self.order},
        }
        with contextlib.suppress(OSError):
            proctrack.write_json_atomic(self.status_path, data)
        now = time.monotonic()
        if now - self._last_snapshot > 2.0 or state != "running":
            self._last_snapshot = now
            with contextlib.suppress(OSError, psutil.Error):
                tree = psutil.Process().children(recursive=True)
                proctrack.write_json_atomic(self.tracked_path, proctrack.snapshot(tree))

    # ------------------------------------------------------------------ stop
    def _shutdown(self) -> None:
        """Phased stop of the components (``Stack.stop_components``), then every remaining
        descendant (orphans adopted by us) and every process in the stack's cgroup."""
        log.info("supervisor stopping the components")
        self._write_status("stopping")
        with contextlib.suppress(Exception):
            self.stack.stop_components()
        self._reap()
        left = [p for p in psutil.Process().children(recursive=True) if _alive(p)]
        if left:
            log.warning("stopping %d process(es) left by the components", len(left))
            proctrack.terminate_all(left, 5.0)
        for name in self.order:
            if self.cgroup is not None:
                proctrack.cgroup_kill(self.cgroup / name)
        self._reap()
        for comp in self.comps.values():
            comp.state, comp.proc = "stopped", None
        self._write_status("stopped")
        log.info("supervisor stopped")


def _proc(pid: int) -> psutil.Process | None:
    try:
        return psutil.Process(pid)
    except psutil.Error:
        return None
