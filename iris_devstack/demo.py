"""``make demo`` / ``make serve`` / ``make stop``: the IRIS DRS end to end on one machine.

``python -m iris_devstack.demo run``
    starts the stack (SeaweedFS + Airflow, :mod:`iris_devstack.stack`), simulates a small night
    (:mod:`iris_tasks.simulate`), publishes the simulator's pre-night references into the CRDS
    cache, unpauses the DAGs, feeds the raw frames into the landing area at a steady cadence
    (temp name + atomic rename, as the readout computer does), waits until the real-time DAG
    has processed every frame, runs the nightly calibrations, prints a summary and stops
    everything (``--keep`` leaves the stack up).
``python -m iris_devstack.demo serve``
    starts the stack and keeps it up until Ctrl-C (the ledger of earlier runs stays visible).
``python -m iris_devstack.demo stop``
    stops a stack left running (by ``serve`` or ``run --keep``) from any shell.

Everything lives under ``$IRIS_STATE_DIR`` (default ``<repo>/var``).
"""

from __future__ import annotations

import argparse
import collections
import contextlib
import json
import logging
import os
import shutil
import signal
import sys
import time
from collections.abc import Iterable
from pathlib import Path
from typing import Any

from iris_tasks.orchestration.landing import deliver
from iris_tasks.orchestration.ledger import TERMINAL_STATUSES

from .stack import Stack, StackError, add_start_options, start_kwargs

log = logging.getLogger(__name__)

REALTIME_DAG = "iris_realtime"
NIGHTLY_DAG = "iris_nightly_calibrations"
REPROCESS_DAG = "iris_reprocess"
DAG_IDS = (REALTIME_DAG, NIGHTLY_DAG, REPROCESS_DAG)


def say(msg: str) -> None:
    """Progress for the person running the demo (stdout, flushed)."""
    print(f"[demo {time.strftime('%H:%M:%S')}] {msg}", flush=True)


# ------------------------------------------------------------------------------ the night
def _simulator_digest() -> str:
    """Short SHA-256 of the simulator's source and of the instrument data it draws from
    (line lists, standards, atmosphere tables): file names and contents."""
    import hashlib

    import iris_tasks.instrument as instrument_pkg
    import iris_tasks.simulate as simulate_pkg

    digest = hashlib.sha256()
    for pkg in (simulate_pkg, instrument_pkg):
        root = Path(pkg.__file__).parent
        for path in sorted(root.rglob("*")):
            if path.is_file() and "__pycache__" not in path.parts:
                digest.update(f"{pkg.__name__}/{path.relative_to(root)}".encode() + b"\0")
                digest.update(path.read_bytes())
    return digest.hexdigest()[:10]


def simulate(state_dir: Path, size: int, frames: int, detectors: list[str], ifs_modes: list[str],
             seed: int = 0) -> tuple[Path, dict[str, Any]]:
    """Simulate the night once per parameter set (kept under <state>/demo/ for re-runs)."""
    from iris_tasks.simulate.night import NightPlan, simulate_night

    modes = tuple((m, "4" if m == "LENSLET" else "25") for m in ifs_modes)
    # The tag ends with a digest of the simulator's own source: a night simulated by other
    # simulator code (new optics, atmosphere, standards) is never reused.
    tag = (f"s{size}_f{frames}_{'-'.join(detectors)}_{'-'.join(ifs_modes) or 'none'}_seed{seed}"
           f"_sim{_simulator_digest()}")
    out = state_dir / "demo" / tag
    manifest_path = out / "manifest.json"
    if manifest_path.is_file():
        say(f"reusing the simulated night in {out}")
        return out, json.loads(manifest_path.read_text())
    shutil.rmtree(out, ignore_errors=True)
    # No IFS telluric standard: the 4 mas lenslet field of a 1024 px detector is 4 spaxel rows,
    # smaller than a standard's aperture (radius 25 spaxels), so its response would carry the
    # light the field cuts off into every cube it calibrates. The IFS telluric chain is shown
    # by tests/test_nightly_telluric.py and tests/test_night_standard_telluric.py (slicer).
    plan = NightPlan(n_dark=frames, n_flat=frames, n_sky=frames, n_science=frames,
                     n_telluric=0, n_arc=1, imager_filters=("Ks",), ifs_modes=modes or (("LENSLET", "4"),),
                     n_imager_telluric=1)  # an imager standard: the nightly build's zero point
    say(f"simulating a night: {size}x{size}, detectors {','.join(detectors)}, {frames} per OBSNAME")
    t0 = time.monotonic()
    # The realistic IFS (as-built optics, flexure): its instrument model is learned from the
    # night's lamp flats and arcs (afternoon_model), never taken from the simulator's truth.
    manifest = simulate_night(out / "tmp", size=size, detectors=detectors, seed=seed, plan=plan)
    # Publish the finished night atomically so an interrupted run is simulated again.
    for item in (out / "tmp").iterdir():
        item.rename(out / item.name)
    (out / "tmp").rmdir()
    say(f"simulated {len(manifest['files'])} frames in {time.monotonic() - t0:.0f} s")
    return out, manifest


