"""Reference-pixel correction: slopes of pure-noise ramps are unbiased, and ERR is honest.

The per-read correction (channel offsets from the top/bottom rows, smoothed row offsets
from the side columns tied to the mean of all channel offsets) is built from a few hundred
noisy reference pixels, so it adds noise that is *common* to a channel, a row and (through
the channel offsets) to the whole frame.  A frame-mean slope therefore scatters
far more than (pixel scatter) / sqrt(npix); these tests predict that scatter by linear
propagation and check the mean against it, over many realizations.
"""

import numpy as np
import pytest

import readout_cy as rc
from iris_tasks.datamodels.dqflags import pixel as DQ
from readout_cy import reference as ref

NY = NX = 40
NCH = 8
NR = 10
RN = 6.0
T = np.arange(NR) * 1.47
ACTIVE = np.s_[4:-4, 4:-4]


def _pure_noise(rng, n=1):
    return np.rint(5000.0 + RN * rng.standard_normal((n, NR, NY, NX))).astype(np.uint16)


def _utr_r(t: np.ndarray = T) -> float:
    """Sum of squared read coefficients of the unweighted UTR slope (var / rn^2)."""
    _, r, _ = rc._kernels.coefficients(np.ascontiguousarray(t, dtype=np.float64), 0, len(t) - 1, 0.0)
    return r


def _frame_mean_weights(smooth: int, ny: int = NY, nx: int = NX, nch: int = NCH) -> np.ndarray:
    """Weight of every pixel in the active-area mean of one corrected read (linear map)."""
    active = np.s_[4 : ny - 4, 4 : nx - 4]
    border = np.ones((ny, nx), bool)
    border[active] = False
    idx = np.argwhere(border)
    frames = np.zeros((len(idx), ny, nx), np.int64)
    frames[np.arange(len(idx)), idx[:, 0], idx[:, 1]] = 1
    off, rowc = ref.refpix_tables(frames, nch, smooth)
    if smooth > 0:  # per read, the side correction is tied to the mean of all channel offsets
        rowc = rowc + rc._api._edge_tie(off)[:, None]
    corr = off[:, None, :].repeat(nx // nch, axis=2) + rowc[:, :, None]  # (n, ny, nx)
    w = np.zeros((ny, nx))
    w[active] = 1.0 / ((ny - 8) * (nx - 8))
    w[idx[:, 0], idx[:, 1]] -= corr[:, active[0], active[1]].mean(axis=(1, 2))
    return w


@pytest.mark.parametrize("smooth", [11, None])
def test_pure_read_noise_frame_mean_slope_unbiased(smooth):
    """Mean over realizations of the frame-mean slope is 0 within the predicted scatter."""
    rng = np.random.default_rng(11)
    nrep = 150
    reads = _pure_noise(rng, nrep)
    means = np.empty(nrep)
    for i in range(nrep):
        res = rc.process_ramp(reads[i], T, gain=2.0, read_noise=RN, saturation=60000.0,
                              refpix_channels=NCH, refpix_smooth=smooth, threads=1, dqflags=DQ)
        means[i] = res.slope[ACTIVE].mean()
    w = _frame_mean_weights(smooth or 0)
    predicted = RN * np.sqrt((w * w).sum() * _utr_r())
    # the naive white-noise figure is several times smaller: the correction is common mode
    naive = RN * np.sqrt(_utr_r() / ((NY - 8) * (NX - 8)))
    assert predicted > 2 * naive
    assert 0.8 < means.std(ddof=1) / predicted < 1.2
    assert abs(means.mean()) < 4 * predicted / np.sqrt(nrep)


def test_var_rnoise_includes_reference_correction_noise():
    """Per-pixel slope variance over realizations == VAR_RNOISE (incl. the refpix term)."""
    rng = np.random.default_rng(5)
    nrep = 200
    reads = _pure_noise(rng, nrep)
    slopes = np.empty((nrep, NY, NX), np.float32)
    for i in range(nrep):
        res = rc.process_ramp(reads[i], T, gain=2.0, read_noise=RN, saturation=60000.0,
                              refpix_channels=NCH, jump_threshold=None,
                              weighting="unweighted", threads=1, dqflags=DQ)
        slopes[i] = res.slope
    emp = slopes[:, ACTIVE[0], ACTIVE[1]].var(axis=0, ddof=1).mean()
    vr = res.var_rnoise[ACTIVE].mean()
    white = RN * RN * _utr_r()
    assert vr > 1.03 * white  # the correction noise is a few % of rn^2 here
    assert abs(emp / vr - 1.0) < 0.02
    rv = rc.refpix_variance(RN, (NY, NX), channels=NCH, smooth=11)
    assert rv.shape == (NY, NCH) and (rv > 0).all()
    np.testing.assert_allclose(res.var_rnoise[20, 4], (RN * RN + rv[20, 0]) * _utr_r(), rtol=1e-6)


def test_refpix_variance_in_twin_and_streaming_bit_identical():
    rng = np.random.default_rng(3)
    reads = _pure_noise(rng)[0]
    reads[4, 10:12, 10:12] += 400  # a jump: the segment combination uses the variances
    rn_map = rng.uniform(4.0, 8.0, (NY, NX)).astype(np.float32)
    kw = dict(gain=2.0, read_noise=rn_map, saturation=60000.0, refpix_channels=NCH)
    got = rc.process_ramp(reads, T, **kw, dqflags=DQ)
    want = ref.process_ramp(reads, T, **kw, dqflags=DQ)
    for f in ("slope", "var_poisson", "var_rnoise", "err", "dq", "nused"):
        assert np.array_equal(getattr(got, f), getattr(want, f), equal_nan=True), f
    acc = rc.RampAccumulator(NY, NX, T, **kw, dqflags=DQ)
    for frame in reads:
        acc.add_read(frame)
    st = acc.finalize()
    for f in ("slope", "var_poisson", "var_rnoise", "err", "dq", "nused"):
        assert np.array_equal(getattr(got, f), getattr(st, f), equal_nan=True), f
    assert got.dq[11, 11] & DQ["JUMP_DET"]


def test_simulator_dark_ramp_matches_true_dark():
    """iris_tasks' simulator, read noise only: mean slope == mean true dark (DN/s)."""
    sim = pytest.importorskip("iris_tasks.simulate.detector")
    errs, preds = [], []
    w = _frame_mean_weights(11, 64, 64, 8)
    for seed in range(6):
        det = sim.DetectorModel.for_detector("IMG1", size=64, seed=seed, nchan=8)
        reads, truth = sim.simulate_ramp(det, None, nreads=NR, noise=["read"], rng=seed,
                                         cosmic_rays=False)
        res = rc.process_ramp(reads, truth["read_times"], gain=det.gain,
                              read_noise=det.read_noise,
                              saturation=det.saturation - det.sat_margin, refpix_channels=8,
                              threads=1, dqflags=DQ)
        true = truth["rate_e_per_s"] / det.gain
        ok = (res.dq[ACTIVE] & DQ["DO_NOT_USE"]) == 0
        errs.append((res.slope[ACTIVE][ok] - true[ACTIVE][ok]).mean())
        rn = det.read_noise.astype(np.float64)
        preds.append(np.sqrt((w * w * rn * rn).sum() * _utr_r(truth["read_times"])))
        assert abs(errs[-1]) < 4 * preds[-1]  # each ramp, against its predicted scatter
    # all ramps together: unbiased within the predicted scatter of the mean
    assert abs(np.mean(errs)) < 4 * np.sqrt(np.mean(np.square(preds)) / len(errs))
