"""readout_cy recovers known fluxes with honest errors, and agrees with stcal on clean ramps.

Ramps are simulated here (Poisson electrons between reads + Gaussian read noise, rounded to
uint16): the project simulator is not a dependency of readout_cy.
"""

import numpy as np
import pytest

import readout_cy as rc
from iris_tasks.datamodels.dqflags import pixel as DQ

GAIN = 2.0
RN = 6.0


def simulate(rng, flux, t, *, gain=GAIN, rn=RN, pedestal=1000.0, shape=None, nonlin=None):
    """uint16 reads (nr, *shape) for a rate ``flux`` DN/s (scalar or map)."""
    flux = np.broadcast_to(np.asarray(flux, float), shape)
    dt = np.diff(np.concatenate([[0.0], t]))
    electrons = rng.poisson(np.maximum(flux, 0)[None] * gain * dt[:, None, None])
    signal = np.cumsum(electrons, axis=0) / gain
    if nonlin is not None:
        signal = nonlin(signal)
    reads = pedestal + signal + rng.normal(0.0, rn, (len(t),) + shape)
    return np.clip(np.round(reads), 0, 65535).astype(np.uint16)


@pytest.fixture
def rng():
    return np.random.default_rng(7)


CASES = [
    ("utr", "optimal", 5.0),
    ("utr", "optimal", 500.0),
    ("utr", "unweighted", 5.0),
    ("utr", "unweighted", 500.0),
    ("cds", "unweighted", 50.0),
    ("mcds", "unweighted", 50.0),
]


@pytest.mark.parametrize("mode,weighting,flux", CASES)
def test_flux_recovery_and_chi2(rng, mode, weighting, flux):
    """Unbiased slopes, and ERR matching the scatter: reduced chi^2 ~ 1."""
    t = np.arange(10) * 2.0
    shape = (64, 64)
    reads = simulate(rng, flux, t, shape=shape)
    res = rc.process_ramp(reads, t, gain=GAIN, read_noise=RN, saturation=65000.0, mode=mode,
                          weighting=weighting, refpix=False, jump_threshold=None, dqflags=DQ)
    assert not (res.dq & DQ["DO_NOT_USE"]).any()
    resid = res.slope.astype(float) - flux
    n = resid.size
    assert abs(resid.mean()) < 4.0 * resid.std() / np.sqrt(n)
    chi2 = np.mean((resid / res.err) ** 2)
    # std of a chi^2 mean over n pixels is sqrt(2/n) ~ 0.022
    assert 0.9 < chi2 < 1.1, chi2
    assert np.allclose(res.err**2, res.var_poisson + res.var_rnoise, rtol=1e-5)


def test_optimal_weighting_helps_at_high_snr(rng):
    t = np.arange(10) * 2.0
    reads = simulate(rng, 2000.0, t, shape=(64, 64))
    kw = dict(gain=GAIN, read_noise=RN, saturation=65000.0, refpix=False, jump_threshold=None)
    opt = rc.process_ramp(reads, t, weighting="optimal", **kw, dqflags=DQ)
    unw = rc.process_ramp(reads, t, weighting="unweighted", **kw, dqflags=DQ)
    assert np.mean(opt.err) < np.mean(unw.err)
    assert np.std(opt.slope) < np.std(unw.slope)


def test_multi_ramp_combination(rng):
    t = np.arange(6) * 3.0
    reads = np.stack([simulate(rng, 40.0, t, shape=(48, 48)) for _ in range(4)])
    kw = dict(gain=GAIN, read_noise=RN, saturation=65000.0, refpix=False, jump_threshold=None)
    comb = rc.process_exposure(reads, t, **kw, dqflags=DQ)
    one = rc.process_ramp(reads[0], t, **kw, dqflags=DQ)
    resid = comb.slope - 40.0
    assert 0.85 < np.mean((resid / comb.err) ** 2) < 1.15
    # four ramps: errors about half of one ramp's
    assert np.median(comb.err / one.err) == pytest.approx(0.5, rel=0.1)
    assert (comb.nused == 24).all()


