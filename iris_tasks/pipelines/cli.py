"""``iris-drs readout|reduce|masters|strun``: the reduction commands (see docs/reduction.md).

They select references from the CRDS cache of the state the main CLI chose (the CLI's own
state unless ``--operational``; docs/cli.md). Without ``--context`` that cache's operational
context is used, and a cache into which nothing was published stops the command with one
line saying to run ``iris-drs calib publish`` first. Each product is recorded as an
OpenLineage event in the state's ``lineage/`` (raw frame + references -> product), so
``iris-drs lineage PRODUCT`` answers for CLI products as for the stack's.
"""

from __future__ import annotations

import argparse
import logging
import os
from collections.abc import Iterable, Sequence
from pathlib import Path

log = logging.getLogger(__name__)

JOB = "iris-drs"


def register_cli(subparsers) -> None:
    p = subparsers.add_parser("readout", help="stage 1: raw ramp -> _rate image")
    p.add_argument("raw", help="raw ramp FITS file")
    p.add_argument("-o", "--output", help="output file (default: <root>_rate.fits beside the input)")
    p.add_argument("--mode", choices=("auto", "utr", "cds", "mcds"), default="auto",
                   help="ramp fit (default: from SAMPMODE)")
    p.add_argument("--context", help="CRDS context for the references (default: operational)")
    p.add_argument("--no-validate", action="store_true", help="skip the raw header validation")
    p.set_defaults(handler=_readout)

    p = subparsers.add_parser("reduce", help="reduce a frame or a directory by recipe (OBSNAME)")
    p.add_argument("path", help="raw or _rate FITS file, or a directory of them")
    p.add_argument("--out", required=True, help="output directory")
    p.add_argument("--context", help="CRDS context for the references (default: operational)")
    p.add_argument("--sky", choices=("auto", "frames", "model"), default="auto",
                   help="background: sky frames (error if none), a 2-D model, or frames when found")
    p.add_argument("--sky-file", action="append", default=[], metavar="FILE",
                   help="sky frame for imager science (repeatable; default: matching IMG1-SKY in the directory)")
    p.add_argument("--no-masters", action="store_true",
                   help="in a directory, do not combine nightly darks/flats into masters")
    p.set_defaults(handler=_reduce)

    p = subparsers.add_parser("masters", help="build master darks and flats from a directory")
    p.add_argument("directory", help="directory with a night's dark/flat frames (raw or _rate)")
    p.add_argument("--out", required=True, help="output directory")
    p.add_argument("--context", help="CRDS context for stage 1 and the flats' dark")
    p.add_argument("--publish", action="store_true",
                   help="publish the masters as a new CRDS context "
                        "(in the cache of the chosen state)")
    p.add_argument("--description", help="CRDS delivery description (with --publish)")
    p.set_defaults(handler=_masters)

    p = subparsers.add_parser(
        "strun",
        help="run any IRIS step or pipeline, stpipe style, on the chosen state's CRDS cache",
        description="stpipe's strun with the CRDS cache of the chosen state configured, e.g. "
                    "`iris-drs strun iris_image2 x_rate.fits "
                    "--steps.flat_field.override_flat=my_flat.fits`. Everything after the step "
                    "is stpipe's (`iris-drs strun STEP --help`).")
    p.add_argument("step", help="step or pipeline alias (readout, iris_image2, iris_ifs2, "
                                "flat_field, ...), class name or ASDF config file")
    p.add_argument("step_args", nargs=argparse.REMAINDER, metavar="ARG",
                   help="input files and --parameter=value options, as for strun")
    p.set_defaults(handler=_strun)


# -- lineage of CLI products ----------------------------------------------------------------
def _record(args: argparse.Namespace, job: str, inputs: Iterable[str | os.PathLike[str]],
            product: Path) -> None:
    """One lineage event for a product of this command: its inputs, plus the references and
    context its header names (R_*, CRDS_CTX). A failure to record never fails the reduction.

    Only under ``iris-drs`` itself, which has chosen (and printed) the state the event goes
    to; a handler called directly from Python writes no event into whatever state the
    environment happens to name."""
    from .. import lineage

    if getattr(args, "state_choice", None) is None:
        return
    try:
        refs: list[str] = []
        if product.suffix.lower() in (".fits", ".fit"):
            refs = list(lineage.reference_uris(lineage.read_provenance(product)).values())
        lineage.record([*inputs, *refs], [product], job=f"{JOB}.{job}")
    except Exception as exc:
        log.warning("lineage of %s not recorded: %s", product, exc)


def _raw_of(product: Path, inputs: Sequence[Path]) -> list[Path]:
    """The input(s) of this command that ``product`` descends from: the one named by its
    RAWFILE among the files the command was given (a set it read itself, so the name is
    unambiguous there), else all of them for a combined product (masters: PARENTS)."""
    from .. import lineage

    try:
        header = lineage.read_provenance(product)
    except Exception:
        return []
    by_name = {p.name: p for p in inputs}
    raw = str(header.get("RAWFILE") or "")
    if raw in by_name:
        return [by_name[raw]]
    parents = [n.strip() for n in str(header.get("PARENTS") or "").split(",") if n.strip()]
    return [by_name[n] for n in parents if n in by_name]


def _inputs_of(path: str | os.PathLike[str]) -> list[Path]:
    p = Path(path).resolve()
    return sorted(x for x in p.iterdir() if x.suffix.lower() == ".fits") if p.is_dir() else [p]


# -- handlers -------------------------------------------------------------------------------
def _readout(args: argparse.Namespace) -> int:
    from ..calib.cli import require_references
    from .recipes import product_path, run_readout

    require_references(args.context)
    output = args.output or product_path(args.raw, Path(args.raw).parent, "rate")
    path = run_readout(args.raw, Path(output).parent, context=args.context, mode=args.mode,
                       output=output, validate=not args.no_validate)
    _record(args, "readout", [Path(args.raw).resolve()], Path(path))
    print(path)
    return 0


def _reduce(args: argparse.Namespace) -> int:
    from ..calib.cli import require_references
    from .recipes import reduce_path

    require_references(args.context)
    inputs = _inputs_of(args.path)
    written = reduce_path(args.path, args.out, context=args.context, sky_method=args.sky,
                          sky_paths=args.sky_file, masters=not args.no_masters)
    for path in written:
        _record(args, "reduce", _raw_of(Path(path), inputs), Path(path))
        print(path)
    return 0


def _masters(args: argparse.Namespace) -> int:
    from ..calib.cli import require_references
    from .recipes import build_masters_dir

    require_references(args.context)
    inputs = _inputs_of(args.directory)
    written, context = build_masters_dir(args.directory, args.out, context=args.context,
                                         publish=args.publish, description=args.description)
    for path in written:
        _record(args, "masters", _raw_of(Path(path), inputs) or inputs, Path(path))
        print(path)
    if context:
        from .. import calib

        print(f"CRDS context: {context} (in {calib.cache_dir()})")
    return 0


def _strun(args: argparse.Namespace) -> int:
    from stpipe import Step
    from stpipe.exceptions import StpipeExitException

    from .. import calib
    from ..calib.cli import require_references

    calib.configure()  # stpipe's own CRDS path reads CRDS_PATH: point it at the chosen cache
    step_args = list(args.step_args)
    pinned = next((a.split("=", 1)[1] for a in step_args if a.startswith("--crds_context=")), None)
    if not any(a in ("-h", "--help") for a in step_args):
        require_references(pinned)
    try:
        Step.from_cmdline([args.step, *step_args])
    except StpipeExitException as exc:
        return int(exc.exit_status)
    return 0
