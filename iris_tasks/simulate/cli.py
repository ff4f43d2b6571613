"""``iris-drs simulate night|references|frame``: synthetic IRIS data from the command line."""

from __future__ import annotations

import argparse
import datetime as dt
import json
import sys
import time

from ..metadata import DETECTORS, RECIPES


def _detectors(text: str) -> list[str]:
    names = [t.strip().upper() for t in text.split(",") if t.strip()]
    bad = [n for n in names if n not in DETECTORS]
    if bad or not names:
        raise argparse.ArgumentTypeError(f"detectors must be a comma list of {', '.join(DETECTORS)}")
    return names


def _night(text: str) -> str:
    try:
        return dt.date.fromisoformat(text).isoformat()
    except ValueError:
        raise argparse.ArgumentTypeError(f"night {text!r} is not YYYY-MM-DD") from None


def _size(text: str) -> int:
    value = int(text)
    if not 16 <= value <= 4096:
        raise argparse.ArgumentTypeError("size must be in [16, 4096]")
    return value


def _common(p: argparse.ArgumentParser, size_default: int = 1024) -> None:
    p.add_argument("--size", type=_size, default=size_default,
                   help=f"detector size in pixels, square, incl. the 4-pixel reference border "
                        f"(default {size_default}; 4096 = real H4RG-10)")
    p.add_argument("--seed", type=int, default=0, help="random seed (default 0): same seed, same data")
    p.add_argument("--channels", type=int, default=32, choices=(32, 64), help="output channels (default 32)")


def _exposure(p: argparse.ArgumentParser) -> None:
    p.add_argument("--reads", type=int, default=10, help="reads per ramp (default 10)")
    p.add_argument("--ramps", type=int, default=1, help="ramps per exposure (default 1)")
    p.add_argument("--read-time", type=float, default=1.4, help="seconds per read (default 1.4)")
    p.add_argument("--sampmode", choices=("UTR", "CDS", "MCDS"), default="UTR",
                   help="sampling mode (default UTR; CDS forces 2 reads)")


def _nonnegative(text: str) -> float:
    value = float(text)
    if not (value >= 0 and value < float("inf")):
        raise argparse.ArgumentTypeError(f"{text!r} is not a finite number >= 0")
    return value


def _ifs(p: argparse.ArgumentParser, flexure: bool = True) -> None:
    p.add_argument("--ifs-optics", choices=("realistic", "ideal"), default="realistic",
                   help="IFS model: realistic (as-built distortion, non-linear dispersion, "
                        "core+halo PSF, flexure; default) or ideal (the design with the "
                        "extraction's own Gaussian model; writes truth-derived ifstrace "
                        "references; for unit tests only)")
    if not flexure:
        return
    p.add_argument("--no-flexure", action="store_true",
                   help="realistic optics without flexure between exposures")
    p.add_argument("--flexure-rms", type=_nonnegative, default=0.1,
                   help="slow flexure wander per axis, pixels (default 0.1)")
    p.add_argument("--flexure-drift", type=_nonnegative, default=0.04,
                   help="flexure drift through the night, pixels per hour (default 0.04)")
    p.add_argument("--flexure-jumps", type=_nonnegative, default=1.0,
                   help="expected sudden flexure jumps per night, ~0.12 px each (default 1)")


def _flexure(args: argparse.Namespace) -> dict:
    return {"flexure": not args.no_flexure, "flexure_rms": args.flexure_rms,
            "flexure_drift": args.flexure_drift, "flexure_jumps": args.flexure_jumps}


