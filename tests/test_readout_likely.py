"""readout_cy.likely.fit_slopes_gls: the covariance-aware ramp fit is unbiased, at least as
precise as optimal weighting, its ERR describes its scatter, and it leaves jumped and
saturated pixels to the segment fit."""

import numpy as np
import pytest

import readout_cy as rc
from iris_tasks.datamodels.dqflags import pixel as DQ
from readout_cy.likely import fit_slopes_gls

GAIN, RN, DT = 2.0, 6.0, 1.47


def _ramps(rng, flux, nr, shape):
    inc = rng.poisson(flux * GAIN * DT, (nr - 1,) + shape) / GAIN
    y = np.concatenate([np.zeros((1,) + shape), np.cumsum(inc, axis=0)])
    return (y + rng.normal(0.0, RN, (nr,) + shape) + 1000.0).astype(np.float32)


def test_gls_unbiased_and_at_least_as_precise_as_optimal():
    rng = np.random.default_rng(4)
    nr, flux = 30, 30.0
    t = np.arange(nr) * DT
    so, sg, eg = [], [], []
    for _ in range(30):
        y = _ramps(rng, flux, nr, (32, 32))
        so.append(rc.fit_slopes(y, t, gain=GAIN, read_noise=RN, dqflags=DQ).slope)
        q = fit_slopes_gls(y, t, gain=GAIN, read_noise=RN, dqflags=DQ)
        sg.append(q.slope)
        eg.append(q.err)
    so, sg = np.array(so, np.float64), np.array(sg, np.float64)
    vo, vg = so.var(axis=0, ddof=1).mean(), sg.var(axis=0, ddof=1).mean()
    assert vg < vo  # 30 reads at 30 DN/s: ~2.5 % smaller (bench_readout_likely.py)
    assert abs(sg.mean() - flux) < 4 * np.sqrt(vg / sg.size)
    assert np.mean(np.square(eg)) / vg == pytest.approx(1.0, abs=0.06)


def test_gls_leaves_jumps_and_saturation_to_the_segment_fit():
    rng = np.random.default_rng(5)
    nr = 8
    t = np.arange(nr) * DT
    y = _ramps(rng, 50.0, nr, (16, 16))
    y[4:, 3, 3] += 500.0  # a jump
    ng = np.full((16, 16), nr, np.uint16)
    ng[5, 5] = 4  # saturated after read 4
    jr = rc.detect_jumps(y, t, gain=GAIN, read_noise=RN, ngood=ng, dqflags=DQ)
    base = rc.fit_slopes(y, t, gain=GAIN, read_noise=RN, ngood=ng, jumps=jr.jumps, dqflags=DQ)
    q = fit_slopes_gls(y, t, gain=GAIN, read_noise=RN, ngood=ng, jumps=jr.jumps, dqflags=DQ)
    for yx in ((3, 3), (5, 5)):
        assert q.slope[yx] == base.slope[yx] and q.err[yx] == base.err[yx]
    other = np.ones((16, 16), bool)
    other[3, 3] = other[5, 5] = False
    assert not np.array_equal(q.slope[other], base.slope[other])
    assert np.abs(q.slope[other] - base.slope[other]).max() < 3 * base.err[other].max()


def test_gls_input_checks():
    y = np.zeros((3, 4, 4), np.float32)
    with pytest.raises(ValueError, match="uniformly"):
        fit_slopes_gls(y, [0.0, 1.0, 3.0], gain=2.0, read_noise=5.0, dqflags=DQ)
    with pytest.raises(ValueError, match="3 reads"):
        fit_slopes_gls(y[:2], [0.0, 1.0], gain=2.0, read_noise=5.0, dqflags=DQ)