def publish_references(stack: Stack, paths: list[str], message: str) -> None:
    """Publish reference files into the stack's CRDS cache (``iris-drs calib publish``)."""
    import subprocess

    if not paths:
        return
    env = stack.env()
    cmd = [sys.executable, "-m", "iris_tasks.calib", "publish", *paths, "-m", message,
           "--author", "iris-demo"]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=1800)
    if proc.returncode != 0:
        raise StackError(f"CRDS bootstrap failed: {(proc.stderr or proc.stdout).strip()[-1500:]}")
    say(f"CRDS cache {env.get('IRIS_CRDS_PATH')}: published {len(paths)} references")


IFS_AFTERNOON_OBSNAMES = ("LEN-SPX", "SLI-NFF", "LEN-IDP", "SLI-IDP")


def afternoon_model(stack: Stack, night_dir: Path, manifest: dict[str, Any]) -> list[str]:
    """The IFS instrument model (and lamp flat) of the night's afternoon calibrations.

    It stands for what an afternoon calibration run makes before the night starts: the
    night's IFS lamp flats and arcs go through ``iris-drs masters`` with the pre-night
    references (readout, then :func:`iris_tasks.pipelines.recipes.build_nightly`). Built once
    per simulated night and kept beside it (the nightly run after the night rebuilds it from
    the same frames through Airflow).
    """
    import subprocess

    out = night_dir / "afternoon" / "masters"
    built = sorted(str(p) for p in out.glob("*.fits")) if out.is_dir() else []
    if built:
        return built
    inputs = [f for f in manifest["files"] if f["obsname"] in IFS_AFTERNOON_OBSNAMES]
    if not any(f["obsname"].endswith("-IDP") for f in inputs):
        return []
    tmp = night_dir / "afternoon" / "tmp"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    for f in inputs:
        (tmp / Path(f["path"]).name).symlink_to((night_dir / f["path"]).resolve())
    work = night_dir / "afternoon" / "work"
    t0 = time.monotonic()
    cmd = [sys.executable, "-m", "iris_tasks.cli", "--operational", "masters", str(tmp),
           "--out", str(work)]
    proc = subprocess.run(cmd, env=stack.env(), capture_output=True, text=True, timeout=1800)
    if proc.returncode != 0:
        raise StackError(f"afternoon IFS model failed: {(proc.stderr or proc.stdout).strip()[-1500:]}")
    masters = sorted(p for p in work.glob("*.fits") if not p.name.endswith("_rate.fits"))
    out.mkdir(parents=True, exist_ok=True)
    for p in masters:
        p.rename(out / p.name)
    shutil.rmtree(tmp, ignore_errors=True)
    shutil.rmtree(work, ignore_errors=True)
    say(f"afternoon calibrations: IFS model and lamp flat from {len(inputs)} frames in "
        f"{time.monotonic() - t0:.0f} s")
    return sorted(str(p) for p in out.glob("*.fits"))


def bootstrap_crds(stack: Stack, night_dir: Path, manifest: dict[str, Any]) -> None:
    """Publish the simulator's pre-night detector references, then the IFS instrument model
    the afternoon's lamp flats and arcs give (see :func:`afternoon_model`)."""
    refs = [str(night_dir / r["path"]) for r in manifest["references"]]
    publish_references(stack, refs, f"demo: pre-night references for {manifest['night']}")
    model = afternoon_model(stack, night_dir, manifest)
    publish_references(stack, model, f"demo: afternoon IFS model for {manifest['night']}")


