"""``iris-drs`` commands of the orchestration layer: what the DAG tasks do, without Airflow.

They act on the state the main CLI chose (:mod:`iris_tasks.cli`): the CLI's own state
directory unless ``--operational`` is given, so ``process-frame`` on a test frame writes its
own ledger, store and lineage, never the stack's (docs/cli.md). ``compute-server`` is part
of the stack and always uses its configuration. (``airflow-env`` is a command of the development
stack, added to ``iris-drs`` through the ``iris_drs.cli`` entry points; see :mod:`iris_tasks.cli`.)

* ``iris-drs process-frame RAW...`` - the whole real-time chain (claim, classify or
  quarantine, readout, reduce, quicklook, ingest) with the same ledger and store as the DAG;
* ``iris-drs ingest PATH... | --frame ID`` - store files (keys from their headers) or a frame's
  work-area products;
* ``iris-drs lineage PRODUCT`` - which raw frames and references made a product;
* ``iris-drs ledger [--frame ID | --night N]`` - what the ledger knows;
* ``iris-drs nightly NIGHT`` - gather, build, QA, publish masters (``--no-publish`` to stop
  after QA);
* ``iris-drs reprocess [--context C] [--night-from A --night-to B]`` - reprocess the frames a
  context changes;
* ``iris-drs nights [--stale]`` - which nights' products are not current under the
  operational context (:func:`.reprocess.night_states`);
* ``iris-drs compute-server`` - warm worker processes for the ``frame`` tasks
  (:mod:`.compute`).
"""

from __future__ import annotations

import argparse
import json
import sys
from typing import Any


def register_cli(subparsers: Any) -> None:
    from .. import lineage

    p = subparsers.add_parser("process-frame", help="run the real-time chain on raw frames without Airflow")
    p.add_argument("raw", nargs="+", help="raw ramp FITS files")
    p.add_argument("--no-ingest", action="store_true", help="stop before the object store")
    p.add_argument("--context", default=None, help="CRDS context (default: operational)")
    p.add_argument("--json", action="store_true", help="machine-readable output")
    p.set_defaults(handler=run_process_frame)

    p = subparsers.add_parser("ingest", help="store files or a ledger frame's products in the object store")
    p.add_argument("paths", nargs="*", help="FITS/PNG files (keys from the FITS headers)")
    p.add_argument("--frame", default=None, help="ingest this frame's work-area products instead")
    p.add_argument("--store", default=None, help="store URL (default $IRIS_STORE_URL)")
    p.add_argument("--night", default=None, help="night for files whose header lacks DATE-OBS (PNG)")
    p.add_argument("--detector", default=None)
    p.add_argument("--obsname", default=None)
    p.add_argument("--json", action="store_true")
    p.set_defaults(handler=run_ingest)

    lineage.register_cli(subparsers)

    p = subparsers.add_parser("ledger", help="show the frame ledger (frames, stages, products, alerts)")
    p.add_argument("--frame", default=None, help="one frame id")
    p.add_argument("--night", default=None, help="frames of one night")
    p.add_argument("--json", action="store_true")
    p.set_defaults(handler=run_ledger)

    p = subparsers.add_parser("nightly", help="build, QA and publish the night's master darks/flats")
    p.add_argument("night", help="observing night YYYY-MM-DD")
    p.add_argument("--no-publish", action="store_true", help="stop after QA")
    p.set_defaults(handler=run_nightly)

    p = subparsers.add_parser("reprocess", help="reprocess frames whose references a context changes")
    p.add_argument("--context", default=None, help="target context (default: operational)")
    p.add_argument("--night-from", default=None)
    p.add_argument("--night-to", default=None)
    p.add_argument("--dry-run", action="store_true", help="only list the frames and changes")
    p.add_argument("--force", action="store_true", help="reprocess even if nothing changes")
    p.set_defaults(handler=run_reprocess)

    p = subparsers.add_parser("nights", help="per night: are its products current under the operational context?")
    p.add_argument("--stale", action="store_true", help="only the stale nights (what to reprocess)")
    p.add_argument("--context", default=None, help="compare with this context (default: operational)")
    p.add_argument("--night-from", default=None)
    p.add_argument("--night-to", default=None)
    p.add_argument("--json", action="store_true")
    p.set_defaults(handler=run_nights)

    from . import compute

    p = subparsers.add_parser("compute-server", help="serve the real-time frame computation from warm workers")
    compute.add_arguments(p)
    p.set_defaults(handler=run_compute_server)


def run_compute_server(args: argparse.Namespace) -> int:
    from ..config import settings
    from .compute import serve

    return serve(args, settings_workers=settings().compute_slots)


def _print_json(obj: Any) -> None:
    print(json.dumps(obj, indent=2, default=str))


