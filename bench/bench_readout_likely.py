"""The covariance-aware (GLS) ramp fit against optimal weighting and stcal's LIKELY, in one run.

    .venv/bin/python bench/bench_readout_likely.py            # 256^2 x 10 reads for speed
    .venv/bin/python bench/bench_readout_likely.py --reads 30

Noise: slope variance over realizations of synthetic ramps (Poisson increments + white read
noise, gain 2, 6 DN per read) at several fluxes, for readout_cy's optimal weighting and
``readout_cy.likely.fit_slopes_gls``.  Speed: both and stcal ``ramp_fit`` with algorithm
"LIKELY" (and "OLS_C") on the same float reads, 1 thread, minimum of the repeats, with a
numpy copy of the reads as the machine-speed reference.
"""

from __future__ import annotations

import argparse
import logging
import os
import time

import numpy as np

import readout_cy as rc
from iris_tasks.datamodels.dqflags import pixel as DQ
from readout_cy.likely import fit_slopes_gls

GAIN, RN, DT = 2.0, 6.0, 1.47


def ramps(rng: np.random.Generator, flux: np.ndarray | float, nr: int, shape: tuple) -> np.ndarray:
    inc = rng.poisson(np.broadcast_to(flux, shape) * GAIN * DT, (nr - 1,) + shape) / GAIN
    y = np.concatenate([np.zeros((1,) + shape), np.cumsum(inc, axis=0)])
    return (y + rng.normal(0.0, RN, (nr,) + shape) + 1000.0).astype(np.float32)


def noise_table(nr: int, nrep: int = 60, n: int = 40) -> None:
    rng = np.random.default_rng(1)
    t = np.arange(nr) * DT
    print(f"slope variance, {nr} reads, {nrep} realizations of {n}x{n} pixels per flux")
    print(f"  {'flux DN/s':>9s} {'optimal':>9s} {'GLS':>9s} {'GLS/opt':>8s} {'ERR^2/var opt':>14s} "
          f"{'GLS':>6s}")
    for flux in (2.0, 10.0, 30.0, 100.0, 300.0, 1000.0):
        so, sg, eo, eg = [], [], [], []
        for _ in range(nrep):
            y = ramps(rng, flux, nr, (n, n))
            o = rc.fit_slopes(y, t, gain=GAIN, read_noise=RN, dqflags=DQ)
            q = fit_slopes_gls(y, t, gain=GAIN, read_noise=RN, dqflags=DQ)
            so.append(o.slope)
            sg.append(q.slope)
            eo.append(o.err)
            eg.append(q.err)
        vo = np.array(so).var(axis=0, ddof=1).mean()
        vg = np.array(sg).var(axis=0, ddof=1).mean()
        print(f"  {flux:9.1f} {vo:9.4g} {vg:9.4g} {vg / vo:8.3f} "
              f"{np.mean(np.square(eo)) / vo:14.3f} {np.mean(np.square(eg)) / vg:6.3f}")


def stcal_fit(y: np.ndarray, algorithm: str) -> None:
    from stcal.ramp_fitting import ramp_fit
    from stcal.ramp_fitting.ramp_fit_class import RampData

    nr, ny, nx = y.shape
    data = y[None].copy()
    rd = RampData()
    rd.set_arrays(data, np.zeros(data.shape, np.uint8), np.zeros((ny, nx), np.uint32),
                  np.zeros((ny, nx), np.float32))
    rd.set_meta(name="IRIS", frame_time=DT, group_time=DT, groupgap=0, nframes=1,
                drop_frames1=None)
    rd.algorithm = algorithm
    rd.set_dqflags(dict(DQ))
    rd.start_row = 0
    rd.num_rows = ny
    rd.suppress_one_group_ramps = False
    rn_cds = np.full((ny, nx), RN * np.sqrt(2.0), np.float32)
    ramp_fit.ramp_fit_data(rd, False, rn_cds, np.full((ny, nx), GAIN, np.float32), algorithm,
                           "optimal", "none")


def speed(size: int, nr: int, repeats: int) -> None:
    rng = np.random.default_rng(2)
    flux = rng.gamma(1.5, 40.0, (size, size))
    y = ramps(rng, flux, nr, (size, size))
    t = np.arange(nr) * DT
    logging.getLogger("stcal").setLevel(logging.ERROR)
    calls = {
        "numpy copy of the reads": lambda: y.copy(),
        "readout_cy fit_slopes (optimal)": lambda: rc.fit_slopes(
            y, t, gain=GAIN, read_noise=RN, dqflags=DQ, threads=1),
        "readout_cy fit_slopes_gls": lambda: fit_slopes_gls(
            y, t, gain=GAIN, read_noise=RN, dqflags=DQ),
        "stcal ramp_fit LIKELY": lambda: stcal_fit(y, "LIKELY"),
        "stcal ramp_fit OLS_C": lambda: stcal_fit(y, "OLS_C"),
    }
    best = {k: np.inf for k in calls}
    load0 = os.getloadavg()[0]
    for _ in range(repeats):
        for k, fn in calls.items():
            t0 = time.perf_counter()
            fn()
            best[k] = min(best[k], time.perf_counter() - t0)
    print(f"speed, {size}^2 x {nr} reads (fit only, no jumps), min of {repeats}, 1 thread:")
    for k, v in best.items():
        print(f"  {k:34s} {v:8.3f} s  {v / best['numpy copy of the reads']:8.0f} x copy")
    print(f"  stcal LIKELY / readout_cy GLS: {best['stcal ramp_fit LIKELY'] / best['readout_cy fit_slopes_gls']:.0f} x;"
          f" load average {load0:.1f} before, {os.getloadavg()[0]:.1f} after")


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--reads", type=int, default=10)
    ap.add_argument("--size", type=int, default=256)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--no-noise", action="store_true")
    a = ap.parse_args(argv)
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    if not a.no_noise:
        noise_table(a.reads)
    speed(a.size, a.reads, a.repeats)


if __name__ == "__main__":
    main()
