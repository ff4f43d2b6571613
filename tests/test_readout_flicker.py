"""1/f row stripes and alternating column noise (ACN) in imager slope images: the simulator
makes them, ``iris_tasks.steps.readout.clean_flicker`` removes them on background pixels.

Stripe power is measured on *held-out* background pixels (flagged so that the cleaning does
not use them), against the truth, per (row, channel): the mean residual of those pixels.
The reference is the same measurement on the same scene without 1/f and ACN, cleaned the
same way (the cleaning's own estimation noise is in both).
"""

import warnings

import numpy as np
import pytest

import readout_cy as rc
from iris_tasks.datamodels.dqflags import pixel as DQ
from iris_tasks.steps import readout as ro

sim = pytest.importorskip("iris_tasks.simulate.detector")

SIZE = 256
NCH = 4  # 64-column channels, as wide as a quarter of a real 128-column channel
HELD = DQ["OTHER_BAD_PIXEL"]


def _scene(rng, n=SIZE, nstar=15, sky=5.0):
    yy, xx = np.mgrid[:n, :n]
    img = np.full((n, n), sky)
    stars = []
    for _ in range(nstar):
        y0, x0 = rng.uniform(12, n - 12, 2)
        f = 10 ** rng.uniform(2.5, 4.5)
        img += f / (2 * np.pi * 1.5**2) * np.exp(-((yy - y0) ** 2 + (xx - x0) ** 2) / 4.5)
        stars.append((y0, x0))
    return img.astype(np.float32), stars


def _aperture(img, stars, r=5):
    yy, xx = np.mgrid[: img.shape[0], : img.shape[1]]
    return np.array([np.where((yy - y) ** 2 + (xx - x) ** 2 <= r * r, img, 0).sum()
                     for y, x in stars])


def _stripe_power(resid, err, use):
    """Mean square of the per-(row, channel) mean residual over the white-noise floor."""
    ny, nx = resid.shape
    chw = nx // NCH
    n = use.reshape(ny, NCH, chw).sum(axis=2)
    m = np.where(use, resid, 0).reshape(ny, NCH, chw).sum(axis=2) / np.maximum(n, 1)
    white = np.where(use, err**2, 0).reshape(ny, NCH, chw).sum(axis=2) / np.maximum(n, 1) ** 2
    ok = n >= chw // 4
    m = m - np.array([m[ok[:, c], c].mean() for c in range(NCH)])
    return (m[ok] ** 2).mean() / white[ok].mean()


def _acn_power(resid, err, use):
    ny, nx = resid.shape
    chw = nx // NCH
    u = use.reshape(ny, NCH, chw)
    r = np.where(use, resid, 0).reshape(ny, NCH, chw)
    e2 = np.where(use, err**2, 0).reshape(ny, NCH, chw)
    ne, no = u[:, :, 0::2].sum(axis=2), u[:, :, 1::2].sum(axis=2)
    ok = (ne >= 4) & (no >= 4)
    d = r[:, :, 0::2].sum(axis=2) / np.maximum(ne, 1) - r[:, :, 1::2].sum(axis=2) / np.maximum(no, 1)
    w = e2[:, :, 0::2].sum(axis=2) / np.maximum(ne, 1) ** 2 + e2[:, :, 1::2].sum(axis=2) / np.maximum(no, 1) ** 2
    return (d[ok] ** 2).mean() / w[ok].mean()


@pytest.fixture(scope="module")
def frames():
    rng = np.random.default_rng(1)
    img, stars = _scene(rng)
    det = sim.DetectorModel.for_detector("IMG1", size=SIZE, seed=2, nchan=NCH, acn_rms=1.0,
                                         onef_rms=2.0)
    coef, _ = det.linearity_coefficients()
    kw = dict(gain=det.gain, read_noise=det.read_noise, saturation=det.saturation_reference(),
              nonlinearity=coef, refpix_channels=NCH, dqflags=DQ)
    held = np.random.default_rng(11).random(det.shape) < 0.5
    out = {}
    for label, noise in (("white", ["poisson", "read", "ktc"]), ("onef", True)):
        reads, truth = sim.simulate_ramp(det, img, nreads=10, noise=noise, rng=6,
                                         cosmic_rays=False)
        res = rc.process_ramp(reads, truth["read_times"], **kw)
        true = truth["rate_e_per_s"] / det.gain
        bg = ((img < 5.5) & det.active & ~det.hot & ~det.dead & ~det.low_qe
              & ((res.dq & DQ["DO_NOT_USE"]) == 0))
        cleaned = res.slope.copy()
        vr = res.var_rnoise.copy()
        with warnings.catch_warnings():
            warnings.simplefilter("error")
            fl = ro.clean_flicker(cleaned, res.err, res.dq | np.where(held, HELD, 0).astype(np.uint32),
                                  channels=NCH, var_rnoise=vr,
                                  skip_flags=ro.FLICKER_SKIP_FLAGS | HELD)
        out[label] = dict(res=res, cleaned=cleaned, vr=vr, true=true, use=bg & held, fl=fl,
                          stars=stars)
    return out