def run_process_frame(args: argparse.Namespace) -> int:
    from ..calib.cli import require_references
    from .local_run import process_paths

    # A cache with nothing published would quarantine or fail every frame, one by one.
    require_references(args.context)
    results = process_paths(args.raw, ingest=not args.no_ingest, context=args.context)
    if args.json:
        _print_json(results)
    else:
        for r in results:
            status = r.get("status")
            line = f"{r.get('filename')}: {status}"
            if status == "done":
                line += (f" in {r['latency_seconds']:.1f} s (budget {r.get('deadline_seconds'):g} s"
                         f"{', MISSED' if r.get('deadline_missed') else ''}) -> {r.get('final_path')}")
                for kind, url in (r.get("objects") or {}).items():
                    line += f"\n    {kind:9s} {url}"
            elif status == "duplicate":
                line += f" of frame {r.get('frame_id')}"
            print(line)
    return 2 if any(r.get("status") == "quarantined" for r in results) else 0


def run_ingest(args: argparse.Namespace) -> int:
    from .ingest import ingest_files, ingest_frame_dir

    if args.frame:
        out: Any = ingest_frame_dir(args.frame, store_url=args.store)
    elif args.paths:
        out = ingest_files(args.paths, store_url=args.store, night=args.night,
                           detector=args.detector, obsname=args.obsname)
    else:
        raise ValueError("give files to ingest or --frame FRAME_ID")
    if args.json:
        _print_json(out)
    else:
        items = out.get("objects", {}).items() if isinstance(out, dict) else [(o["path"], o["url"]) for o in out]
        for a, b in items:
            print(f"{a} -> {b}")
    return 0


def run_ledger(args: argparse.Namespace) -> int:
    from .ledger import open_ledger

    ledger = open_ledger()
    if args.frame:
        snap = ledger.snapshot(args.frame)
        if not snap["frames"]:
            raise KeyError(f"no frame {args.frame} in {ledger.path}")
    else:
        frames = ledger.frames(night=args.night)
        snap = {"ledger": str(ledger.path), "frames": frames}
    if args.json or args.frame:
        _print_json(snap)
        return 0
    for f in snap["frames"]:
        lat = f"{f['latency_seconds']:.1f}s" if f.get("latency_seconds") is not None else "-"
        print(f"{f['frame_id']}  {f['status']:11s} {f.get('night') or '-':10s} {f.get('obsname') or '-':9s} "
              f"{lat:>7s}{'  MISSED' if f['deadline_missed'] else ''}  {f['filename']}")
    return 0


def run_nights(args: argparse.Namespace) -> int:
    from . import reprocess
    from .nights import check_night

    lo, hi = args.night_from, args.night_to
    span = [check_night(lo or hi, what="--night-from"), check_night(hi or lo, what="--night-to")] \
        if lo or hi else None
    states = reprocess.night_states(args.context, span)
    if args.stale:
        states = [s for s in states if s["stale"]]
    if args.json:
        _print_json(states)
        return 0
    for s in states:
        others = ", ".join(f"{c}: {n}" for c, n in sorted(s["contexts"].items())) or "-"
        print(f"{s['night']}  {'STALE' if s['stale'] else 'current':7s} {s['frames']:4d} frames, "
              f"{s['current']} under {s['context']}, {s['stale_frames'] + s['unknown']} to reprocess "
              f"(others: {others})")
    return 0


def run_nightly(args: argparse.Namespace) -> int:
    from . import nightly

    gathered = nightly.gather_calibrations(args.night)
    masters = nightly.build_masters(gathered)
    reports, failed = [], 0
    for m in masters:
        try:
            reports.append(nightly.qa_master(m))
            print(f"QA passed: {m}")
        except nightly.QAError as exc:
            failed += 1
            reports.append(exc.report)
            print(f"QA FAILED: {exc}", file=sys.stderr)
    if not args.no_publish:
        published = nightly.publish_masters(reports, args.night)
        print(f"published: {published['context'] if published else 'nothing'}")
        if published:
            nightly.archive_masters([r["master"] for r in reports if r.get("passed")], args.night)
    return 1 if failed else 0


def run_reprocess(args: argparse.Namespace) -> int:
    from . import reprocess

    request = reprocess.resolve_request(
        {"context": args.context, "night_from": args.night_from, "night_to": args.night_to,
         "force": args.force})
    frames = reprocess.select_frames(request["context"], request["nights"], force=request["force"])
    for f in frames:
        print(f"{f.frame_id} {f.filename}: {f.previous_context} -> {f.target_context} "
              f"{f.changes}")
    if args.dry_run:
        return 0
    for f in frames:
        out = reprocess.reprocess_frame(f)
        for kind, url in out.get("objects", {}).items():
            print(f"    {kind:9s} {url}")
    print(f"reprocessed {len(frames)} frame(s) under {request['context']}")
    return 0
