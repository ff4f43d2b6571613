"""Cost of learning the IFS instrument model (the nightly builder), per configuration, and of
one frame's flexure fit (the real-time part).

For each mode: the realistic simulator's lamp flats (2) and arcs (one per lamp, 4), each with
its own flexure and shot + read noise, written as rate images; then, timed in this process:

* ``build_ifs_model`` on those files (trace + profile fit, wavelength + LSF fit, assembly),
* the ``flexure`` step on a science frame hours later (one core),

with a numpy copy of one detector frame (float32) timed in the same run as the machine-speed
reference. Accuracy is tests/test_ifs_model.py's business.

    .venv/bin/python bench/bench_ifs_model.py --size 4096 --modes LENSLET,SLICER
"""

from __future__ import annotations

import argparse
import datetime as dt
import os
import resource
import tempfile
import time
from pathlib import Path

os.environ.setdefault("OMP_NUM_THREADS", "1")
os.environ.setdefault("OPENBLAS_NUM_THREADS", "1")

import numpy as np  # noqa: E402

from iris_tasks.datamodels import ImageModel  # noqa: E402
from iris_tasks.ifs.flexure_step import FlexureStep  # noqa: E402
from iris_tasks.masters.ifs_model import build_ifs_model, save_ifs_model  # noqa: E402
from iris_tasks.simulate.frames import FrameFactory, FrameSpec, ramp_model  # noqa: E402

SCALE = {"LENSLET": "4", "SLICER": "25"}
PREFIX = {"LENSLET": "LEN", "SLICER": "SLI"}
LAMP = {"LENSLET": "LEN-SPX", "SLICER": "SLI-NFF"}
NIGHT = "2026-11-30"


def write_rate(factory: FrameFactory, spec: FrameSpec, path: Path,
               rng: np.random.Generator) -> None:
    """A flat-fielded ``_rate`` image of ``spec`` with UTR ramp-fit noise and its header."""
    det = factory.detector("IFS")
    illumination, _ = factory.illumination(spec)
    gain = float(det.gain_nominal)
    rate = np.asarray(illumination, np.float64) / gain
    n, t_read = spec.nreads, spec.read_time
    var_p = np.maximum(rate, 0) * 1.2 / (gain * (n - 1) * t_read)
    var_r = np.full(rate.shape, 12 * float(np.median(det.read_noise)) ** 2
                    / (n * (n * n - 1) * t_read**2))
    data = rate + rng.normal(size=rate.shape) * np.sqrt(var_p + var_r)
    ramp = ramp_model(np.zeros((1, 2, *rate.shape), np.uint16), spec, det)
    model = ImageModel(data=data.astype(np.float32),
                       err=np.sqrt(var_p + var_r).astype(np.float32),
                       dq=np.zeros(rate.shape, np.uint32), var_poisson=var_p.astype(np.float32),
                       var_rnoise=var_r.astype(np.float32))
    model.update(ramp)
    model.meta.exposure.gain = gain
    model.save(str(path))
    ramp.close()


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
    for _ in range(7):
        t0 = time.perf_counter()
        frame.copy()
        copies.append(time.perf_counter() - t0)
    copy_s = float(np.median(copies))
    print(f"IFS model bench {args.size}^2, 1 thread, {dt.date.today()}, load "
          f"{os.getloadavg()[0]:.1f}; numpy copy of one float32 frame: {copy_s * 1e3:.1f} ms")
    print("| mode | build_ifs_model: 2 flats + 4 arcs (CPU / wall) | flexure step, one science "
          "frame (CPU / wall) | peak RSS |")
    print("|---|---|---|---|")
    for mode in [m.strip().upper() for m in args.modes.split(",") if m.strip()]:
        factory = FrameFactory(size=args.size, seed=args.seed,
                               detector_overrides={"onef_rms": 0.0, "cr_rate": 0.0})
        rng = np.random.default_rng(args.seed)
        with tempfile.TemporaryDirectory(prefix="bench-ifs-model-") as tmp:
            root = Path(tmp)
            flats, arcs = [], []
            for i in (1, 2):
                flats.append(root / f"flat{i}_rate.fits")
                write_rate(factory, _spec(mode, LAMP[mode], i, 2.0 + 0.05 * i), flats[-1], rng)
            for n, lamp in enumerate(("Ar", "Kr", "Ne", "Xe"), 1):
                arcs.append(root / f"arc{lamp}_rate.fits")
                write_rate(factory, _spec(mode, f"{PREFIX[mode]}-IDP", n, 2.2 + 0.02 * n,
                                          lamps=lamp), arcs[-1], rng)
            science = root / "sci_rate.fits"
            write_rate(factory, _spec(mode, f"{PREFIX[mode]}-SCI", 1, 8.0, read_time=30.0),
                       science, rng)
            master, build_cpu, build_wall = _timed(build_ifs_model, flats, arcs,
                                                   subtract_dark=False)
            path = save_ifs_model(master, root)
            # first call builds the flexure model of the reference (once per reference)
            FlexureStep.call(str(science), override_ifstrace=str(path))
            _, flex_cpu, flex_wall = _timed(FlexureStep.call, str(science),
                                            override_ifstrace=str(path))
        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024**2
        print(f"| {mode} | {build_cpu:.1f} s / {build_wall:.1f} s "
              f"({build_cpu / copy_s:.0f}x the copy) | {flex_cpu:.2f} s / {flex_wall:.2f} s "
              f"({flex_cpu / copy_s:.0f}x) | {peak:.1f} GB |")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