def test_simulator_acn_alternates_by_column_parity():
    det = sim.DetectorModel.for_detector("IMG1", size=64, seed=0, nchan=4, acn_rms=5.0,
                                         onef_rms=0.0)
    reads, _ = sim.simulate_ramp(det, None, nreads=3, noise=["onef"], rng=1, cosmic_rays=False)
    plain, _ = sim.simulate_ramp(dataclass_replace(det, acn_rms=0.0), None, nreads=3,
                                 noise=["onef"], rng=1, cosmic_rays=False)
    d = reads.astype(np.float64) - plain
    # an even column and the odd one next to it (read at nearly the same time) get opposite
    # offsets (to the rounding of both frames to whole DN)
    pair = d[0, :, 8:-8, 0::2] + d[0, :, 8:-8, 1::2]
    assert np.abs(pair).max() <= 2.0
    assert np.abs(d[0, :, 8:-8, 0::2] - d[0, :, 8:-8, 1::2]).mean() > 4.0
    assert 2.0 < np.abs(d[0, :, 8:-8, :]).mean() < 8.0
    # off by default: the frames of earlier versions
    assert sim.DetectorModel.for_detector("IMG1", size=64, seed=0, nchan=4).acn_rms == 0.0


def dataclass_replace(det, **kw):
    import dataclasses

    return dataclasses.replace(det, **kw)


def test_clean_flicker_removes_stripes_and_acn(frames):
    w, f = frames["white"], frames["onef"]
    before = _stripe_power(f["res"].slope - f["true"], f["res"].err, f["use"])
    floor_before = _stripe_power(w["res"].slope - w["true"], w["res"].err, w["use"])
    after = _stripe_power(f["cleaned"] - f["true"], f["res"].err, f["use"])
    floor_after = _stripe_power(w["cleaned"] - w["true"], w["res"].err, w["use"])
    assert before > 2.0 * floor_before  # the 1/f and ACN are there after the readout
    assert after < 1.3 * floor_after  # and gone after the cleaning, to the white level
    acn_before = _acn_power(f["res"].slope - f["true"], f["res"].err, f["use"])
    acn_after = _acn_power(f["cleaned"] - f["true"], f["res"].err, f["use"])
    acn_floor = _acn_power(w["cleaned"] - w["true"], w["res"].err, w["use"])
    assert acn_before > 1.5 * _acn_power(w["res"].slope - w["true"], w["res"].err, w["use"])
    assert acn_after < 1.2 * acn_floor
    assert f["fl"].background_fraction > 0.9


def test_clean_flicker_leaves_stars_and_errors_honest(frames):
    for label in ("white", "onef"):
        x = frames[label]
        stars = x["stars"]
        err_ap = np.sqrt(_aperture(x["res"].err ** 2, stars))
        change = (_aperture(x["cleaned"], stars) - _aperture(x["res"].slope, stars)) / err_ap
        assert abs(change.mean()) < 0.5, label  # no systematic flux change
        # DO_NOT_USE pixels keep zero variance; others grew by the estimate's variance
        dnu = (x["res"].dq & DQ["DO_NOT_USE"]) != 0
        assert (x["vr"][dnu] == 0).all()
        assert (x["vr"][~dnu] >= x["res"].var_rnoise[~dnu]).all()
    f = frames["onef"]
    at = _aperture(f["true"], f["stars"])
    err_ap = np.sqrt(_aperture(f["res"].err ** 2, f["stars"]))
    rms_before = np.std((_aperture(f["res"].slope, f["stars"]) - at) / err_ap)
    rms_after = np.std((_aperture(f["cleaned"], f["stars"]) - at) / err_ap)
    assert rms_after < rms_before * 1.05