def feed(stack: Stack, night_dir: Path, manifest: dict[str, Any], cadence: float,
         landing: Path) -> list[dict[str, Any]]:
    """Drop the night's raw frames into the landing area in observing order. Frames exposed
    together (the imager detectors, or two instruments at one time stamp) land together;
    ``cadence`` seconds separate successive exposures. Returns what was fed, with times."""
    landing.mkdir(parents=True, exist_ok=True)
    by_time: dict[str, list[dict[str, Any]]] = collections.defaultdict(list)
    for f in manifest["files"]:
        by_time[f"{f['date_obs']}T{f['time_obs']}"].append(f)
    fed = []
    for i, stamp in enumerate(sorted(by_time)):
        if i:
            time.sleep(cadence)
        for f in by_time[stamp]:
            src = night_dir / f["path"]
            deliver(src, landing)  # the landing contract: hidden name, fsync, rename
            fed.append({**f, "filename": src.name, "fed_at": time.time()})
        say(f"landed {len(fed)}/{len(manifest['files'])}: "
            + ", ".join(f"{f['detector']} {f['obsname']}" for f in by_time[stamp]))
    return fed


# What a demo run leaves in the state directory; removed before the next run (not demo/, the
# simulated-night cache, nor secrets.json, so the login stays the same).
RUN_STATE = ("ledger.sqlite", "ledger.sqlite-wal", "ledger.sqlite-shm", "work", "landing",
             "quarantine", "lineage", "crds", "seaweedfs", "ops_cache", "airflow", "logs")


def reset_run_state(stack: Stack) -> None:
    """Start from an empty ledger, store and Airflow DB. Re-landing the same simulated bytes
    into an old ledger would only produce duplicates (frames are claimed by content hash),
    and every run leaves ~150 MB per 1024^2 frame behind."""
    if stack.running_components() or stack.supervisor_process():
        raise StackError(f"a stack is running under {stack.state_dir}; `make stop` first")
    for name in RUN_STATE:
        path = stack.state_dir / name
        if path.is_dir():
            shutil.rmtree(path)
        elif path.exists():
            path.unlink()


# ------------------------------------------------------------------------------ Airflow
def wait_for_dags(stack: Stack, dag_ids: Iterable[str], timeout: float = 180.0) -> list[str]:
    """Wait until the dag-processor has parsed the DAGs; fail on import errors."""
    want = set(dag_ids)
    deadline = time.monotonic() + timeout
    while True:
        errors = stack.api("GET", "/importErrors").get("import_errors", [])
        if errors:
            detail = "; ".join(f"{e.get('filename')}: {str(e.get('stack_trace', ''))[-300:]}" for e in errors)
            raise StackError(f"DAG import errors: {detail}")
        found = {d["dag_id"] for d in stack.api("GET", "/dags?limit=100").get("dags", [])}
        if want <= found:
            return sorted(found)
        if time.monotonic() > deadline:
            raise StackError(f"DAGs not parsed after {timeout:.0f} s: missing {sorted(want - found)}")
        time.sleep(2.0)


def unpause(stack: Stack, dag_ids: Iterable[str]) -> None:
    for dag_id in dag_ids:
        stack.api("PATCH", f"/dags/{dag_id}", {"is_paused": False})


def trigger(stack: Stack, dag_id: str, conf: dict[str, Any] | None = None) -> str:
    run = stack.api("POST", f"/dags/{dag_id}/dagRuns", {"logical_date": None, "conf": conf or {}})
    return run["dag_run_id"]


def wait_run(stack: Stack, dag_id: str, run_id: str, timeout: float) -> str:
    from urllib.parse import quote

    deadline = time.monotonic() + timeout
    state = "queued"
    while time.monotonic() < deadline:
        state = stack.api("GET", f"/dags/{dag_id}/dagRuns/{quote(run_id, safe='')}")["state"]
        if state in ("success", "failed"):
            return state
        time.sleep(3.0)
    return f"timeout ({state})"


