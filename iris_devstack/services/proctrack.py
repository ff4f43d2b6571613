"""Process tracking for the local stack: know every process it started, so that stopping it
leaves nothing behind, however the processes try to escape.

Three mechanisms, strongest first, all used when available:

* **cgroup v2** (Linux, a writable cgroup2 mount - e.g. as root): the stack gets a cgroup
  ``iris-stack-<id>`` with one leaf per component (and one for the supervisor). A process
  cannot leave its cgroup by forking, daemonising, ``setsid`` or clearing its environment;
  ``cgroup.kill`` SIGKILLs a whole leaf (or the stack) at once.
* **child subreaper** (``prctl(PR_SET_CHILD_SUBREAPER)``): the supervisor adopts every orphan
  of its descendants instead of init, so orphans stay findable as its descendants.
* a **tracked-PID file** written by the supervisor (PID + start time of every descendant), for
  a stop after the supervisor itself was killed.
"""

from __future__ import annotations

import contextlib
import ctypes
import json
import logging
import os
import time
from collections.abc import Iterable
from pathlib import Path

import psutil

log = logging.getLogger(__name__)

PR_SET_CHILD_SUBREAPER = 36


def set_child_subreaper() -> bool:
    """Make the calling process the reaper of its descendants' orphans (Linux >= 3.4)."""
    try:
        libc = ctypes.CDLL("libc.so.6", use_errno=True)
        return libc.prctl(PR_SET_CHILD_SUBREAPER, 1, 0, 0, 0) == 0
    except OSError:
        return False


def cgroup2_mount() -> Path | None:
    """Mount point of the unified (v2) cgroup hierarchy, or None."""
    try:
        with open("/proc/self/mountinfo") as fh:
            for line in fh:
                left, _, right = line.partition(" - ")
                if right.split(" ", 1)[0] == "cgroup2":
                    return Path(left.split()[4])
    except OSError:
        pass
    return None


def own_cgroup() -> str | None:
    """This process's cgroup v2 path (``0::/...`` in /proc/self/cgroup)."""
    try:
        for line in Path("/proc/self/cgroup").read_text().splitlines():
            if line.startswith("0::"):
                return line[3:] or "/"
    except OSError:
        pass
    return None


def create_stack_cgroup(stack_id: str) -> Path | None:
    """Create (or reuse) the stack's cgroup next to ours; None when cgroups are not usable
    here (no cgroup2 mount, read-only, no permission), which the caller logs and survives."""
    mount, mine = cgroup2_mount(), own_cgroup()
    if mount is None or mine is None:
        return None
    path = mount / mine.lstrip("/") / f"iris-stack-{stack_id[:12]}"
    try:
        path.mkdir(exist_ok=True)
        probe = path / "probe"
        probe.mkdir(exist_ok=True)
        # Moving a process needs write access to cgroup.procs; try with a throw-away leaf
        # rather than trusting os.access (delegation rules are more than file modes).
        pid = os.fork()
        if pid == 0:  # pragma: no cover - child
            try:
                (probe / "cgroup.procs").write_text("0")
                os._exit(0)
            except OSError:
                os._exit(1)
        _, status = os.waitpid(pid, 0)
        probe.rmdir()
        if os.waitstatus_to_exitcode(status) != 0:
            raise PermissionError("cannot move a process into the cgroup")
    except OSError as exc:
        log.info("no cgroup for the stack (%s); tracking by subreaper and PID files", exc)
        with contextlib.suppress(OSError):
            path.rmdir()
        return None
    return path


def leaf(stack_cgroup: Path | None, name: str) -> Path | None:
    """The leaf cgroup of one component (created on demand)."""
    if stack_cgroup is None:
        return None
    path = stack_cgroup / name
    try:
        path.mkdir(exist_ok=True)
    except OSError as exc:
        log.warning("cannot create cgroup %s: %s", path, exc)
        return None
    return path


def join_cgroup_preexec(path: Path | None):
    """A preexec_fn moving the child into ``path`` before it execs (race-free: everything
    it starts is born inside). A failure leaves the child where it is (still tracked by the
    subreaper)."""
    if path is None:
        return None
    procs = os.fsencode(path / "cgroup.procs")

    def fn() -> None:  # pragma: no cover - runs in the child
        try:
            fd = os.open(procs, os.O_WRONLY)
            try:
                os.write(fd, b"0")
            finally:
                os.close(fd)
        except OSError:
            pass

    return fn


