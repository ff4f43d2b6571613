"""Cost of learning the IFS instrument model (the nightly builders), per configuration.

For each mode: the realistic simulator's lamp flats and one arc per lamp (with their own
flexure, shot + read noise) as rate images, then, timed in this process:

* ``fit_traces`` (trace geometry + profile from two flats),
* ``solve_wavelengths`` (wavelengths + LSF from the four arcs),

with a numpy copy of one detector frame (float32) timed in the same run as the machine-speed
reference. Prints one table; accuracy is tests/test_ifs_model.py's business.

    .venv/bin/python bench/bench_ifs_model.py --size 4096 --modes LENSLET,SLICER
"""

from __future__ import annotations

import argparse
import datetime as dt
import os
import resource
import time

os.environ.setdefault("OMP_NUM_THREADS", "1")
os.environ.setdefault("OPENBLAS_NUM_THREADS", "1")

import numpy as np  # noqa: E402

from iris_tasks.ifs.tracefit import FlatInput, fit_traces  # noqa: E402
from iris_tasks.ifs.wavecal import ArcInput, solve_wavelengths  # noqa: E402
from iris_tasks.instrument import nominal_design  # noqa: E402
from iris_tasks.instrument.lines import arc_lines  # noqa: E402
from iris_tasks.simulate.frames import FrameFactory, FrameSpec  # noqa: E402

SCALE = {"LENSLET": "4", "SLICER": "25"}
PREFIX = {"LENSLET": "LEN", "SLICER": "SLI"}
LAMP = {"LENSLET": "LEN-SPX", "SLICER": "SLI-NFF"}
NIGHT = "2026-11-30"


def _rate(factory: FrameFactory, spec: FrameSpec, rng: np.random.Generator
          ) -> tuple[np.ndarray, np.ndarray]:
    """(DN/s, variance) of a flat-fielded rate image of ``spec`` (ramp-fit level noise)."""
    det = factory.detector("IFS")
    illumination, _ = factory.illumination(spec)
    gain = float(det.gain_nominal)
    rate = np.asarray(illumination, np.float64) / gain
    t = (spec.nreads - 1) * spec.read_time
    n = spec.nreads
    var = np.maximum(rate, 0) * 1.2 / (gain * t) + 12 * float(np.median(det.read_noise)) ** 2 / (
        n * (n * n - 1) * spec.read_time**2)
    return rate + rng.normal(size=rate.shape) * np.sqrt(var), var


def _spec(mode: str, obsname: str, n: int, hour: float, **kw) -> FrameSpec:
    start = dt.datetime.fromisoformat(f"{NIGHT}T00:00:00+00:00") + dt.timedelta(hours=hour)
    return FrameSpec(detector="IFS", obsname=obsname, exp_no=n, start=start, filter="Kbb",
                     ifsscale=SCALE[mode], **kw)


def _timed(fn, *args, **kw):
    c0, w0 = time.process_time(), time.perf_counter()
    out = fn(*args, **kw)
    return out, time.process_time() - c0, time.perf_counter() - w0


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--size", type=int, default=4096)
    p.add_argument("--modes", default="LENSLET,SLICER")
    p.add_argument("--seed", type=int, default=3)
    args = p.parse_args()
    frame = np.ones((args.size, args.size), np.float32)
    copies = []
    for _ in range(5):
        t0 = time.perf_counter()
        frame.copy()
        copies.append(time.perf_counter() - t0)
    copy_s = float(np.median(copies))
    print(f"IFS model bench {args.size}^2, 1 thread, {dt.date.today()}, load "
          f"{os.getloadavg()[0]:.1f}; numpy copy of one float32 frame: {copy_s * 1e3:.1f} ms")
    print("| mode | fit_traces, 2 flats (CPU / wall) | solve_wavelengths, 4 arcs | peak RSS |")
    print("|---|---|---|---|")
    for mode in [m.strip().upper() for m in args.modes.split(",") if m.strip()]:
        factory = FrameFactory(size=args.size, seed=args.seed,
                               detector_overrides={"onef_rms": 0.0, "cr_rate": 0.0})
        rng = np.random.default_rng(args.seed)
        design = nominal_design(mode, args.size, "Kbb", SCALE[mode])
        flats = []
        for i in (1, 2):
            data, var = _rate(factory, _spec(mode, LAMP[mode], i, 2.0 + 0.05 * i), rng)
            flats.append(FlatInput(data=data, variance=var, name=f"flat{i}"))
        trace, trace_cpu, trace_wall = _timed(fit_traces, flats, design)
        del flats
        arcs = []
        for n, lamp in enumerate(("Ar", "Kr", "Ne", "Xe"), 1):
            spec = _spec(mode, f"{PREFIX[mode]}-IDP", n, 2.2 + 0.02 * n, lamps=lamp)
            data, var = _rate(factory, spec, rng)
            arcs.append(ArcInput(data=data, variance=var, good=None, name=f"arc{lamp}",
                                 lamps=(lamp,)))
        lo, hi = design.wavelength[0], design.wavelength[-1]
        lines = arc_lines(("Ar", "Kr", "Ne", "Xe"), lo - 0.02, hi + 0.02)
        _, wave_cpu, wave_wall = _timed(solve_wavelengths, arcs, trace.x_at, design, lines)
        del arcs
        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024**2
        print(f"| {mode} | {trace_cpu:.1f} s / {trace_wall:.1f} s "
              f"({trace_cpu / copy_s:.0f}x the copy) | {wave_cpu:.1f} s / {wave_wall:.1f} s "
              f"({wave_cpu / copy_s:.0f}x) | {peak:.1f} GB |")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
