"""``iris-drs readout|reduce|masters``: the reduction commands (see docs/reduction.md)."""

from __future__ import annotations

import argparse
import logging

log = logging.getLogger(__name__)


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
    p.add_argument("--publish", action="store_true", help="publish the masters as a new CRDS context")
    p.add_argument("--description", help="CRDS delivery description (with --publish)")
    p.set_defaults(handler=_masters)


def _readout(args: argparse.Namespace) -> int:
    from pathlib import Path

    from .recipes import product_path, run_readout

    output = args.output or product_path(args.raw, Path(args.raw).parent, "rate")
    path = run_readout(args.raw, Path(output).parent, context=args.context, mode=args.mode,
                       output=output, validate=not args.no_validate)
    print(path)
    return 0


def _reduce(args: argparse.Namespace) -> int:
    from .recipes import reduce_path

    for path in reduce_path(args.path, args.out, context=args.context, sky_method=args.sky,
                            sky_paths=args.sky_file, masters=not args.no_masters):
        print(path)
    return 0


def _masters(args: argparse.Namespace) -> int:
    from .recipes import build_masters_dir

    written, context = build_masters_dir(args.directory, args.out, context=args.context,
                                         publish=args.publish, description=args.description)
    for path in written:
        print(path)
    if context:
        print(f"CRDS context: {context}")
    return 0
