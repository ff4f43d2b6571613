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


# ----------------------------------------------------------------------------------------
# bad reference pixels (hot, dead, noisy), flagged in the mask reference or not
# ----------------------------------------------------------------------------------------

BADREF_SIZE = 128
BADREF_NCH = 16  # 8-column channels: 64 top/bottom reference pixels each, as at 256^2 x 32


def _badref_frame(fraction, seed=3, noise=("poisson", "read", "ktc")):
    sim = pytest.importorskip("iris_tasks.simulate.detector")
    det = sim.DetectorModel.for_detector("IMG1", size=BADREF_SIZE, seed=seed, nchan=BADREF_NCH,
                                         bad_refpix_fraction=fraction)
    reads, truth = sim.simulate_ramp(det, 100.0, nreads=NR, noise=list(noise), rng=seed,
                                     cosmic_rays=False)
    coef, _ = det.linearity_coefficients()
    kw = dict(gain=det.gain, read_noise=det.read_noise, saturation=det.saturation_reference(),
              nonlinearity=coef, refpix_channels=BADREF_NCH, dqflags=DQ)
    clean = det.active & ~det.hot & ~det.dead & ~det.low_qe
    return det, reads, truth, kw, clean


def _score(res, truth, det, clean):
    true = truth["rate_e_per_s"] / det.gain
    ok = clean & ((res.dq & (DQ["DO_NOT_USE"] | DQ["JUMP_DET"] | DQ["SATURATED"])) == 0)
    pull = (res.slope - true)[ok] / res.err[ok]
    return res.slope[ok].mean() / true[ok].mean(), pull.mean(), pull.std()


@pytest.mark.parametrize("fraction", [0.01, 0.03])
@pytest.mark.parametrize("use_mask", [False, True])
def test_bad_reference_pixels_do_not_bias_slopes(fraction, use_mask):
    """Hot, dead and noisy reference pixels (1-3 % of the border, half of them in the mask
    reference): slopes of clean pixels within 1 % of the truth, ERR describes the scatter."""
    det, reads, truth, kw, clean = _badref_frame(fraction)
    bad = det.bad_refpix()
    mask = det.bad_refpix_mask() if use_mask else None
    plain = rc.process_ramp(reads, truth["read_times"], **kw, refpix_reject=None)
    ratio0, _, rms0 = _score(plain, truth, det, clean)
    assert abs(ratio0 - 1.0) > 0.02 and rms0 > 2.0  # the problem this guards against
    res = rc.process_ramp(reads, truth["read_times"], **kw, refpix_mask=mask)
    ratio, pmean, prms = _score(res, truth, det, clean)
    assert abs(ratio - 1.0) < 0.01
    assert abs(pmean) < 0.15 and 0.93 < prms < 1.07
    # every hot and very noisy reference pixel left out and flagged (a 5-6x noisy one can
    # hide in the scatter of an 8-degree-of-freedom rms: it adds < 1 % to the correction's
    # noise); the mask honoured
    excluded = np.zeros(det.shape, bool)
    excluded[res.refpix.excluded] = True
    assert excluded[(bad["kind"] == 1) | ((bad["kind"] == 3) & (bad["noise_factor"] > 8))].all()
    if use_mask:
        assert excluded[bad["known"]].all()
        assert res.refpix.rejected == int((excluded & ~bad["known"]).sum())
    assert np.array_equal((res.dq & DQ["BAD_REF_PIXEL"]) != 0, excluded)
    assert not (res.dq & DQ["UNRELIABLE_BIAS"]).any() and res.refpix.bad_channels == ()
    # good reference pixels are kept: at most the simulator's few 3x-noise pixels go
    assert (excluded & (bad["kind"] == 0)).sum() <= 0.003 * (~det.active).sum() + 2


def test_bad_reference_pixels_with_one_over_f():
    """With the simulator's 1/f noise too: the slope bias stays well within 1 %."""
    det, reads, truth, kw, clean = _badref_frame(0.03, seed=4, noise=("poisson", "read", "ktc",
                                                                       "onef"))
    res = rc.process_ramp(reads, truth["read_times"], **kw, refpix_mask=det.bad_refpix_mask())
    ratio, _, _ = _score(res, truth, det, clean)
    assert abs(ratio - 1.0) < 0.01


def test_channel_without_usable_reference_is_flagged():
    """All top/bottom reference pixels of one channel flagged: its offsets follow the other
    channels, its pixels get UNRELIABLE_BIAS, the slopes stay right."""
    det, reads, truth, kw, clean = _badref_frame(0.0)
    chw = BADREF_SIZE // BADREF_NCH
    mask = np.zeros(det.shape, bool)
    mask[:4, 3 * chw:4 * chw] = mask[-4:, 3 * chw:4 * chw] = True
    res = rc.process_ramp(reads, truth["read_times"], **kw, refpix_mask=mask)
    assert res.refpix.bad_channels == (3,)
    unrel = (res.dq & DQ["UNRELIABLE_BIAS"]) != 0
    assert unrel[:, 3 * chw:4 * chw].all() and unrel.sum() == BADREF_SIZE * chw
    assert ((res.dq[mask] & DQ["BAD_REF_PIXEL"]) != 0).all()
    ratio, pmean, prms = _score(res, truth, det, clean)
    assert abs(ratio - 1.0) < 0.01 and 0.9 < prms < 1.1
    # the twin agrees, and so does streaming with the mask
    want = ref.process_ramp(reads, truth["read_times"], **kw, refpix_mask=mask)
    acc = rc.RampAccumulator(BADREF_SIZE, BADREF_SIZE, truth["read_times"], refpix_mask=mask,
                             **kw)
    for frame in reads[0]:
        acc.add_read(frame)
    st = acc.finalize()
    for f in ("slope", "var_poisson", "var_rnoise", "err", "dq", "nused"):
        assert np.array_equal(getattr(res, f), getattr(want, f), equal_nan=True), f
    assert st.refpix.bad_channels == (3,)
    assert np.array_equal(st.dq, res.dq)


