"""The algorithm modules of the steps, on small arrays against hand-computed values."""

import math

import numpy as np
import pytest
from astropy.wcs.utils import proj_plane_pixel_scales

from iris_tasks.datamodels.dqflags import pixel
from iris_tasks.steps import assign_wcs, dark_sub, dq_init, flat_field, readout, sky_sub
from iris_tasks.steps._stats import nanmedian_axis0

DNU = pixel["DO_NOT_USE"]


def test_dq_init_ors_mask_and_flags_non_finite():
    dq = np.array([[pixel["SATURATED"], 0], [0, 0]], np.uint32)
    mask = np.array([[pixel["HOT"], pixel["DEAD"] | DNU], [0, 0]], np.uint32)
    out = dq_init.apply_mask(dq, mask)
    assert out.tolist() == [[pixel["SATURATED"] | pixel["HOT"], pixel["DEAD"] | DNU], [0, 0]]
    sci = np.array([[1.0, np.nan], [np.inf, 2.0]], np.float32)
    flagged = dq_init.flag_non_finite(sci, out)
    assert flagged[0, 1] & DNU and flagged[1, 0] & DNU and not flagged[1, 1]
    with pytest.raises(ValueError, match="mask shape"):
        dq_init.apply_mask(dq, np.zeros((3, 3), np.uint32))


def test_dark_subtraction_values_errors_and_flags():
    sci = np.full((2, 2), 10.0, np.float32)
    err = np.full((2, 2), 3.0, np.float32)
    dq = np.zeros((2, 2), np.uint32)
    dark = np.array([[1.0, 2.0], [np.nan, 0.5]], np.float32)
    dark_err = np.full((2, 2), 4.0, np.float32)
    dark_dq = np.array([[pixel["HOT"], 0], [0, pixel["WARM"]]], np.uint32)
    out_sci, out_err, out_dq = dark_sub.subtract_dark(sci, err, dq, dark, dark_err, dark_dq)
    assert out_sci.tolist() == [[9.0, 8.0], [10.0, 9.5]]  # NaN dark: left unsubtracted
    assert out_err[0, 0] == pytest.approx(5.0)  # sqrt(3^2 + 4^2)
    assert out_err[1, 0] == pytest.approx(3.0)  # no dark, no dark error
    assert out_dq[0, 0] == pixel["HOT"] and out_dq[1, 1] == pixel["WARM"]
    assert out_dq[1, 0] == pixel["UNRELIABLE_DARK"] | DNU
    with pytest.raises(ValueError, match="dark shape"):
        dark_sub.subtract_dark(sci, err, dq, np.zeros((3, 3), np.float32))


def test_flat_division_and_variance_propagation():
    sci = np.array([[10.0, 10.0, 10.0, 10.0]], np.float32)
    err = np.full((1, 4), 2.0, np.float32)
    vp = np.full((1, 4), 3.0, np.float32)
    vr = np.full((1, 4), 1.0, np.float32)
    dq = np.zeros((1, 4), np.uint32)
    flat = np.array([[2.0, 0.0, np.nan, 0.5]], np.float32)
    flat_err = np.array([[0.2, 0.0, 0.0, 0.05]], np.float32)
    flat_dq = np.array([[0, 0, 0, pixel["LOW_QE"]]], np.uint32)
    out = flat_field.apply_flat(sci, err, dq, flat, flat_err, flat_dq, vp, vr, None)
    # pixel 0: c = 5, VAR_POISSON 3/4, VAR_FLAT = 25 * (0.1)^2 = 0.25, ERR^2 = 4/4 + 0.25
    assert out["data"][0, 0] == pytest.approx(5.0)
    assert out["var_poisson"][0, 0] == pytest.approx(0.75)
    assert out["var_rnoise"][0, 0] == pytest.approx(0.25)
    assert out["var_flat"][0, 0] == pytest.approx(0.25)
    assert out["err"][0, 0] == pytest.approx(math.sqrt(1.25))
    # zero and NaN flats: undivided, flagged, no flat variance
    for i in (1, 2):
        assert out["data"][0, i] == 10.0
        assert out["dq"][0, i] == pixel["NO_FLAT_FIELD"] | DNU
        assert out["var_flat"][0, i] == 0.0
    # a LOW_QE flat is applied and its flag carried
    assert out["data"][0, 3] == pytest.approx(20.0)
    assert out["dq"][0, 3] == pixel["LOW_QE"]