def wait_processed(ledger_path: Path, names: set[str], timeout: float) -> dict[str, dict[str, Any]]:
    """Poll the frame ledger until every fed frame reached a terminal status."""
    from iris_tasks.orchestration.ledger import FrameLedger

    deadline = time.monotonic() + timeout
    last_report = 0.0
    rows: dict[str, dict[str, Any]] = {}
    ledger = FrameLedger(ledger_path)
    while True:
        if ledger_path.exists():
            rows = {r["filename"]: r for r in ledger.frames() if r["filename"] in names}
        done = {n for n, r in rows.items() if r["status"] in TERMINAL_STATUSES}
        if done >= names:
            return rows
        now = time.monotonic()
        if now - last_report > 15:
            counts = collections.Counter(r["status"] for r in rows.values())
            say(f"processed {len(done)}/{len(names)} frames ({dict(counts)}; "
                f"{len(names) - len(rows)} not yet claimed)")
            last_report = now
        if now > deadline:
            missing = sorted(names - done)
            raise StackError(f"{len(missing)} frames not processed after {timeout:.0f} s: {missing[:5]}")
        time.sleep(2.0)


# ------------------------------------------------------------------------------ summary
def percentile(values: list[float], q: float) -> float | None:
    if not values:
        return None
    v = sorted(values)
    pos = (len(v) - 1) * q / 100.0
    lo = int(pos)
    hi = min(lo + 1, len(v) - 1)
    return v[lo] + (v[hi] - v[lo]) * (pos - lo)


def count_lineage_events(lineage_dir: Path) -> dict[str, int]:
    """OpenLineage events written by the file transport, by eventType."""
    counts: collections.Counter[str] = collections.Counter()
    if not lineage_dir.is_dir():
        return {}
    for path in lineage_dir.rglob("*"):
        if not path.is_file():
            continue
        try:
            text = path.read_text(errors="replace")
        except OSError:
            continue
        docs: list[Any] = []
        try:
            docs = [json.loads(text)]
        except ValueError:
            for line in text.splitlines():
                with contextlib.suppress(ValueError):
                    docs.append(json.loads(line))
        for d in docs:
            if isinstance(d, dict) and "eventType" in d:
                counts[str(d["eventType"])] += 1
    return dict(counts)


def store_summary(store_url: str) -> dict[str, Any]:
    from iris_tasks.storage import open_store

    objs = open_store(store_url).list("")
    by_kind: collections.Counter[str] = collections.Counter(o.key.split("/", 1)[0] for o in objs)
    return {"objects": len(objs), "bytes": sum(o.size or 0 for o in objs), "by_kind": dict(by_kind)}


def summarize(stack: Stack, night: str, fed: list[dict[str, Any]], nightly: str | None) -> dict[str, Any]:
    from iris_tasks.config import settings
    from iris_tasks.orchestration.ledger import FrameLedger

    env = stack.env()
    with _patched_environ(env):
        s = settings()
    names = {f["filename"] for f in fed}
    rows = [r for r in FrameLedger(s.ledger_path).frames() if r["filename"] in names]
    per_obs: dict[str, collections.Counter[str]] = collections.defaultdict(collections.Counter)
    lat = {"imager": [], "ifs": []}
    for r in rows:
        per_obs[f"{r.get('detector') or '?'} {r.get('obsname') or '?'}"][r["status"]] += 1
        if r.get("latency_seconds") is not None and r["status"] == "done":
            lat["imager" if (r.get("mode") or "imager") == "imager" else "ifs"].append(r["latency_seconds"])
    every = lat["imager"] + lat["ifs"]
    return {
        "night": night,
        "frames_fed": len(fed),
        "frames_by_obsname": {k: dict(v) for k, v in sorted(per_obs.items())},
        "latency_s": {
            "all": {"n": len(every), "p50": percentile(every, 50), "p95": percentile(every, 95)},
            **{k: {"n": len(v), "p50": percentile(v, 50), "p95": percentile(v, 95)} for k, v in lat.items()},
        },
        "deadline_misses": sum(1 for r in rows if r.get("deadline_missed")),
        "quarantined": sum(1 for r in rows if r["status"] == "quarantined"),
        "failed": sum(1 for r in rows if r["status"] == "failed"),
        "nightly_calibrations": nightly,
        "store": _safe(lambda: _with_env(env, store_summary, s.store_url)),
        "lineage_events": count_lineage_events(s.lineage_dir),
    }


def _with_env(env: dict[str, str], fn, *args):
    """Run ``fn`` with the stack's environment (the store resolves its Airflow connection and
    credentials from AIRFLOW_CONN_IRIS_S3 / AWS_* there)."""
    with _patched_environ(env):
        return fn(*args)


