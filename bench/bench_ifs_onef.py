"""What the readout's residual 1/f noise does to IFS cube fluxes, after the whole chain.

The instrument model is built from lamp flats and arcs (the nightly builder, as in
tests/test_ifs_model.py: rate-level calibration frames without 1/f), then a science and a sky
frame (10 reads of ``--read-time`` s, hours later, each with its own flexure) are simulated up
the ramp with the default detector (1/f noise on) or with ``onef_rms=0``, go through
``ReadoutStep`` and ``iris_ifs2`` (dq_init and dark_sub with the simulation's references,
flat_field skipped as the model was learned from unflattened lamps, destripe, flexure,
extract_cube, sky_sub with the sky frame; the step defaults unless told otherwise). Fluxes summed over the band are compared with the
source's truth (the simulator's, for scoring only): whole cube, brightest spaxel, 3x3 and
5x5 spaxels around it, as measured / truth. The first rows (no 1/f) give the chain's own
systematic factor (the PSF halo beyond the profile window, the lamp-relative throughput).

    .venv/bin/python bench/bench_ifs_onef.py --mode SLICER --read-time 30
    .venv/bin/python bench/bench_ifs_onef.py --mode SLICER --read-time 30 --background \
        --destripe-slicer          # the best configuration measured (docs/ifs.md)
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))

from test_ifs_model import LAMP, PREFIX, SCALE, _source_truth, _spec, write_rate  # noqa: E402

from iris_tasks.ifs import Ifs2Pipeline  # noqa: E402
from iris_tasks.masters.ifs_model import build_ifs_model, save_ifs_model  # noqa: E402
from iris_tasks.simulate.frames import FrameFactory  # noqa: E402
from iris_tasks.simulate.references import write_reference_files  # noqa: E402
from iris_tasks.steps import ReadoutStep  # noqa: E402

SIZE, SEED = 1024, 11


def build_model(mode: str, root: Path) -> str:
    """The builder's instrument model from two lamp flats and one arc per lamp."""
    cal = FrameFactory(size=SIZE, seed=SEED, detector_overrides={"onef_rms": 0.0, "cr_rate": 0.0})
    rng = np.random.default_rng(SEED)
    flats, arcs = [], []
    for i in (1, 2):
        spec = _spec(mode, LAMP[mode], i, 2.0 + 0.05 * i)
        flats.append(root / f"{spec.filename[:-5]}_rate.fits")
        write_rate(cal, spec, flats[-1], rng)
    for n, lamp in enumerate(("Ar", "Kr", "Ne", "Xe"), 1):
        spec = _spec(mode, f"{PREFIX[mode]}-IDP", n, 2.2 + 0.02 * n, lamps=lamp)
        arcs.append(root / f"{spec.filename[:-5]}_rate.fits")
        write_rate(cal, spec, arcs[-1], rng)
    return str(save_ifs_model(build_ifs_model(flats, arcs, subtract_dark=False), root / "model"))


def reduce(mode: str, trace: str, root: Path, onef: bool, read_time: float,
           steps_extra: dict) -> dict:
    """Science + sky up the ramp, readout, iris_ifs2; fluxes / truth."""
    factory = FrameFactory(size=SIZE, seed=SEED,
                           detector_overrides={} if onef else {"onef_rms": 0.0})
    refdir = root / ("refs_onef" if onef else "refs_no_onef")
    refs = write_reference_files(refdir, ["IFS"], SIZE, SEED,
                                 ifs_configs=((mode, SCALE[mode], "Kbb"),), factory=factory)

    def ref(kind: str) -> str:
        return str(next(p for p in refs if f"_{kind}_" in p.name))

    readout = {f"override_{k}": ref(k) for k in ("mask", "saturation", "linearity", "readnoise",
                                                 "gain")}
    rates = {}
    for kind, hour in (("SKY", 7.9), ("SCI", 8.0)):
        ramp, _ = factory.make(_spec(mode, f"{PREFIX[mode]}-{kind}", 1, hour,
                                     read_time=read_time))
        rates[kind] = root / f"{kind}_{int(onef)}_{read_time:g}_rate.fits"
        ReadoutStep.call(ramp, **readout).save(str(rates[kind]))
    steps = {"dq_init": {"override_mask": ref("mask")}, "dark_sub": {"override_dark": ref("dark")},
             "flat_field": {"skip": True},
             "destripe": {"override_ifstrace": trace},
             "flexure": {"override_ifstrace": trace},
             "extract_cube": {"override_ifstrace": trace, "gain_source": "header"}}
    for step, params in steps_extra.items():
        steps.setdefault(step, {}).update(params)
    t0 = time.perf_counter()
    cube = Ifs2Pipeline.call(str(rates["SCI"]), sky_files=[str(rates["SKY"])], steps=steps)
    wall = time.perf_counter() - t0
    data = np.where(np.isfinite(cube.data), cube.data, 0.0)
    measured = data.sum(axis=0)
    truth = _source_truth(factory, mode, np.asarray(cube.wavelength))
    j, i = np.unravel_index(np.argmax(truth), truth.shape)
    box3 = (slice(max(j - 1, 0), j + 2), slice(max(i - 1, 0), i + 2))
    box5 = (slice(max(j - 2, 0), j + 3), slice(max(i - 2, 0), i + 3))
    bkg = cube.meta.ifs_background
    return {"whole": measured.sum() / truth.sum(), "peak": measured[j, i] / truth[j, i],
            "3x3": measured[box3].sum() / truth[box3].sum(),
            "5x5": measured[box5].sum() / truth[box5].sum(),
            "bkgmeth": bkg.method, "bkgmean": bkg.lit_mean, "wall_s": wall}


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--mode", default="SLICER", choices=("SLICER", "LENSLET"))
    p.add_argument("--read-time", type=float, default=30.0, help="s per read (10 reads)")
    p.add_argument("--background", action="store_true",
                   help="extract_cube background=True (with its default row term)")
    p.add_argument("--destripe-slicer", action="store_true",
                   help="destripe modes LENSLET,SLICER (the default leaves slicer frames alone)")
    args = p.parse_args()
    extra: dict = {"extract_cube": {"background": bool(args.background)}}
    if args.destripe_slicer:
        extra["destripe"] = {"modes": "LENSLET,SLICER"}
    print(f"IFS 1/f flux bench, {args.mode} {SIZE} px, 10 x {args.read_time:g} s, seed {SEED}, "
          f"{dt.date.today()}; steps {json.dumps(extra)}")
    print("| detector | whole cube | brightest spaxel | 3x3 | 5x5 | BKGMETH / BKGMEAN | iris_ifs2 wall |")
    print("|---|---|---|---|---|---|---|")
    with tempfile.TemporaryDirectory(prefix="bench-ifs-onef-") as tmp:
        root = Path(tmp)
        trace = build_model(args.mode, root)
        for onef in (False, True):
            r = reduce(args.mode, trace, root, onef, args.read_time, extra)
            print(f"| {'1/f on (default)' if onef else 'onef_rms=0'} | {r['whole']:.4f} | "
                  f"{r['peak']:.4f} | {r['3x3']:.4f} | {r['5x5']:.4f} | {r['bkgmeth']} "
                  f"{r['bkgmean'] if r['bkgmean'] is not None else ''} | {r['wall_s']:.0f} s |",
                  flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