def test_jumps_detected_and_slopes_unbiased(rng):
    t = np.arange(12) * 2.0
    shape = (64, 64)
    reads = simulate(rng, 100.0, t, shape=shape).astype(np.int64)
    hit = rng.random(shape) < 0.2
    where = rng.integers(1, len(t), shape)  # the jump lands between read where-1 and where
    amp = rng.uniform(300.0, 3000.0, shape)
    for i in range(len(t)):
        reads[i] += np.where(hit & (i >= where), amp, 0).astype(np.int64)
    reads = reads.astype(np.uint16)
    res = rc.process_ramp(reads, t, gain=GAIN, read_noise=RN, saturation=65000.0, refpix=False,
                          dqflags=DQ)
    flagged = (res.dq & DQ["JUMP_DET"]) != 0
    assert flagged[hit].mean() > 0.99
    assert flagged[~hit].mean() < 0.01
    resid = (res.slope - 100.0) / res.err
    assert abs(resid[hit].mean()) < 0.15
    assert 0.8 < np.mean(resid[hit] ** 2) < 1.25
    # the jump difference is not used: nused = nreads for clean pixels, fewer when a
    # segment of one read is left at either end
    assert (res.nused[~flagged] == len(t)).all()
    assert (res.nused[hit] <= len(t)).all()
    jr = rc.detect_jumps(reads.astype(np.float32), t, gain=GAIN, read_noise=RN, dqflags=DQ)
    iy, ix = np.nonzero(hit)
    assert jr.jumps[where[iy, ix] - 1, iy, ix].mean() > 0.99


def test_saturation_uses_unsaturated_reads(rng):
    t = np.arange(10) * 1.0
    shape = (32, 32)
    flux = np.full(shape, 100.0)
    flux[:16] = 3000.0  # saturates after a few reads
    reads = simulate(rng, flux, t, shape=shape, pedestal=1000.0)
    sat = 10000.0
    res = rc.process_ramp(reads, t, gain=GAIN, read_noise=RN, saturation=sat, refpix=False,
                          jump_threshold=None, dqflags=DQ)
    top = res.dq[:16]
    assert (top & DQ["SATURATED"]).all()
    ngood = rc.flag_saturation(reads, sat, dqflags=DQ).ngood
    assert (res.nused[:16] == ngood[:16]).all()
    ok = ngood[:16] >= 2
    assert np.all(np.abs(res.slope[:16][ok] - 3000.0) < 5 * res.err[:16][ok])
    assert not (res.dq[16:] & DQ["SATURATED"]).any()


def test_saturated_in_first_reads_is_do_not_use(rng):
    t = np.arange(5) * 1.0
    reads = simulate(rng, 10.0, t, shape=(8, 8))
    reads[0, 0, 0] = 65535  # saturated in read 0
    reads[1:, 0, 0] = 65535
    reads[1:, 1, 1] = 65535  # saturated from read 1: one usable read, no slope
    res = rc.process_ramp(reads, t, gain=GAIN, read_noise=RN, saturation=60000.0, refpix=False,
                          dqflags=DQ)
    for yx in [(0, 0), (1, 1)]:
        assert res.dq[yx] & DQ["DO_NOT_USE"] and res.dq[yx] & DQ["SATURATED"]
        assert np.isnan(res.slope[yx]) and res.err[yx] == 0 and res.nused[yx] == 0
    reads[2:, 2, 2] = 65535  # two usable reads: a CDS slope
    res = rc.process_ramp(reads, t, gain=GAIN, read_noise=RN, saturation=60000.0, refpix=False,
                          dqflags=DQ)
    assert res.dq[2, 2] & DQ["SATURATED"] and not res.dq[2, 2] & DQ["DO_NOT_USE"]
    assert res.nused[2, 2] == 2