def test_clean_flicker_rejects_bad_channel_count():
    with pytest.raises(ValueError, match="channels"):
        ro.clean_flicker(np.zeros((8, 10), np.float32), np.ones((8, 10), np.float32),
                         np.zeros((8, 10), np.uint32), channels=4)


def test_flicker_sums_kernel_equals_twin():
    import readout_cy as rc
    from readout_cy import reference as ref

    rng = np.random.default_rng(0)
    # 16-, 8-, 8-, 15- and 260-column channels: medians of 8, 4, 4, 15 (odd) and 65 values
    # (the last by selection, the others by ranks); ties; +-inf slopes are not usable
    for n, nch, ties in ((64, 4, False), (96, 12, True), (128, 16, False), (60, 4, True),
                         (520, 2, False)):
        s = rng.normal(2.0, 0.3, (n, n)).astype(np.float32)
        s[rng.random((n, n)) < 0.01] += 50.0  # sources
        if ties:
            s = np.round(s, 1)
        s[5, 7] = np.nan
        s[6, 2], s[11, 30] = np.inf, -np.inf
        e = np.full((n, n), 0.3, np.float32)
        e[9, 9] = 0.0
        dq = np.where(rng.random((n, n)) < 0.02, DQ["DO_NOT_USE"], 0).astype(np.uint32)
        # one pass per block of rows: blocks of 1 and 3 threads, dilations 0-3 (a block's
        # edge rows take their neighbours' sources)
        for threads, dilate in ((2, 2), (1, 0), (3, 1), (3, 3)):
            got = rc.flicker_sums(s, e, dq, skip=DQ["DO_NOT_USE"], channels=nch,
                                  dilate=dilate, threads=threads)
            want = ref.flicker_sums(s, e, dq, skip=DQ["DO_NOT_USE"], channels=nch,
                                    dilate=dilate)
            assert len(got) == len(want) == 6
            for g, w in zip(got, want, strict=True):
                if g.dtype.kind == "i":
                    assert np.array_equal(g, w)
                else:  # sums in another order: equal to rounding
                    np.testing.assert_allclose(g, w, rtol=1e-12, atol=1e-12)


def test_flicker_fill_kernel_equals_twin():
    """The fill value (median of the usable pixels of every 7th row and column) from the
    kernel's selection = numpy's median: odd and even counts, ties, none usable."""
    import readout_cy as rc
    from readout_cy import _api

    rng = np.random.default_rng(2)
    for n in (70, 71, 77):  # 10, 11, 11 samples per axis; the even counts take two values
        s = np.round(rng.normal(2.0, 0.3, (n, n)), 1).astype(np.float32)
        e = np.full((n, n), 0.3, np.float32)
        s[0, 0], s[7, 7], e[14, 14] = np.nan, np.inf, 0.0
        dq = np.where(rng.random((n, n)) < 0.1, DQ["DO_NOT_USE"], 0).astype(np.uint32)
        for d in (dq, np.zeros_like(dq)):
            want = _api._flicker_fill(s, e, d, DQ["DO_NOT_USE"])
            got = rc._kernels.flicker_fill(s, e, d, np.uint32(DQ["DO_NOT_USE"]))
            assert got == want and got.dtype == np.float32
    dq = np.full((n, n), DQ["DO_NOT_USE"], np.uint32)
    assert rc._kernels.flicker_fill(s, e, dq, np.uint32(DQ["DO_NOT_USE"])) == 0.0


