"""``iris-drs calib ...``: inspect and manage the IRIS CRDS cache.

Wired into the main CLI by listing ``"iris_tasks.calib.cli"`` in
``iris_tasks.cli.COMMAND_MODULES``; also runnable alone as ``python -m iris_tasks.calib``.
Handlers return an exit code; errors propagate as exceptions (one line on stderr via the
main CLI).
"""

from __future__ import annotations

import argparse
import json
import sys

COMMANDS_HELP = """\
commands:
  init                       create the cache if absent and print its status
  list                       contexts, oldest first, with operational/newest flags
  show [CONTEXT]             rules and references of a context (default: operational)
  history                    audit log: bootstrap, publish, pin, unpin
  publish FILE... -m TEXT    publish references as a new (operational) context
  pin CONTEXT | unpin        fix the operational context / follow the newest again
  bestref FILE [-t TYPE]     references selected for a dataset file's header
  diff OLD NEW FILE          references that change for a dataset between two contexts
  verify [CONTEXT]           check mapping checksums and reference sha1s
  sync [--store URL]         bring the cache and its object-store replica up to date with
                             each other ($IRIS_CRDS_STORE; hosts that share no disk)
"""


def register_cli(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser(
        "calib",
        help="reference files and CRDS contexts (offline cache)",
        description="Reference-file selection and publishing through CRDS (observatory 'tmt').",
        epilog=COMMANDS_HELP,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    add_arguments(parser)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--cache", metavar="DIR", default=None,
                        help="CRDS cache directory (default: through iris-drs, the CLI state's "
                             "crds/, or with --operational $IRIS_CRDS_PATH or <repo>/var/crds; "
                             "through python -m iris_tasks.calib, $IRIS_CRDS_PATH or "
                             "<repo>/var/crds)")
    sub = parser.add_subparsers(dest="calib_command", metavar="CALIB_COMMAND")
    sub.required = True

    p = sub.add_parser("init", help="create the cache if absent; print its status")
    p.set_defaults(handler=_run_init)

    p = sub.add_parser("list", help="list contexts")
    p.add_argument("--json", action="store_true")
    p.set_defaults(handler=_run_list)

    p = sub.add_parser("show", help="show a context's rules")
    p.add_argument("context", nargs="?", default=None)
    p.add_argument("--json", action="store_true")
    p.set_defaults(handler=_run_show)

    p = sub.add_parser("history", help="print the audit log")
    p.add_argument("--json", action="store_true")
    p.set_defaults(handler=_run_history)

    p = sub.add_parser("publish", help="publish reference files as a new context")
    p.add_argument("files", nargs="+")
    p.add_argument("-m", "--description", required=True, help="why (kept in the context and the log)")
    p.add_argument("--author", default=None)
    p.add_argument("--dry-run", action="store_true", help="plan only; write nothing")
    p.set_defaults(handler=_run_publish)

    p = sub.add_parser("pin", help="pin the operational context")
    p.add_argument("context")
    p.set_defaults(handler=_run_pin)

    p = sub.add_parser("unpin", help="operational context follows the newest again")
    p.set_defaults(handler=_run_unpin)

    p = sub.add_parser("bestref", help="references selected for a dataset file")
    p.add_argument("file", help="FITS file whose primary header is matched")
    p.add_argument("-t", "--reftype", action="append", dest="reftypes",
                   help="type to select (repeatable; default: all)")
    p.add_argument("--context", default=None)
    p.set_defaults(handler=_run_bestref)

    p = sub.add_parser("diff", help="what changes for a dataset between two contexts")
    p.add_argument("old")
    p.add_argument("new")
    p.add_argument("file")
    p.add_argument("-t", "--reftype", action="append", dest="reftypes")
    p.set_defaults(handler=_run_diff)

    p = sub.add_parser("verify", help="check checksums of mappings and references")
    p.add_argument("context", nargs="?", default=None)
    p.set_defaults(handler=_run_verify)

    p = sub.add_parser("sync", help="pull the object-store replica's new contexts, push this "
                                    "cache's (IRIS_CRDS_STORE)")
    p.add_argument("--store", default=None,
                   help="store URL of the replica (default $IRIS_CRDS_STORE)")
    p.set_defaults(handler=_run_sync)


def _calib(args: argparse.Namespace):
    from iris_tasks import calib

    calib.configure(args.cache)
    return calib


def _run_init(args: argparse.Namespace) -> int:
    calib = _calib(args)
    print(json.dumps(calib.cache_status(), indent=2))
    return 0


def _run_list(args: argparse.Namespace) -> int:
    calib = _calib(args)
    if args.json:
        print(json.dumps({"contexts": calib.list_contexts(), **calib.cache_status()}, indent=2))
    else:
        print(calib.format_contexts())
    return 0


def _run_show(args: argparse.Namespace) -> int:
    calib = _calib(args)
    if args.json:
        print(json.dumps(calib.describe_context(args.context), indent=2))
    else:
        print(calib.show(args.context))
    return 0


def _run_history(args: argparse.Namespace) -> int:
    calib = _calib(args)
    for event in calib.context_history():
        if args.json:
            print(json.dumps(event, sort_keys=True))
        else:
            what = event.get("description") or event.get("previous", "")
            refs = ", ".join(r["name"] for r in event.get("references", []))
            print(f"{event['time']}  {event['event']:9s} {event['context']:14s} "
                  f"op={event.get('operational_context', '')}  {event.get('user', '')}  {what}"
                  + (f"  [{refs}]" if refs else ""))
    return 0


def _run_publish(args: argparse.Namespace) -> int:
    calib = _calib(args)
    before = calib.newest_context()
    name = calib.publish_references(args.files, args.description, author=args.author,
                                    dry_run=args.dry_run)
    status = calib.cache_status()
    if name == before:
        print(f"nothing new: {name} already selects these references")
        return 0
    verb = "would create" if args.dry_run else "published"
    print(f"{verb} {name} in {status['cache_dir']}; its operational context is "
          f"{status['operational']}" + (" (pinned)" if status["pinned"] else ""))
    return 0


def _replicated(change):
    """Run a pointer ``change`` on the newest state of a replicated cache and share it
    (``IRIS_CRDS_STORE``: pull, change, push); just run it otherwise."""
    from . import replica

    store = replica.replica_store()
    if store is not None:
        replica.pull(store)
    result = change()
    if store is not None:
        replica.push(store)
    return result


def _run_sync(args: argparse.Namespace) -> int:
    from ..storage import open_store
    from . import replica

    calib = _calib(args)
    store = open_store(args.store) if args.store else replica.replica_store()
    if store is None:
        raise calib.CalibrationError("no replica: give --store URL or set IRIS_CRDS_STORE")
    pulled = replica.pull(store)
    pushed = replica.push(store)
    print(json.dumps({"store": replica.where(store), "pulled": pulled, "uploaded": len(pushed["uploaded"]),
                      "operational": pushed["context"]}))
    return 0


def _run_pin(args: argparse.Namespace) -> int:
    calib = _calib(args)
    target = _replicated(lambda: calib.set_operational_context(args.context))
    print(f"operational context pinned at {target}")
    return 0


def _run_unpin(args: argparse.Namespace) -> int:
    calib = _calib(args)
    print(f"operational context follows the newest: {_replicated(calib.unpin)}")
    return 0


def require_references(context: str | None = None) -> str:
    """The context a reduction will use (``context``, default the operational one), checked
    to select at least one reference; otherwise one :class:`CalibrationError` line that says
    what to do. A fresh cache holds only the empty bootstrap context, and a reduction on it
    would fail deep inside the first step with "no mask reference for ..."."""
    from iris_tasks import calib
    from iris_tasks.calib import cache

    calib.cache_dir()
    name = calib.resolve_context(context)
    if cache.reference_names(name):
        return name
    raise calib.CalibrationError(
        f"the CRDS cache {calib.cache_dir()} has no references in context {name}"
        + (" (its operational context; nothing was published into it yet)"
           if context is None else "")
        + ": run `iris-drs calib publish REFERENCE.fits... -m TEXT` first (e.g. a simulated "
        "night's references/*.fits), or give --operational to use the stack's cache")


def _header(path: str) -> dict:
    from astropy.io import fits

    return dict(fits.getheader(path, 0))


def _run_bestref(args: argparse.Namespace) -> int:
    calib = _calib(args)
    reftypes = args.reftypes or sorted(calib.REFTYPES)
    context = calib.resolve_context(args.context)
    status = 0
    print(f"context {context}")
    for reftype in reftypes:
        try:
            path = calib.get_reference(_header(args.file), reftype, context=context)
            print(f"  {reftype:10s} {path}")
        except calib.CalibrationError as exc:
            print(f"  {reftype:10s} -- {exc}")
            status = 2
    return status


def _run_diff(args: argparse.Namespace) -> int:
    calib = _calib(args)
    reftypes = args.reftypes or sorted(calib.REFTYPES)
    old, new = calib.resolve_context(args.old), calib.resolve_context(args.new)
    changes = calib.references_changed(_header(args.file), old, new, reftypes)
    if not changes:
        print(f"no reference changes for {args.file} between {old} and {new}")
    for reftype, (before, after) in changes.items():
        print(f"  {reftype:10s} {before or '(none)'} -> {after or '(none)'}")
    return 0


def _run_verify(args: argparse.Namespace) -> int:
    calib = _calib(args)
    problems = calib.verify_cache(args.context)
    for problem in problems:
        print(problem)
    if not problems:
        print(f"ok: {calib.cache_dir()}")
    return 1 if problems else 0


def main(argv: list[str] | None = None) -> int:
    """Standalone entry point (``python -m iris_tasks.calib``)."""
    import logging

    parser = argparse.ArgumentParser(prog="python -m iris_tasks.calib", epilog=COMMANDS_HELP,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    add_arguments(parser)
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    try:
        return int(args.handler(args) or 0)
    except Exception as exc:
        print(f"calib {args.calib_command}: error: {exc}", file=sys.stderr)
        return 1