def _safe(fn):
    try:
        return fn()
    except Exception as exc:  # a summary line must not kill the demo
        return f"unavailable: {exc}"


@contextlib.contextmanager
def _patched_environ(env: dict[str, str]):
    old = dict(os.environ)
    os.environ.update(env)
    try:
        yield
    finally:
        os.environ.clear()
        os.environ.update(old)


def print_summary(summary: dict[str, Any], stack: Stack) -> None:
    cfg = stack.config()

    def fmt(v: float | None) -> str:
        return "n/a" if v is None else f"{v:.1f} s"

    print("\n" + "=" * 72)
    print(f"IRIS DRS demo — night {summary['night']}: {summary['frames_fed']} frames fed")
    print("frames per detector/OBSNAME (status counts):")
    for k, v in summary["frames_by_obsname"].items():
        print(f"  {k:<22} {', '.join(f'{s}={n}' for s, n in sorted(v.items()))}")
    for k, v in summary["latency_s"].items():
        print(f"latency landing->ingested [{k:<6}] n={v['n']:<3} p50={fmt(v['p50'])}  p95={fmt(v['p95'])}")
    print(f"deadline misses: {summary['deadline_misses']}   quarantined: {summary['quarantined']}"
          f"   failed: {summary['failed']}")
    print(f"nightly calibrations run: {summary['nightly_calibrations']}")
    st = summary["store"]
    if isinstance(st, dict):
        print(f"objects stored: {st['objects']} ({st['bytes'] / 2**20:.0f} MiB) {st['by_kind']}")
    else:
        print(f"objects stored: {st}")
    print(f"lineage events: {sum(summary['lineage_events'].values())} {summary['lineage_events']}")
    print("-" * 72)
    print(f"Airflow UI:        {cfg.api_url}/   (operations page: {cfg.api_url}/iris-ops/ ,")
    print("                   also 'IRIS night' in the UI's navigation)")
    print("login:             " + login_hint(stack))
    print("=" * 72, flush=True)


def stack_admin() -> str:
    from .stack import ADMIN_USER

    return ADMIN_USER


def login_hint(stack: Stack) -> str:
    """How to log in, without showing the password (it stays in the 0600 secrets file)."""
    if stack.admin_password() is None:
        return "none (all users are admin)"
    return (f"user {stack_admin()}, password: `python -c \"import json; print(json.load(open("
            f"'{stack.secrets_path}'))['admin_password'])\"`")


# ------------------------------------------------------------------------------ commands
def cmd_run(args: argparse.Namespace) -> int:
    stack = Stack(args.state_dir)
    detectors = [d.strip() for d in args.detectors.split(",") if d.strip()]
    ifs_modes = [m.strip().upper() for m in args.ifs_modes.split(",") if m.strip()]
    t_start = time.monotonic()
    say(f"state directory {stack.state_dir}")
    # Simulate before the stack is up: the two cores go to the simulator, then to Airflow.
    night_dir, manifest = simulate(stack.state_dir, args.size, args.frames, detectors, ifs_modes, args.seed)
    if not args.no_reset:
        reset_run_state(stack)
    say("starting SeaweedFS + Airflow (scheduler, dag-processor, triggerer, api-server)")
    cfg = stack.start(**start_kwargs(args))
    say(f"stack up: Airflow {cfg.api_url}  S3 {cfg.s3_url}")
    try:
        bootstrap_crds(stack, night_dir, manifest)
        dags = wait_for_dags(stack, DAG_IDS)
        unpause(stack, [d for d in DAG_IDS if d in dags])
        say(f"DAGs parsed and unpaused: {', '.join(DAG_IDS)}")
        env = stack.env()
        landing = Path(env["IRIS_LANDING"])
        fed = feed(stack, night_dir, manifest, args.cadence, landing)
        wait_processed(Path(env["IRIS_STATE_DIR"]) / "ledger.sqlite", {f["filename"] for f in fed},
                       args.timeout)
        say("every frame processed; running the nightly calibrations")
        run_id = trigger(stack, NIGHTLY_DAG, {"night": manifest["night"]})
        nightly_state = wait_run(stack, NIGHTLY_DAG, run_id, args.timeout)
        nightly = f"{run_id}: {nightly_state}"
        say(f"nightly calibrations {nightly}")
        if nightly_state != "success":
            say(f"the nightly calibrations did not succeed: the failed tasks' logs are under "
                f"{stack.state_dir / 'airflow' / 'logs' / f'dag_id={NIGHTLY_DAG}'}")
        summary = summarize(stack, manifest["night"], fed, nightly)
        (stack.state_dir / "demo" / "summary.json").write_text(json.dumps(summary, indent=2) + "\n")
        print_summary(summary, stack)
        say(f"total {time.monotonic() - t_start:.0f} s")
        if args.keep:
            say("--keep: the stack stays up; `make stop` (python -m iris_devstack.demo stop) ends it")
            return 0
        # A red night (a frame or the nightly calibrations failed) is a failed demo.
        return 0 if not summary["failed"] and nightly_state == "success" else 1
    finally:
        if not args.keep:
            say("stopping the stack")
            killed = stack.stop()
            left = stack.leftovers()
            say(f"stopped (SIGKILLed {len(killed)}, leftovers {len(left)})")