def cgroup_pids(path: Path | None) -> list[int]:
    """PIDs in ``path`` and every cgroup below it."""
    if path is None or not path.is_dir():
        return []
    pids: list[int] = []
    for procs in [path / "cgroup.procs", *path.glob("**/cgroup.procs")]:
        with contextlib.suppress(OSError, ValueError):
            pids += [int(x) for x in procs.read_text().split()]
    return sorted(set(pids))


def cgroup_kill(path: Path | None, timeout: float = 5.0) -> list[int]:
    """SIGKILL everything in ``path`` (and below) and wait until it is empty; returns the
    PIDs that were there. Uses ``cgroup.kill`` (Linux >= 5.14), else signals each PID."""
    pids = cgroup_pids(path)
    if not pids or path is None:
        return []
    me = os.getpid()
    if me in pids:  # never kill ourselves (the supervisor lives in a leaf of the stack)
        pids.remove(me)
        targets = [p for p in pids]
        _kill_pids(targets)
    else:
        try:
            (path / "cgroup.kill").write_text("1")
        except OSError:
            _kill_pids(pids)
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        left = [p for p in cgroup_pids(path) if p != me and _alive(p)]
        if not left:
            break
        time.sleep(0.05)
    return pids


def remove_cgroup(path: Path | None) -> None:
    """Remove ``path`` and its (empty) leaves; a cgroup still holding a process stays."""
    if path is None or not path.is_dir():
        return
    for sub in sorted((p for p in path.glob("**/") if p != path), key=lambda p: -len(p.parts)):
        with contextlib.suppress(OSError):
            sub.rmdir()
    with contextlib.suppress(OSError):
        path.rmdir()


def _alive(pid: int) -> bool:
    try:
        return psutil.Process(pid).status() != psutil.STATUS_ZOMBIE
    except psutil.Error:
        return False


def _kill_pids(pids: Iterable[int]) -> None:
    for pid in pids:
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.kill(pid, 9)


def terminate_all(procs: Iterable[psutil.Process], grace: float) -> list[int]:
    """SIGTERM ``procs``, wait up to ``grace`` seconds, SIGKILL the ones that ignored it;
    returns the PIDs that had to be killed."""
    procs = [p for p in procs if p.pid != os.getpid()]
    for p in procs:
        with contextlib.suppress(psutil.Error):
            p.terminate()
    _, alive = psutil.wait_procs(procs, timeout=grace)
    killed = []
    for p in alive:
        with contextlib.suppress(psutil.Error):
            log.warning("SIGKILL %d %s (ignored SIGTERM for %.0f s)", p.pid,
                        " ".join(p.cmdline()[:4]), grace)
            p.kill()
            killed.append(p.pid)
    psutil.wait_procs([p for p in alive], timeout=5)
    return killed


def snapshot(procs: Iterable[psutil.Process]) -> list[dict[str, float]]:
    """``[{pid, create_time}]`` for the tracked-PID file (PID reuse ruled out by the time)."""
    out = []
    for p in procs:
        with contextlib.suppress(psutil.Error):
            out.append({"pid": p.pid, "create_time": p.create_time()})
    return out


def from_snapshot(entries: Iterable[dict[str, float]]) -> list[psutil.Process]:
    """The still-live processes of a :func:`snapshot`."""
    out = []
    for e in entries:
        try:
            p = psutil.Process(int(e["pid"]))
            if abs(p.create_time() - float(e["create_time"])) < 0.5 \
                    and p.status() != psutil.STATUS_ZOMBIE:
                out.append(p)
        except (psutil.Error, KeyError, ValueError, TypeError):
            continue
    return out


def write_json_atomic(path: Path, data: object, mode: int = 0o644) -> None:
    """Write JSON so a reader never sees half a file."""
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, mode)
    with os.fdopen(fd, "w") as fh:
        json.dump(data, fh, indent=2)
        fh.write("\n")
    os.replace(tmp, path)
