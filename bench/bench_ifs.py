"""Benchmark: IFS cube extraction (iris_tasks.ifs) of a full-size lenslet and slicer frame.

    .venv/bin/python bench/bench_ifs.py [--size 4096] [--modes LENSLET,SLICER] [--seed 0]

For each mode: the simulator's point-source science scene projected through its trace
(``project_cube``), Gaussian shot + read noise, as a ``_rate`` ImageModel in DN/s. Timed:

* ``geometry`` - design matrix of the trace (cached per trace in a worker);
* ``extract`` - weights, blocks, CG solve(s), errors (``extract()``, one model reweighting);
* ``step cold`` / ``step warm`` - ``ExtractCubeStep`` end to end (gain, throughput, DQ, WCS,
  CubeModel) without / with the geometry cached.

Each time is also given as a ratio to a numpy copy of the same frame measured in the same run,
so runs on a loaded shared machine stay comparable. Prints only; asserts nothing. The
real-time budget is a reduced cube <= 60 s after the raw frame lands (readout included).
"""

from __future__ import annotations

import argparse
import logging
import resource
import time

import numpy as np

from iris_tasks import datamodels as dm
from iris_tasks.ifs.extract import build_geometry, extract
from iris_tasks.ifs.extract_step import ExtractCubeStep, clear_geometry_cache
from iris_tasks.simulate import build_scene, build_trace, project_cube

SCALE = {"LENSLET": "4", "SLICER": "25"}
GAIN = 2.0
READ_VAR = 0.5  # (e-/s)^2: ~9 e- read noise, UTR10 at 1.4 s
POISSON = 1.2 / 12.6  # Poisson variance per e-/s for a 12.6 s ramp


def copy_time(frame: np.ndarray, repeat: int = 5) -> float:
    best = float("inf")
    for _ in range(repeat):
        t0 = time.perf_counter()
        frame.copy()
        best = min(best, time.perf_counter() - t0)
    return best


def rss_gb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1e6


def rate_model(mode: str, electrons: np.ndarray, rng: np.random.Generator):
    image = electrons + rng.normal(size=electrons.shape) * np.sqrt(READ_VAR + POISSON * electrons)
    data = (image / GAIN).astype(np.float32)
    vp = (np.maximum(image, 0) * POISSON / GAIN**2).astype(np.float32)
    vr = np.full(data.shape, READ_VAR / GAIN**2, np.float32)
    m = dm.ImageModel(data=data, err=np.sqrt(vp + vr), dq=np.zeros(data.shape, np.uint32),
                      var_poisson=vp, var_rnoise=vr)
    meta = m.meta
    meta.instrument.name, meta.instrument.detector = "IRIS", "IFS"
    meta.instrument.filter, meta.instrument.ifsmode = "Kbb", mode
    meta.instrument.ifsscale = SCALE[mode]
    meta.exposure.gain = GAIN
    meta.pointing.ra, meta.pointing.dec, meta.pointing.pa = 150.1, 2.2, 0.0
    meta.filename = f"bench_{mode}_rate.fits"
    return m, image


def trace_model(trace, mode: str, size: int):
    ref = trace.to_model()
    meta = ref.meta
    meta.instrument.name, meta.instrument.detector = "IRIS", "IFS"
    meta.instrument.filter, meta.instrument.ifsmode = "Kbb", mode
    meta.instrument.ifsscale = SCALE[mode]
    meta.subarray.xsize = meta.subarray.ysize = size
    meta.reftype, meta.filename = "IFSTRACE", f"bench_{mode}_ifstrace.fits"
    return ref


def bench_mode(mode: str, size: int, seed: int) -> None:
    rng = np.random.default_rng(seed)
    t0 = time.perf_counter()
    trace = build_trace(mode, size, "Kbb", SCALE[mode], seed)
    scene = build_scene(trace, seed)
    electrons = project_cube(trace, scene.cube("science"), (size, size)).astype(np.float64)
    t_sim = time.perf_counter() - t0
    rate, image = rate_model(mode, electrons, rng)
    copy = copy_time(rate.data)
    nw, ny_s, nx_s = trace.cube_shape
    print(f"\n{mode} {size}x{size}: cube {nw} x {ny_s} x {nx_s} = {nw * ny_s * nx_s:,} unknowns "
          f"(simulated in {t_sim:.1f} s); numpy copy of the frame {copy * 1e3:.1f} ms")

    def row(label: str, seconds: float, extra: str = "") -> None:
        print(f"  {label:<22s} {seconds:8.2f} s   {seconds / copy:9.0f} x copy   {extra}")

    t0 = time.perf_counter()
    geom = build_geometry(trace.trace_x, trace.trace_y, trace.psf_sigma, (size, size))
    row("geometry", time.perf_counter() - t0)
    t0 = time.perf_counter()
    vp = POISSON * np.maximum(image, 0)
    res = extract(geom, image, READ_VAR + vp, np.ones((size, size), bool),
                  read_variance=np.full((size, size), READ_VAR), poisson_coef=POISSON, reweight=1)
    tt = res.timings
    row("extract", time.perf_counter() - t0,
        f"setup {tt['setup']:.2f} s, solve {tt['solve']:.2f} s ({res.iterations} CG its), "
        f"errors {tt['variance']:.2f} s")
    truth = ((scene.source_spectrum * scene.transmission)[:, None, None] * scene.source_profile[None]
             + scene.sky[:, None, None])
    pull = (res.flux / trace.throughput[None] - truth) / np.sqrt(res.variance / trace.throughput[None] ** 2)
    print(f"  {'':22s} pulls vs truth: mean {pull.mean():+.3f}, rms {pull.std():.3f}")
    del geom, res, pull
    ref = trace_model(trace, mode, size)
    clear_geometry_cache()
    for label in ("step cold", "step warm"):
        t0 = time.perf_counter()
        cube = ExtractCubeStep.call(rate, override_ifstrace=ref, gain_source="header",
                                    configure_log=False)
        row(label, time.perf_counter() - t0, f"-> {cube.data.shape} {cube.meta.bunit_data}")
        del cube
    clear_geometry_cache()
    print(f"  peak RSS so far {rss_gb():.1f} GB")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--size", type=int, default=4096)
    ap.add_argument("--modes", default="LENSLET,SLICER")
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args()
    logging.basicConfig(level=logging.WARNING)
    for name in ("stpipe", "iris_tasks", "CRDS"):  # the steps log per call at INFO
        logging.getLogger(name).setLevel(logging.WARNING)
        logging.getLogger(name).propagate = False
    for mode in args.modes.split(","):
        bench_mode(mode.strip().upper(), args.size, args.seed)


if __name__ == "__main__":
    main()
