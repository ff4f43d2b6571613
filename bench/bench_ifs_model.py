"""Cost of learning the IFS instrument model (the nightly builder), per configuration, and of
one frame's flexure fit (the real-time part).

For each mode: the realistic simulator's lamp flats (2) and arcs (one per lamp, 4), each with
its own flexure and shot + read noise, written as rate images; then, timed in this process:

* ``build_ifs_model`` on those files (trace + profile fit, wavelength + LSF fit, assembly),
* the ``flexure`` step on a science frame hours later (one core),

with a numpy copy of one detector frame (float32) timed in the same run as the machine-speed
reference. Accuracy is tests/test_ifs_model.py's business.

``--extract`` also times ``extract_cube`` on that science frame with the model just built (the
geometry built cold, then the step with it cached, as a worker reducing frame after frame),
each in a child process of its own so that its peak RSS is its own; ``--baseline REV`` runs the
same with ``iris_tasks/ifs/extract.py`` as of git revision REV first (the before/after of a
solver change in one run). ``--workdir DIR`` keeps the frames and the model there and reuses
them when present (the 4096^2 slicer model takes minutes to build).

    .venv/bin/python bench/bench_ifs_model.py --size 4096 --modes LENSLET,SLICER
    .venv/bin/python bench/bench_ifs_model.py --size 1024 --modes SLICER --extract --baseline HEAD~1
"""

from __future__ import annotations

import argparse
import contextlib
import datetime as dt
import json
import os
import resource
import subprocess
import sys
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


def _load_baseline(rev: str) -> None:
    """Make extract_cube use iris_tasks/ifs/extract.py as of git revision ``rev``."""
    import importlib.util

    from iris_tasks.ifs import extract_step

    repo = Path(__file__).resolve().parents[1]
    src = subprocess.run(["git", "show", f"{rev}:iris_tasks/ifs/extract.py"], cwd=repo,
                         check=True, capture_output=True, text=True).stdout
    tmp = Path(tempfile.mkdtemp(prefix="bench-baseline-")) / "extract.py"
    tmp.write_text(src)
    spec = importlib.util.spec_from_file_location("iris_tasks.ifs._baseline_extract", tmp)
    mod = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = mod  # the dataclasses look their module up
    try:
        spec.loader.exec_module(mod)
    finally:
        tmp.unlink()
        tmp.parent.rmdir()
    params = set(mod.extract.__code__.co_varnames[:mod.extract.__code__.co_argcount
                                                  + mod.extract.__code__.co_kwonlyargcount])

    def extract(*args, **kw):  # drop the step's parameters that the old code does not know
        return mod.extract(*args, **{k: v for k, v in kw.items() if k in params})

    extract_step.build_geometry = mod.build_geometry
    extract_step.extract = extract


def _child_extract(science: str, model: str, baseline: str | None) -> None:
    """One extraction (cold geometry + warm step) in this process; prints one JSON line."""
    import logging

    if baseline:
        _load_baseline(baseline)
    from iris_tasks.datamodels import IfsTraceModel
    from iris_tasks.ifs import extract_step as es

    runs = []

    class Grab(logging.Handler):
        def emit(self, record):
            msg = record.getMessage()
            if "CG iterations" in msg and "IFS extraction" in msg:
                runs.append(msg)

    logging.getLogger("iris_tasks.ifs").addHandler(Grab())
    logging.getLogger("iris_tasks.ifs").setLevel(logging.INFO)
    sci = ImageModel(science)
    ref = IfsTraceModel(model)
    fx = sci.meta.flexure
    shift = (fx.dx or 0.0, fx.dy or 0.0, float(np.radians(fx.rotation or 0.0)))
    _, geo_cpu, geo_wall = _timed(es.trace_geometry, ref, sci.data.shape, shift)
    cube, cpu, wall = _timed(es.ExtractCubeStep.call, sci, override_ifstrace=ref,
                             gain_source="header")
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024**2
    print(json.dumps({"geometry_cpu": geo_cpu, "geometry_wall": geo_wall, "cpu": cpu,
                      "wall": wall, "peak_gb": peak, "log": runs[-1] if runs else "",
                      "finite": float(np.isfinite(cube.data).mean())}))