def cmd_serve(args: argparse.Namespace) -> int:
    stack = Stack(args.state_dir)
    cfg = stack.start(**start_kwargs(args))
    print(f"Airflow UI {cfg.api_url}/  operations {cfg.api_url}/iris-ops/", flush=True)
    print(f"login: {login_hint(stack)}", flush=True)
    print("components are supervised (restarted when they die); `python -m iris_devstack.stack "
          "status` shows them", flush=True)
    print(f"landing area {stack.env()['IRIS_LANDING']}  — Ctrl-C stops everything", flush=True)
    stop = {"now": False}

    def _on_signal(signum, frame):  # noqa: ARG001
        stop["now"] = True

    signal.signal(signal.SIGTERM, _on_signal)
    signal.signal(signal.SIGINT, _on_signal)
    try:
        while not stop["now"]:
            time.sleep(1.0)
            if stack.supervisor_process() is None:
                print("the stack's supervisor exited; see "
                      f"{stack.logs_dir / 'supervisor.log'}", file=sys.stderr)
                return 1
    finally:
        stack.stop()
        print(f"stopped; leftovers: {[p.pid for p in stack.leftovers()]}", flush=True)
    return 0


def cmd_stop(args: argparse.Namespace) -> int:
    stack = Stack(args.state_dir)
    killed = stack.stop()
    left = stack.leftovers()
    print(f"stopped (SIGKILLed {len(killed)}); leftovers: {[p.pid for p in left]}")
    return 1 if left else 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m iris_devstack.demo", description=__doc__.split("\n")[0])
    parser.add_argument("--state-dir", default=None, help="default: $IRIS_STATE_DIR or <repo>/var")
    parser.add_argument("-v", "--verbose", action="store_true")
    sub = parser.add_subparsers(dest="cmd", required=True)
    p_run = sub.add_parser("run", help="the whole demo (default small night, a few minutes)")
    add_start_options(p_run)
    p_run.add_argument("--size", type=int, default=1024, help="detector size in pixels (default 1024)")
    p_run.add_argument("--frames", type=int, default=3, help="frames per OBSNAME (default 3)")
    p_run.add_argument("--cadence", type=float, default=8.0,
                       help="seconds between successive exposures landing (default 8)")
    p_run.add_argument("--detectors", default="IMG1,IFS", help="comma list (default IMG1,IFS)")
    p_run.add_argument("--ifs-modes", default="LENSLET", help="LENSLET,SLICER (default LENSLET)")
    p_run.add_argument("--seed", type=int, default=0)
    p_run.add_argument("--timeout", type=float, default=1200.0, help="seconds to wait for processing")
    p_run.add_argument("--keep", action="store_true", help="leave the stack running at the end")
    p_run.add_argument("--no-reset", action="store_true",
                       help="keep the previous run's ledger, store and Airflow DB (default: start empty)")
    p_run.set_defaults(handler=cmd_run)
    p_serve = sub.add_parser("serve", help="start the stack and keep it up until Ctrl-C")
    add_start_options(p_serve)
    p_serve.set_defaults(handler=cmd_serve)
    p_stop = sub.add_parser("stop", help="stop a running stack")
    p_stop.set_defaults(handler=cmd_stop)
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO if args.verbose else logging.WARNING,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    try:
        return int(args.handler(args) or 0)
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130
    except StackError as exc:
        print(f"demo: error: {exc}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())

__all__ = ["main"]
