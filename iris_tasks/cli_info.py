"""``iris-drs info FILE``: what a file is and whether its metadata is valid.

For a raw frame the verdict is the one the real-time chain gets
(:func:`iris_tasks.metadata.inspect_file`): exit status 2 when any file is invalid (it would
be quarantined), each problem listed under the file's name, never a traceback.
"""

from __future__ import annotations

import argparse
import json
import sys

KEY_HEADERS = (
    "INSTRUME", "DETECTOR", "DET_ID", "OBSTYPE", "OBSNAME", "EXP_NO", "SAMPMODE", "READPATT",
    "NUMREADS", "NUMRAMPS", "READTIME", "EXPTIME", "FILTER", "IFSMODE", "IFSSCALE", "DATE-OBS",
    "TIME-OBS", "RA", "DEC", "PA", "CRDS_CTX", "DATAMODL", "REFTYPE",
)


def register_cli(subparsers) -> None:
    p = subparsers.add_parser("info", help="show OBSTYPE/OBSNAME, key headers and validation of a file")
    p.add_argument("files", nargs="+", help="FITS files")
    p.add_argument("--json", action="store_true", help="machine-readable output")
    p.set_defaults(handler=run_info)


def describe(path: str) -> dict:
    """What ``path`` is, and for a raw ramp the verdict of :func:`metadata.inspect_file`.

    Never raises for what is in the file: the headers come from :mod:`iris_tasks.rawcheck`'s
    block parser (so a truncated or garbled file is described as far as it can be), and a
    raw file's validity is exactly the verdict the real-time classification gets. A file
    without a parseable primary header is judged as a raw frame (it is not a product).
    """
    from . import rawcheck
    from .metadata import MetadataError, inspect_file

    check = rawcheck.inspect_structure(path)
    header = check.values(0)
    info: dict = {"file": path, "headers": {k: header[k] for k in KEY_HEADERS if k in header},
                  "extensions": [(h.name, h.shape) for h in check.hdus],
                  "provenance": {k: v for k, v in header.items() if k.startswith(("R_", "S_"))}}
    is_raw = header.get("DATAMODL", "RampModel") == "RampModel" and "REFTYPE" not in header
    if is_raw:
        try:
            verdict = inspect_file(path)
        except MetadataError as exc:
            info["valid"] = False
            info["problems"] = [f"{k}: {m}" for k, m in exc.problems]
        else:
            recipe = verdict.recipe
            info["valid"] = True
            info["recipe"] = {"kind": recipe.kind, "mode": recipe.mode,
                              "stages": list(recipe.stages), "nightly": recipe.nightly}
            info["warnings"] = [f"{k}: {m}" for k, m in verdict.warnings]
            info["sample"] = dict(verdict.stats)
    return info


def run_info(args: argparse.Namespace) -> int:
    status = 0
    for path in args.files:
        info = describe(path)
        if args.json:
            print(json.dumps(info, default=str))
        else:
            print(f"{path}")
            for key, value in info["headers"].items():
                print(f"  {key:9s} = {value}")
            for key, value in info["provenance"].items():
                print(f"  {key:9s} = {value}")
            if "valid" in info:
                verdict = "yes" if info["valid"] else "NO (the real-time chain quarantines it)"
                print(f"  valid     = {verdict}")
                for problem in info.get("problems", []):
                    print(f"    - {problem}")
                for warning in info.get("warnings", []):
                    print(f"  warning   : {warning}")
                if info.get("recipe"):
                    r = info["recipe"]
                    print(f"  recipe    = {r['kind']} ({r['mode']}): {' -> '.join(r['stages'])}")
        if info.get("valid") is False:
            # One line on stderr too, naming the file, for scripts that only keep errors.
            print(f"iris-drs info: {path}: invalid: " + "; ".join(info["problems"]),
                  file=sys.stderr)
            status = 2
    return status
