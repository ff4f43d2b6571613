"""``iris-drs info FILE``: what a file is and whether its metadata is valid."""

from __future__ import annotations

import argparse
import json

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
    from astropy.io import fits

    from .metadata import MetadataError, validate_file

    with fits.open(path, memmap=True) as hdul:
        header = hdul[0].header
        info: dict = {"file": path, "headers": {k: header[k] for k in KEY_HEADERS if k in header},
                      "extensions": [(h.name, h.shape if hasattr(h, "shape") else None) for h in hdul]}
        is_raw = header.get("DATAMODL", "RampModel") == "RampModel" and "REFTYPE" not in header
        provenance = {k: header[k] for k in header if k.startswith(("R_", "S_"))}
    info["provenance"] = provenance
    if is_raw:
        try:
            recipe = validate_file(path)
            info["valid"] = True
            info["recipe"] = {"kind": recipe.kind, "mode": recipe.mode, "stages": list(recipe.stages),
                              "nightly": recipe.nightly}
        except MetadataError as exc:
            info["valid"] = False
            info["problems"] = [f"{k}: {m}" for k, m in exc.problems]
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
                print("  valid     = " + ("yes" if info["valid"] else "NO"))
                for problem in info.get("problems", []):
                    print(f"    - {problem}")
                if info.get("recipe"):
                    r = info["recipe"]
                    print(f"  recipe    = {r['kind']} ({r['mode']}): {' -> '.join(r['stages'])}")
        if info.get("valid") is False:
            status = 2
    return status