def test_bad_reference_pixels_kernel_equals_twin():
    det, reads, truth, kw, _ = _badref_frame(0.03)
    for mask in (None, det.bad_refpix_mask()):
        got = rc.process_ramp(reads, truth["read_times"], **kw, refpix_mask=mask)
        want = ref.process_ramp(reads, truth["read_times"], **kw, refpix_mask=mask)
        assert got.refpix.rejected == want.refpix.rejected > 0
        for f in ("slope", "var_poisson", "var_rnoise", "err", "dq", "nused"):
            assert np.array_equal(getattr(got, f), getattr(want, f), equal_nan=True), f


def test_refpix_mask_and_reject_arguments_checked():
    reads = _pure_noise(np.random.default_rng(0))[0]
    kw = dict(gain=2.0, read_noise=RN, saturation=6e4, refpix_channels=NCH, dqflags=DQ)
    with pytest.raises(ValueError, match="refpix_mask"):
        rc.process_ramp(reads, T, **kw, refpix_mask=np.zeros((3, 3), bool))
    with pytest.raises(TypeError, match="refpix_mask"):
        rc.process_ramp(reads, T, **kw, refpix_mask=np.zeros((NY, NX), np.float32))
    with pytest.raises(ValueError, match="refpix_reject"):
        rc.process_ramp(reads, T, **kw, refpix_reject=0.0)
    with pytest.raises(ValueError, match="refpix_reject=None"):
        rc.RampAccumulator(NY, NX, T, gain=2.0, read_noise=RN, saturation=6e4,
                           refpix_channels=NCH, dqflags=DQ, refpix_reject=5.0)


def test_readout_algorithm_honours_the_mask_reference(tmp_path):
    """iris_tasks.steps.readout: border pixels flagged in the mask DQ are left out of the
    correction; the report's counts go to the REFNEXCL/REFNREJ/REFBADCH/REFBADCL keywords."""
    from astropy.io import fits

    from iris_tasks.datamodels import ImageModel
    from iris_tasks.steps import readout

    det, reads, truth, kw, clean = _badref_frame(0.03)
    mask_dq = np.zeros(det.shape, np.uint32)
    mask_dq[~det.active] |= DQ["REFERENCE_PIXEL"]  # every border pixel: not a reason to skip
    mask_dq[det.bad_refpix_mask()] |= DQ["BAD_REF_PIXEL"] | DQ["DO_NOT_USE"]
    maps = readout.detector_maps(gain=det.gain, read_noise=det.read_noise,
                                 saturation=det.saturation_reference(),
                                 nonlinearity=kw["nonlinearity"], mask_dq=mask_dq)
    res = readout.process(reads, truth["read_times"], maps, mode="utr", channels=BADREF_NCH)
    excluded = np.zeros(det.shape, bool)
    excluded[res.refpix.excluded] = True
    assert excluded[det.bad_refpix_mask()].all()
    assert 0 < res.refpix.rejected < excluded.sum()
    assert abs(_score(res, truth, det, clean)[0] - 1.0) < 0.01
    model = ImageModel(data=res.slope)
    model.meta.refpix.n_excluded = int(excluded.sum())
    model.meta.refpix.n_rejected = res.refpix.rejected
    model.meta.refpix.n_bad_channels = 0
    model.meta.refpix.bad_channels = ""
    model.save(tmp_path / "r.fits")
    hdr = fits.getheader(tmp_path / "r.fits")
    assert hdr["REFNEXCL"] == excluded.sum() and hdr["REFNREJ"] == res.refpix.rejected
    assert hdr["REFBADCH"] == 0


@pytest.mark.parametrize("mode, nreads, nramps", [("cds", 2, 1), ("mcds", 6, 1), ("utr", 5, 3)])
def test_bad_reference_pixels_every_mode(mode, nreads, nramps):
    """CDS (the slope test alone: no residuals with 2 reads), Fowler and multi-ramp UTR
    (statistics pooled over the ramps): slopes within 1 %, kernel = twin."""
    sim = pytest.importorskip("iris_tasks.simulate.detector")
    det = sim.DetectorModel.for_detector("IMG1", size=BADREF_SIZE, seed=3, nchan=BADREF_NCH,
                                         bad_refpix_fraction=0.03)
    reads, truth = sim.simulate_ramp(det, 100.0, nreads=nreads, nramps=nramps,
                                     noise=["poisson", "read", "ktc"], rng=3, cosmic_rays=False)
    kw = dict(gain=det.gain, read_noise=det.read_noise, saturation=det.saturation_reference(),
              nonlinearity=det.linearity_coefficients()[0], refpix_channels=BADREF_NCH,
              dqflags=DQ, mode=mode)
    clean = det.active & ~det.hot & ~det.dead & ~det.low_qe
    res = rc.process_ramp(reads, truth["read_times"], **kw)
    ratio, pmean, prms = _score(res, truth, det, clean)
    assert abs(ratio - 1.0) < 0.01 and abs(pmean) < 0.15 and 0.93 < prms < 1.07
    want = ref.process_ramp(reads, truth["read_times"], **kw)
    assert res.refpix.rejected == want.refpix.rejected > 0
    for f in ("slope", "var_poisson", "var_rnoise", "err", "dq", "nused"):
        assert np.array_equal(getattr(res, f), getattr(want, f), equal_nan=True), f