def test_nonlinearity_correction_recovers_flux(rng):
    a = 1e-6  # observed = s - a s^2; inverse ~ y + a y^2 + 2 a^2 y^3 (+ 5 a^3 y^4: < 0.5 DN)
    t = np.arange(10) * 2.0
    shape = (32, 32)
    ped = 2000.0
    reads = simulate(rng, 1000.0, t, shape=shape, pedestal=ped, nonlin=lambda s: s - a * s * s)
    coef = np.zeros((4,) + shape, np.float32)
    coef[1], coef[2], coef[3] = 1.0, a, 2 * a * a
    kw = dict(gain=GAIN, read_noise=RN, saturation=65000.0, refpix=False, jump_threshold=None,
              bias=ped)
    raw = rc.process_ramp(reads, t, **kw, dqflags=DQ)
    cor = rc.process_ramp(reads, t, nonlinearity=coef, **kw, dqflags=DQ)
    assert abs(np.mean(cor.slope) - 1000.0) < 3 * np.std(cor.slope) / np.sqrt(cor.slope.size) + 0.5
    assert np.mean(raw.slope) < 990.0
    assert not (cor.dq & DQ["NO_LIN_CORR"]).any()


def _stcal_fit(reads, t, gain, rn, weighting="optimal"):
    from stcal.ramp_fitting import ramp_fit
    from stcal.ramp_fitting.ramp_fit_class import RampData

    nr, ny, nx = reads.shape
    dt = float(t[1] - t[0])
    data = reads.astype(np.float32)[None]
    rd = RampData()
    rd.set_arrays(data, np.zeros(data.shape, np.uint8), np.zeros((ny, nx), np.uint32),
                  np.zeros((ny, nx), np.float32))
    rd.set_meta(name="IRIS", frame_time=dt, group_time=dt, groupgap=0, nframes=1,
                drop_frames1=None)
    rd.algorithm = "OLS_C"
    rd.set_dqflags(dict(DO_NOT_USE=1, SATURATED=2, JUMP_DET=4, NO_GAIN_VALUE=524288,
                        UNRELIABLE_SLOPE=16777216, PERSISTENCE=8192, CHARGELOSS=128))
    rd.start_row = 0
    rd.num_rows = ny
    rd.suppress_one_group_ramps = False
    # stcal's read noise is the CDS noise (sqrt(2) x per read) in DN
    rn_cds = np.full((ny, nx), rn * np.sqrt(2.0), np.float32)
    image, _, _ = ramp_fit.ramp_fit_data(rd, False, rn_cds, np.full((ny, nx), gain, np.float32),
                                         "OLS_C", weighting, "none")
    return image


@pytest.mark.parametrize("flux", [3.0, 80.0, 1500.0])
def test_utr_agrees_with_stcal_on_clean_pixels(rng, flux):
    pytest.importorskip("stcal")
    t = np.arange(10) * 2.0
    reads = simulate(rng, flux, t, shape=(32, 32))
    image = _stcal_fit(reads, t, GAIN, RN)
    res = rc.process_ramp(reads, t, gain=GAIN, read_noise=RN, saturation=65000.0, refpix=False,
                          jump_threshold=None, dqflags=DQ)
    # same estimator (OLS with stcal's SNR power-law weights): equal to float32 rounding,
    # except the rare pixel whose SNR sits on a bucket edge
    close = np.isclose(res.slope, image["slope"], rtol=1e-5, atol=1e-4)
    assert close.mean() > 0.995
    assert np.all(np.abs(res.slope - image["slope"]) < 0.2 * res.err)
    unw = rc.process_ramp(reads, t, gain=GAIN, read_noise=RN, saturation=65000.0, refpix=False,
                          jump_threshold=None, weighting="unweighted", dqflags=DQ)
    # stcal's read-noise variance is the unweighted least-squares one: 12 rn^2/(dt^2 (n^3-n))
    np.testing.assert_allclose(unw.var_rnoise, image["var_rnoise"], rtol=1e-5)