def test_flicker_apply_kernel_equals_twin_and_checks_its_arguments():
    """flicker_apply (the kernel's second pass) = its numpy twin bit for bit; arguments of
    the wrong shape are a clear error, not an out-of-bounds write (the kernel does not
    bounds-check)."""
    import readout_cy as rc
    from readout_cy import reference as ref

    rng = np.random.default_rng(5)
    n, nch = 48, 6
    s = rng.normal(2.0, 0.3, (n, n)).astype(np.float32)
    s[3, 4] = np.nan
    stripes = rng.normal(0.0, 0.1, (n, nch)).astype(np.float32)
    acn = rng.normal(0.0, 0.05, (n, nch)).astype(np.float32)
    add = rng.uniform(0.0, 0.01, (n, nch)).astype(np.float32)
    var = rng.uniform(0.5, 1.0, (n, n)).astype(np.float32)
    for a in (acn, None):
        got_s, got_v = s.copy(), var.copy()
        want_s, want_v = s.copy(), var.copy()
        rc.flicker_apply(got_s, stripes, a, got_v, add, threads=2)
        ref.flicker_apply(want_s, stripes, a, want_v, add)
        np.testing.assert_array_equal(got_s, want_s)
        np.testing.assert_array_equal(got_v, want_v)
        assert not np.array_equal(got_s[np.isfinite(s)], s[np.isfinite(s)])
        assert got_v[3, 4] == var[3, 4]  # no slope, no added variance
        # err = sqrt(var_rnoise + var_poisson) from the new variance, in the same pass
        vp = rng.uniform(0.0, 2.0, (n, n)).astype(np.float32)
        got_s, got_v, got_e = s.copy(), var.copy(), np.zeros((n, n), np.float32)
        want_s, want_v, want_e = s.copy(), var.copy(), np.ones((n, n), np.float32)
        rc.flicker_apply(got_s, stripes, a, got_v, add, threads=2, var_poisson=vp, err=got_e)
        ref.flicker_apply(want_s, stripes, a, want_v, add, var_poisson=vp, err=want_e)
        for g, w in ((got_s, want_s), (got_v, want_v), (got_e, want_e)):
            np.testing.assert_array_equal(g, w)
        np.testing.assert_array_equal(got_e, np.sqrt(got_v + vp))
    for mod in (rc, ref):
        for bad in (stripes[:10], np.zeros((n, 7), np.float32)):  # rows; not a divisor
            with pytest.raises(ValueError, match="stripes must be"):
                mod.flicker_apply(s.copy(), bad, None)
        with pytest.raises(ValueError, match="acn has shape"):
            mod.flicker_apply(s.copy(), stripes, acn[:, :3])
        with pytest.raises(ValueError, match="var_rnoise has shape"):
            mod.flicker_apply(s.copy(), stripes, None, var[:, :6].copy(), add)
        with pytest.raises(ValueError, match="add must be given"):
            mod.flicker_apply(s.copy(), stripes, None, var.copy(), None)
        with pytest.raises(ValueError, match="go together"):
            mod.flicker_apply(s.copy(), stripes, None, var.copy(), add, var_poisson=var)
        with pytest.raises(ValueError, match="err has shape"):
            mod.flicker_apply(s.copy(), stripes, None, var.copy(), add, var_poisson=var,
                              err=var[:, :6].copy())
    with pytest.raises(ValueError, match="err has shape"):
        rc.flicker_sums(s, s[:, :12], np.zeros((n, n), np.uint32), skip=1, channels=nch)


def test_clean_flicker_updates_err_as_the_step_did():
    """With var_poisson, clean_flicker's apply pass also sets err = sqrt(var_rnoise +
    var_poisson); the sources are judged on the err it was given: the same slopes, variances
    and err as the call without it followed by numpy's sqrt (the step's former order)."""
    rng = np.random.default_rng(4)
    n, nch = 96, 6
    slope = (rng.normal(5.0, 1.0, (n, n)) + rng.normal(0, 0.5, (n, 1))).astype(np.float32)
    slope[rng.random((n, n)) < 0.01] += 80.0
    vp = rng.uniform(0.5, 1.0, (n, n)).astype(np.float32)
    vr = np.full((n, n), 0.3, np.float32)
    err = np.sqrt(vp + vr)
    dq = np.zeros((n, n), np.uint32)
    dq[10, 10] = DQ["DO_NOT_USE"]
    slope[10, 10] = np.nan
    a_s, a_v, a_e = slope.copy(), vr.copy(), err.copy()
    fa = ro.clean_flicker(a_s, a_e, dq, channels=nch, var_rnoise=a_v, var_poisson=vp,
                          smooth_rows=32)
    b_s, b_v, b_e = slope.copy(), vr.copy(), err.copy()
    fb = ro.clean_flicker(b_s, b_e, dq, channels=nch, var_rnoise=b_v, smooth_rows=32)
    np.sqrt(b_v + vp, out=b_e)
    for a, b in ((a_s, b_s), (a_v, b_v), (a_e, b_e), (fa.stripes, fb.stripes),
                 (fa.acn, fb.acn)):
        np.testing.assert_array_equal(a, b)
    assert fa.background_fraction == fb.background_fraction > 0.5
    fin = ~np.isnan(a_s)
    assert (a_e[fin] >= err[fin]).all() and (a_e[fin] > err[fin]).mean() > 0.9  # + estimates
    with pytest.raises(ValueError, match="var_poisson needs var_rnoise"):
        ro.clean_flicker(slope.copy(), err.copy(), dq, channels=nch, var_poisson=vp)