def _run_extract(science: Path, model: Path, baseline: str | None) -> dict:
    cmd = [sys.executable, str(Path(__file__).resolve()), "--child-extract", str(science),
           str(model)]
    if baseline:
        cmd += ["--baseline", baseline]
    out = subprocess.run(cmd, check=True, capture_output=True, text=True).stdout
    return json.loads(out.strip().splitlines()[-1])


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--size", type=int, default=4096)
    p.add_argument("--modes", default="LENSLET,SLICER")
    p.add_argument("--seed", type=int, default=3)
    p.add_argument("--extract", action="store_true", help="also time extract_cube")
    p.add_argument("--baseline", default=None, help="git revision of extract.py to compare")
    p.add_argument("--workdir", default=None, help="keep (and reuse) frames and model here")
    p.add_argument("--child-extract", nargs=2, default=None, help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.child_extract:
        _child_extract(*args.child_extract, args.baseline)
        return 0
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
    extract_rows = []
    for mode in [m.strip().upper() for m in args.modes.split(",") if m.strip()]:
        factory = FrameFactory(size=args.size, seed=args.seed,
                               detector_overrides={"onef_rms": 0.0, "cr_rate": 0.0})
        rng = np.random.default_rng(args.seed)
        with contextlib.ExitStack() as stack:
            if args.workdir:
                root = Path(args.workdir) / f"{mode.lower()}_{args.size}"
                root.mkdir(parents=True, exist_ok=True)
            else:
                root = Path(stack.enter_context(
                    tempfile.TemporaryDirectory(prefix="bench-ifs-model-")))
            science = root / "sci_rate.fits"
            built = sorted(root.glob("*_ifstrace.fits"))
            if built and science.exists():
                path, build_cpu, build_wall = built[0], float("nan"), float("nan")
            else:
                flats, arcs = [], []
                for i in (1, 2):
                    flats.append(root / f"flat{i}_rate.fits")
                    write_rate(factory, _spec(mode, LAMP[mode], i, 2.0 + 0.05 * i), flats[-1],
                               rng)
                for n, lamp in enumerate(("Ar", "Kr", "Ne", "Xe"), 1):
                    arcs.append(root / f"arc{lamp}_rate.fits")
                    write_rate(factory, _spec(mode, f"{PREFIX[mode]}-IDP", n, 2.2 + 0.02 * n,
                                              lamps=lamp), arcs[-1], rng)
                write_rate(factory, _spec(mode, f"{PREFIX[mode]}-SCI", 1, 8.0, read_time=30.0),
                           science, rng)
                master, build_cpu, build_wall = _timed(build_ifs_model, flats, arcs,
                                                       subtract_dark=False)
                path = save_ifs_model(master, root)
                del master
            # first call builds the flexure model of the reference (once per reference)
            FlexureStep.call(str(science), override_ifstrace=str(path))
            flexed, flex_cpu, flex_wall = _timed(FlexureStep.call, str(science),
                                                 override_ifstrace=str(path))
            peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024**2
            build = ("model reused from --workdir" if build_cpu != build_cpu else
                     f"{build_cpu:.1f} s / {build_wall:.1f} s ({build_cpu / copy_s:.0f}x the copy)")
            print(f"| {mode} | {build} | {flex_cpu:.2f} s / {flex_wall:.2f} s "
                  f"({flex_cpu / copy_s:.0f}x) | {peak:.1f} GB |", flush=True)
            if args.extract:
                flexed_path = root / "sci_flexure.fits"
                flexed.save(str(flexed_path))
                del flexed
                for label, rev in (([(f"extract.py of {args.baseline}", args.baseline)]
                                    if args.baseline else []) + [("this tree", None)]):
                    r = _run_extract(flexed_path, path, rev)
                    extract_rows.append((mode, label, r))
    if extract_rows:
        print(f"\nextract_cube on the science frame ({args.size}^2, 1 thread, load "
              f"{os.getloadavg()[0]:.1f}; numpy copy {copy_s * 1e3:.1f} ms):")
        print("| mode | code | geometry (cold, CPU / wall) | step with cached geometry (CPU / "
              "wall) | peak RSS (child) | solver log |")
        print("|---|---|---|---|---|---|")
        for mode, label, r in extract_rows:
            print(f"| {mode} | {label} | {r['geometry_cpu']:.1f} s / {r['geometry_wall']:.1f} s "
                  f"| {r['cpu']:.1f} s / {r['wall']:.1f} s ({r['cpu'] / copy_s:.0f}x the copy) "
                  f"| {r['peak_gb']:.1f} GB | {r['log']} |")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