def register_cli(subparsers) -> None:
    p = subparsers.add_parser("simulate", help="synthetic IRIS raw data, references and truth",
                              description="Simulate IRIS H4RG-10 data with saved truth "
                                          "(see docs/simulate.md).")
    sub = p.add_subparsers(dest="simulate_command", metavar="WHAT")
    sub.required = True

    n = sub.add_parser("night", help="a whole night: darks, flats, sky, science (+ IFS) with truth")
    n.add_argument("--out", required=True, help="output directory (raw/, references/, truth/, manifest.json)")
    _common(n)
    _exposure(n)
    n.add_argument("--detectors", type=_detectors, default=list(DETECTORS),
                   help="comma list, e.g. IMG1,IFS (default all five)")
    n.add_argument("--night", type=_night, default=None, help="YYYY-MM-DD (default: tonight)")
    n.add_argument("--darks", type=int, default=5, help="darks per detector / IFS mode (default 5)")
    n.add_argument("--flats", type=int, default=3, help="flats per filter (default 3)")
    n.add_argument("--sky", type=int, default=2, help="sky frames (default 2)")
    n.add_argument("--science", type=int, default=2, help="science frames (default 2)")
    n.add_argument("--imager-standards", type=int, default=1,
                   help="imager standards IMG1-TEL (A0V, 17 mag in the science filter, airmass "
                        "1.2) from which the nightly build measures the zero point (default 1; "
                        "needs --size >= 96)")
    n.add_argument("--airmass", type=float, default=1.2,
                   help="airmass (header AIRMASS) of the science, sky and IFS standard frames "
                        "(default 1.2)")
    n.add_argument("--ifs-standard-airmass", type=float, default=None,
                   help="airmass of the IFS standards (default: --airmass)")
    n.add_argument("--no-ifs-atmosphere", action="store_true",
                   help="IFS science from the scene's e-/s source with its fixed absorption "
                        "bands instead of through the standards' atmosphere")
    n.add_argument("--no-references", action="store_true", help="do not write the pre-night references")
    n.add_argument("--pa", type=float, default=0.0,
                   help="position angle of detector +Y, deg east of north (default 0)")
    _ifs(n)
    n.set_defaults(handler=run_night)

    r = sub.add_parser("references", help="pre-night reference files (mask, saturation, linearity, "
                                          "readnoise, gain, dark, flat; ifstrace with "
                                          "--ifs-optics ideal) from the truth")
    r.add_argument("--out", required=True, help="output directory")
    _common(r)
    r.add_argument("--detectors", type=_detectors, default=list(DETECTORS), help="comma list (default all)")
    r.add_argument("--useafter", default="2020-01-01T00:00:00", help="USEAFTER (default 2020-01-01T00:00:00)")
    r.add_argument("--readpatt", default="UTR10", help="comma list of dark READPATTs (default UTR10)")
    r.add_argument("--filters", default="Ks,H", help="imager flat filters (default Ks,H)")
    r.add_argument("--ifs-filter", default="Kbb", help="IFS filter (default Kbb)")
    _ifs(r, flexure=False)
    r.set_defaults(handler=run_references)

    f = sub.add_parser("frame", help="one raw frame (for feeding a landing area)")
    f.add_argument("--obsname", required=True, choices=sorted(RECIPES), metavar="OBSNAME",
                   help=f"one of {', '.join(RECIPES)}")
    f.add_argument("--detector", required=True, choices=DETECTORS)
    f.add_argument("--out", required=True, help="output file, or a directory (standard name)")
    _common(f)
    _exposure(f)
    f.add_argument("--exp-no", type=int, default=1, help="EXP_NO (default 1; also picks the dither)")
    f.add_argument("--filter", default=None, help="filter (default Ks imager, Kbb IFS)")
    f.add_argument("--ifsscale", default=None, help="IFS spaxel scale in mas (default 4 lenslet, 25 slicer)")
    f.add_argument("--night", type=_night, default=None,
                   help="place the exposure in this night (default: start now)")
    f.add_argument("--truth", default=None, help="write the frame's truth JSON here")
    f.add_argument("--pa", type=float, default=0.0,
                   help="position angle of detector +Y, deg east of north (default 0)")
    f.add_argument("--lamps", default=None,
                   help="arc lamps of an IFS IDP (arc) frame, comma list of Ar,Kr,Ne,Xe "
                        "(default all four); flats always use CONT")
    _ifs(f)
    f.set_defaults(handler=run_frame)


class _Progress:
    """A single self-overwriting progress line on stderr for long ramps (tty only)."""

    def __init__(self) -> None:
        self.tty = sys.stderr.isatty()
        self.last = 0.0

    def __call__(self, fraction: float, text: str) -> None:
        now = time.monotonic()
        if self.tty and (now - self.last > 0.5 or fraction >= 1.0):
            self.last = now
            end = "\n" if fraction >= 1.0 else ""
            print(f"\r  {100 * fraction:5.1f}% {text}   ", end=end, file=sys.stderr, flush=True)


def run_night(args: argparse.Namespace) -> int:
    from .night import NightPlan, simulate_night

    plan = NightPlan(n_dark=args.darks, n_flat=args.flats, n_sky=args.sky, n_science=args.science,
                     n_imager_telluric=args.imager_standards, pa=args.pa, airmass=args.airmass,
                     ifs_standard_airmass=args.ifs_standard_airmass,
                     ifs_atmosphere=not args.no_ifs_atmosphere)
    t0 = time.perf_counter()
    manifest = simulate_night(args.out, size=args.size, nreads=args.reads, detectors=args.detectors,
                              seed=args.seed, night=args.night, read_time=args.read_time,
                              sampmode=args.sampmode, nramps=args.ramps, plan=plan,
                              references=not args.no_references, nchan=args.channels,
                              report=lambda line: print(line, file=sys.stderr, flush=True),
                              progress=_Progress() if args.size >= 2048 else None,
                              ifs_optics=args.ifs_optics, flexure=_flexure(args))
    print(json.dumps({"out": args.out, "night": manifest["night"], "frames": len(manifest["files"]),
                      "references": len(manifest["references"]),
                      "seconds": round(time.perf_counter() - t0, 1)}))
    return 0


def run_references(args: argparse.Namespace) -> int:
    from .references import write_reference_files

    configs = [("LENSLET", "4", args.ifs_filter), ("SLICER", "25", args.ifs_filter)]
    paths = write_reference_files(args.out, args.detectors, args.size, args.seed, args.useafter,
                                  readpatts=[p.strip() for p in args.readpatt.split(",") if p.strip()],
                                  imager_filters=[f.strip() for f in args.filters.split(",") if f.strip()],
                                  ifs_configs=configs, nchan=args.channels,
                                  ifs_optics=args.ifs_optics)
    for path in paths:
        print(path)
    return 0


def run_frame(args: argparse.Namespace) -> int:
    from .night import simulate_frame

    path, truth = simulate_frame(args.out, args.obsname, args.detector, size=args.size,
                                 nreads=args.reads, nramps=args.ramps, read_time=args.read_time,
                                 sampmode=args.sampmode, seed=args.seed, exp_no=args.exp_no,
                                 filter_name=args.filter, ifsscale=args.ifsscale, night=args.night,
                                 truth_path=args.truth, nchan=args.channels, pa=args.pa,
                                 progress=_Progress(), ifs_optics=args.ifs_optics,
                                 flexure=_flexure(args), lamps=args.lamps)
    print(path)
    return 0