def test_flat_flagged_unusable_and_existing_var_flat_not_double_counted():
    flat = np.array([[1.0, 2.0]], np.float32)
    flat_dq = np.array([[pixel["NO_FLAT_FIELD"], 0]], np.uint32)
    assert flat_field.unusable_flat(flat, flat_dq).tolist() == [[True, False]]
    # ERR^2 = 1 + VAR_FLAT_in(3) = 4; after a flat of 2 with no error: ERR^2 = 4 / 4
    out = flat_field.apply_flat(np.ones((1, 2), np.float32), np.full((1, 2), 2.0, np.float32),
                                np.zeros((1, 2), np.uint32), np.full((1, 2), 2.0, np.float32),
                                var_flat=np.full((1, 2), 3.0, np.float32))
    assert out["err"][0, 0] == pytest.approx(1.0)
    assert out["var_flat"][0, 0] == pytest.approx(0.75)


def _stars(shape, positions, flux=500.0):
    img = np.zeros(shape, np.float32)
    yy, xx = np.mgrid[: shape[0], : shape[1]]
    for y, x in positions:
        img += flux * np.exp(-((yy - y) ** 2 + (xx - x) ** 2) / 4.0)
    return img


def test_sky_frames_scaled_to_science_median(rng):
    shape = (48, 48)
    pattern = 1.0 + 0.1 * np.linspace(-1, 1, shape[1])[None, :] * np.ones(shape)
    err = np.full(shape, 0.05, np.float32)
    dq = np.zeros(shape, np.uint32)
    frames = [sky_sub.SkyFrame((lvl * pattern + rng.normal(0, 0.05, shape)).astype(np.float32),
                               err, dq, f"sky{i}") for i, lvl in enumerate((10.0, 12.0, 11.0))]
    frames[0].dq = dq.copy()
    frames[0].dq[5, 5] = DNU  # a bad pixel in one frame does not matter
    science = (20.0 * pattern + _stars(shape, [(20, 20), (30, 10)])).astype(np.float32)
    est = sky_sub.combine_sky_frames(science, dq, frames)
    assert est.method == "frames"
    sel = _stars(shape, [(20, 20), (30, 10)]) < 1e-3
    np.testing.assert_allclose(est.background[sel], 20.0 * pattern[sel], rtol=0.025)  # 5 sigma
    assert est.level == pytest.approx(20.0, rel=0.01)
    assert not est.no_sky.any()
    # variance of a 3-frame median: pi/2 * mean(err^2 / level^2) / 3, scaled by 20^2
    level_var = np.mean([(0.05 / lv) ** 2 for lv in (10.0, 12.0, 11.0)])
    assert np.median(est.variance) == pytest.approx(400 * math.pi / 2 * level_var / 3, rel=0.05)


def test_sky_no_valid_frame_pixel_gets_no_sky_flag():
    shape = (16, 16)
    dq = np.zeros(shape, np.uint32)
    bad = dq.copy()
    bad[3, 4] = DNU
    frames = [sky_sub.SkyFrame(np.full(shape, 5.0, np.float32), np.ones(shape, np.float32), bad, "a"),
              sky_sub.SkyFrame(np.full(shape, 5.0, np.float32), np.ones(shape, np.float32), bad, "b")]
    science = np.full(shape, 10.0, np.float32)
    est = sky_sub.combine_sky_frames(science, dq, frames)
    assert est.no_sky[3, 4] and est.no_sky.sum() == 1
    assert est.background[3, 4] == pytest.approx(10.0)  # the scaled sky level
    out_sci, out_err, out_dq = sky_sub.subtract_sky(science, np.ones(shape, np.float32), dq, est)
    assert out_dq[3, 4] == pixel["NO_SKY"]
    assert np.allclose(out_sci, 0.0, atol=1e-5)
    assert out_err[0, 0] == pytest.approx(math.sqrt(1 + est.variance[0, 0]))


def test_sky_additive_when_level_not_positive():
    shape = (16, 16)
    dq = np.zeros(shape, np.uint32)
    frames = [sky_sub.SkyFrame(np.full(shape, v, np.float32), np.ones(shape, np.float32), dq, str(v))
              for v in (-1.0, 0.0, -0.5)]
    science = np.full(shape, 3.0, np.float32)
    est = sky_sub.combine_sky_frames(science, dq, frames)
    assert "additively" in est.detail
    np.testing.assert_allclose(est.background, 3.0, atol=1e-6)


def test_sky_errors_name_the_frame():
    dq = np.zeros((8, 8), np.uint32)
    with pytest.raises(ValueError, match="no sky frames"):
        sky_sub.combine_sky_frames(np.ones((8, 8)), dq, [])
    frame = sky_sub.SkyFrame(np.ones((4, 4), np.float32), np.ones((4, 4), np.float32),
                             np.zeros((4, 4), np.uint32), "small_sky")
    with pytest.raises(ValueError, match="small_sky"):
        sky_sub.combine_sky_frames(np.ones((8, 8)), dq, [frame])
    empty = sky_sub.SkyFrame(np.ones((8, 8), np.float32), np.ones((8, 8), np.float32),
                             np.full((8, 8), DNU, np.uint32), "all_bad")
    with pytest.raises(ValueError, match="all_bad"):
        sky_sub.combine_sky_frames(np.ones((8, 8)), dq, [empty])


def test_background_model_recovers_smooth_background(rng):
    shape = (128, 128)
    yy, xx = np.mgrid[: shape[0], : shape[1]]
    truth = (50.0 + 0.05 * xx + 0.03 * yy).astype(np.float32)
    stars = _stars(shape, [(30, 30), (90, 60), (64, 100)], flux=2000.0)
    science = truth + stars + rng.normal(0, 1.0, shape).astype(np.float32)
    dq = np.zeros(shape, np.uint32)
    est = sky_sub.model_background(science, dq, box_size=32)
    assert est.method == "model" and "Background2D" in est.detail
    far = stars < 0.01
    resid = (est.background - truth)[far]
    assert abs(np.median(resid)) < 0.3 and np.std(resid) < 0.6
    assert (est.variance > 0).all()


def test_wcs_pointing_scale_and_position_angle():
    info = assign_wcs.imager_wcsinfo(150.0, 2.0, 30.0, (64, 64))
    assert (info["crpix1"], info["crpix2"]) == (32.5, 32.5)
    w = assign_wcs.wcs_from_wcsinfo(info)
    ra, dec = w.all_pix2world([[31.5, 31.5]], 0)[0]  # 0-based centre
    assert ra == pytest.approx(150.0) and dec == pytest.approx(2.0)
    assert proj_plane_pixel_scales(w) * 3.6e6 == pytest.approx([4.0, 4.0])
    # one pixel along +Y points to PA (east of north); along +X to PA - 90
    (r0, d0), (r1, d1), (r2, d2) = w.all_pix2world([[31.5, 31.5], [31.5, 1031.5], [1031.5, 31.5]], 0)
    east = lambda r, d: (r - r0) * math.cos(math.radians(d0))  # noqa: E731
    assert math.degrees(math.atan2(east(r1, d1), d1 - d0)) == pytest.approx(30.0, abs=0.01)
    assert math.degrees(math.atan2(east(r2, d2), d2 - d0)) == pytest.approx(-60.0, abs=0.01)
    sub = assign_wcs.imager_wcsinfo(150.0, 2.0, 0.0, (256, 256), xstart=1921, ystart=1921)
    assert (sub["crpix1"], sub["crpix2"]) == (128.5, 128.5)
    with pytest.raises(ValueError, match="DEC"):
        assign_wcs.imager_wcsinfo(150.0, 95.0, 0.0, (8, 8))


def test_nanmedian_axis0_matches_numpy(rng):
    x = rng.normal(size=(6, 20, 30)).astype(np.float32)
    x[rng.random(x.shape) < 0.3] = np.nan
    x[:, 0, 0] = np.nan
    med, count = nanmedian_axis0(x)
    with np.errstate(all="ignore"), pytest.warns(RuntimeWarning):
        ref = np.nanmedian(x, axis=0)
    np.testing.assert_allclose(med, ref, equal_nan=True)
    assert count[0, 0] == 0 and np.isnan(med[0, 0])


def test_detector_maps_rules():
    shape = (2, 2)
    sat_dq = np.array([[pixel["NO_SAT_CHECK"], 0], [0, 0]], np.uint32)
    lin_dq = np.array([[0, pixel["NO_LIN_CORR"]], [0, 0]], np.uint32)
    coeffs = np.stack([np.zeros(shape), np.ones(shape)]).astype(np.float32)
    maps = readout.detector_maps(
        gain=np.array([[2.0, 0.0], [2.0, 2.0]]), read_noise=np.array([[5.0, np.nan], [3.0, 5.0]]),
        saturation=np.array([[6e4, 6e4], [-1.0, 6e4]]), saturation_dq=sat_dq,
        nonlinearity=coeffs, linearity_dq=lin_dq, mask_dq=np.array([[0, 0], [0, pixel["HOT"]]]))
    assert np.isnan(maps.saturation[0, 0]) and np.isnan(maps.saturation[1, 0])
    assert maps.dq[1, 0] & pixel["NO_SAT_CHECK"]
    assert np.isnan(maps.gain[0, 1])
    assert maps.read_noise[0, 1] == 5.0 and maps.dq[0, 1] & pixel["UNRELIABLE_ERROR"]
    assert np.isnan(maps.nonlinearity[:, 0, 1]).all() and maps.dq[0, 1] & pixel["NO_LIN_CORR"]
    assert maps.dq[1, 1] == pixel["HOT"]


def test_readout_mode_from_sampmode():
    assert readout.readout_mode("UTR") == "utr"
    assert readout.readout_mode("MCDS") == "mcds"
    assert readout.readout_mode("UTR", "cds") == "cds"
    with pytest.raises(ValueError, match="SAMPMODE"):
        readout.readout_mode(None)
