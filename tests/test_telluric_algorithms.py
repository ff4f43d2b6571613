"""The telluric algorithms on plain arrays (iris_tasks.ifs.telluric) and the step's choice of
standard, on small synthetic cubes (fast; the end-to-end accuracy is tests/test_telluric.py)."""

from __future__ import annotations

import datetime as dt

import numpy as np
import pytest

from iris_tasks.datamodels import CubeModel, TelluricModel
from iris_tasks.datamodels.dqflags import pixel
from iris_tasks.ifs.telluric import (
    TelluricError,
    airmass_exponent_response,
    apply_response,
    blackbody_flam,
    compute_response,
    extract_star,
    find_star,
    hydrogen_mask,
    interpolate_in_airmass,
    interpolate_over,
    photmjsr,
)
from iris_tasks.ifs.telluric_step import TelluricStep, bracketing_standards, choose_standard

DNU = pixel["DO_NOT_USE"]


def _star_cube(nw=200, ny=12, nx=16, x=7.3, y=5.6, sigma=0.8, peak=1000.0, noise=0.2, seed=0):
    rng = np.random.default_rng(seed)
    jj, ii = np.mgrid[0:ny, 0:nx]
    prof = np.exp(-0.5 * ((ii - x) ** 2 + (jj - y) ** 2) / sigma**2)
    prof /= prof.sum()
    spectrum = peak * (1.0 + 0.2 * np.sin(np.arange(nw) / 15.0))
    data = spectrum[:, None, None] * prof[None] + rng.normal(0, noise, (nw, ny, nx))
    err = np.full(data.shape, noise)
    return data, err, np.zeros(data.shape, np.uint32), spectrum


def test_find_and_extract_a_star_and_refuse_an_empty_field():
    data, err, dq, spectrum = _star_cube()
    x, y, snr = find_star(data, err, dq)
    assert abs(x - 7.3) < 0.3 and abs(y - 5.6) < 0.3 and snr > 100
    star = extract_star(data, err, dq, x, y, 4.0, snr=snr)
    assert np.allclose(star.flux, spectrum, rtol=0.01)
    assert star.core_lost == 0 and np.all(np.abs(star.lost) < 1e-12)
    # a bad voxel in the core: made up from the profile, its share reported
    dq[50, 6, 7] |= DNU
    data[50, 6, 7] = np.nan
    patched = extract_star(data, err, dq, x, y, 4.0)
    assert patched.flux[50] == pytest.approx(spectrum[50], rel=0.02)
    assert 0 < patched.lost[50] < 0.5 and abs(patched.lost[49]) < 1e-12
    empty = np.random.default_rng(1).normal(0, 0.2, data.shape)
    with pytest.raises(TelluricError, match="no star"):
        find_star(empty, err, np.zeros_like(dq))


def test_saturated_core_is_reported():
    data, err, dq, _ = _star_cube()
    dq[:, 5:7, 6:9] |= DNU  # the core's voxels unusable at every wavelength
    star = extract_star(data, err, dq, 7.3, 5.6, 4.0)
    assert star.core_lost > 0.5


def test_blackbody_through_the_zero_point_and_photmjsr():
    w = np.array([2.159, 2.0, 2.3])
    f = blackbody_flam(w, 9700.0, 10.0, "Kbb")
    assert f[0] == pytest.approx(4.283e-11 * 1e-4, rel=1e-9)
    # Rayleigh-Jeans side: F_lambda ~ lambda^-4 (slightly shallower at 9700 K)
    assert 3.5 < np.log(f[1] / f[2]) / np.log(2.3 / 2.0) < 4.0
    with pytest.raises(TelluricError, match="temperature"):
        blackbody_flam(w, -1.0, 10.0, "Ks")
    # 1 erg/s/cm^2/A/arcsec^2 at 2.2 um in MJy/sr: lambda^2/c / 1e-17 / arcsec^2 in sr
    assert photmjsr(1.0, 2.2) == pytest.approx((2.2e4) ** 2 / 2.99792458e18 / 1e-17
                                               / (np.pi / 648000.0) ** 2, rel=1e-9)


def test_hydrogen_windows_are_bridged_and_the_response_follows_the_counts():
    w = np.linspace(2.10, 2.25, 400)
    instrument = 1.0 + 0.1 * (w - 2.1)
    line = 1.0 - 0.4 / (1.0 + ((w - 2.16612) / 0.00125) ** 2)
    model = blackbody_flam(w, 9700.0, 10.0, "Ks")
    counts = 1e16 * model * instrument * line
    mask = hydrogen_mask(w)
    assert mask.any() and abs(w[mask].mean() - 2.1661) < 0.002
    bridged = interpolate_over(w, counts / model, mask)
    assert np.allclose(bridged, 1e16 * instrument * np.where(mask, 1.0, line), rtol=0.006)

    class Star:
        flux = counts
        variance = (0.01 * counts) ** 2
        lost = np.zeros(w.size)

    resp, resp_err, rdq, qa = compute_response(w, Star, model, lines="interpolate")
    assert np.allclose(resp[~mask], 1e16 * instrument[~mask] * line[~mask])
    assert np.allclose(resp[mask], 1e16 * instrument[mask], rtol=0.006)
    assert (rdq[mask] & pixel["UNRELIABLE_FLAT"]).all() and not (rdq & DNU).any()
    assert qa["snr"] == pytest.approx(100.0) and qa["line_residual"] < 0.01
    # the fitted line model (the default) takes the line out, wings included, and keeps a
    # narrow absorption feature under it that interpolation would erase
    feature = 1.0 - 0.05 * np.exp(-0.5 * ((w - 2.1640) / 0.0004) ** 2)
    Star.flux = counts * feature
    fit, _, _, qa = compute_response(w, Star, model)
    assert qa["lines_fitted"] == 1.0
    assert np.allclose(fit, 1e16 * instrument * feature, rtol=0.02)  # 1.4 % at the core
    k = int(np.argmin(np.abs(w - 2.1640)))
    assert fit[k] / (1e16 * instrument[k]) < 0.96  # the 5 % feature is kept
    bridged, _, _, _ = compute_response(w, Star, model, lines="interpolate")
    assert bridged[k] / (1e16 * instrument[k]) > 0.99  # interpolation erases it


def test_airmass_rescaling_recovers_beer_lambert_on_resolved_absorption():
    w = np.linspace(2.0, 2.2, 800)
    tau = 0.3 * np.exp(-0.5 * ((w - 2.1) / 0.002) ** 2) + 0.2 * np.exp(-0.5 * ((w - 2.05) / 0.003) ** 2)
    instrument = 5.0 * (1.0 + 0.3 * (w - 2.0))
    r13 = instrument * np.exp(-1.3 * tau)
    r12 = instrument * np.exp(-1.2 * tau)
    scaled = airmass_exponent_response(w, r13, 1.2 / 1.3)
    assert np.max(np.abs(scaled / r12 - 1)) < 0.005
    assert np.max(np.abs(r13 / r12 - 1)) > 0.02  # without it: the deepest feature's error
    assert np.array_equal(airmass_exponent_response(w, r13, 1.0), r13)


def test_apply_response_units_errors_and_undefined_planes():
    data = np.full((3, 2, 2), 100.0)
    err = np.full((3, 2, 2), 10.0)
    dq = np.zeros((3, 2, 2), np.uint32)
    resp = np.array([1e14, 2e14, np.nan])
    resp_err = np.array([1e12, 0.0, 0.0])
    sci, e, q = apply_response(data, err, dq, resp, resp_err, np.zeros(3, np.uint32), 0.25)
    assert sci[0, 0, 0] == pytest.approx(100 / 1e14 / 0.25, rel=1e-6)
    assert e[0, 0, 0] == pytest.approx(sci[0, 0, 0] * np.hypot(0.1, 0.01), rel=1e-5)
    assert e[1, 0, 0] == pytest.approx(sci[1, 0, 0] * 0.1, rel=1e-5)
    assert np.isnan(sci[2]).all() and (q[2] & DNU).all() and not (q[:2] & DNU).any()


def _ref(filter_name: str, hour: float, airmass: float, data=None) -> TelluricModel:
    data = np.ones(3) if data is None else np.asarray(data, np.float64)
    ref = TelluricModel(data=data, err=0.01 * data, dq=np.zeros(data.size, np.uint32),
                        wavelength=2.0 + 0.1 * np.arange(data.size))
    ins = ref.meta.instrument
    ins.detector, ins.ifsmode, ins.ifsscale, ins.filter = "IFS", "SLICER", "25", filter_name
    when = dt.datetime(2026, 11, 30) + dt.timedelta(hours=hour)
    ref.meta.observation.date = when.strftime("%Y-%m-%d")
    ref.meta.observation.time = when.strftime("%H:%M:%S")
    ref.meta.telluric.airmass = airmass
    return ref


def test_choose_the_standard_nearest_in_time_and_airmass():
    cube = CubeModel(data=np.zeros((3, 2, 2), np.float32))
    cube.meta.instrument.detector, cube.meta.instrument.ifsmode = "IFS", "SLICER"
    cube.meta.instrument.ifsscale, cube.meta.instrument.filter = "25", "Kbb"
    cube.meta.observation.date, cube.meta.observation.time = "2026-11-30", "08:00:00"
    cube.meta.observation.airmass = 1.2
    cands = [("near_time_far_air", _ref("Kbb", 8.2, 1.9)), ("close", _ref("Kbb", 7.0, 1.25)),
             ("hbb", _ref("Hbb", 8.0, 1.2)), ("old", _ref("Kbb", -10.0, 1.2))]
    (name, _), reasons = choose_standard(cube, cands, max_hours=12.0, hours_per_airmass=10.0)
    assert name == "close"
    assert any("hbb: FILTER=Hbb (cube Kbb)" in r for r in reasons)
    assert any("old: taken 18.0 h" in r for r in reasons)
    best, _ = choose_standard(cube, cands[2:], max_hours=12.0, hours_per_airmass=10.0)
    assert best is None
    # two applicable standards on either side of 1.2: the nearest in airmass on each side
    cands += [("below", _ref("Kbb", 6.0, 1.12)), ("further_below", _ref("Kbb", 7.9, 1.05))]
    (low, _), (high, _) = bracketing_standards(cube, cands, max_hours=12.0)
    assert (low, high) == ("below", "close")
    assert bracketing_standards(cube, cands[4:], max_hours=12.0) is None  # one side only
    cube.meta.observation.airmass = None
    assert bracketing_standards(cube, cands, max_hours=12.0) is None


def test_two_standards_bracketing_the_airmass_are_interpolated_per_bin():
    """Beer-Lambert per bin, with an unresolved saturated line in bin 2 whose effective
    transmission is no power law of the airmass: the two standards' log-responses,
    interpolated, give the response at the cube's airmass; one standard rescaled cannot."""
    instrument = np.array([2.0, 2.0, 2.0, 2.0, 2.0])
    tau = np.array([0.0, 0.05, 0.8, 0.3, 0.0])

    def response(x):
        t = np.exp(-tau * x)
        t[2] = 0.5 + 0.5 * np.exp(-3.0 * x)  # half the bin saturated: the wings only
        return instrument * t

    cube = CubeModel(data=np.ones((5, 2, 2), np.float32), err=np.full((5, 2, 2), 0.1, np.float32),
                     dq=np.zeros((5, 2, 2), np.uint32), wavelength=2.0 + 0.1 * np.arange(5))
    cube.meta.instrument.detector, cube.meta.instrument.ifsmode = "IFS", "SLICER"
    cube.meta.instrument.ifsscale, cube.meta.instrument.filter = "25", "Kbb"
    cube.meta.observation.date, cube.meta.observation.time = "2026-11-30", "08:00:00"
    cube.meta.observation.airmass = 1.2
    cube.meta.observation.obsname = "SLI-SCI"
    low, high = _ref("Kbb", 7.0, 1.1, response(1.1)), _ref("Kbb", 9.0, 1.3, response(1.3))
    r, e, dq, w = interpolate_in_airmass((low.data, low.err, low.dq, 1.1),
                                         (high.data, high.err, high.dq, 1.3), 1.2)
    assert w == pytest.approx(0.5)
    truth = response(1.2)
    assert np.abs(r / truth - 1).max() < 2e-3  # exact but for the saturated bin's curvature
    np.testing.assert_allclose(e / r, np.hypot(0.5 * 0.01, 0.5 * 0.01), rtol=1e-9)
    assert not dq.any()
    bad = high.dq.copy()
    bad[1] = DNU
    assert interpolate_in_airmass((low.data, low.err, low.dq, 1.1), (high.data, high.err, bad, 1.3),
                                  1.2)[2][1] & DNU
    with pytest.raises(ValueError, match="not increasing"):
        interpolate_in_airmass((low.data, low.err, low.dq, 1.3), (high.data, high.err, high.dq, 1.1),
                               1.2)
    # the step: BRACKET recorded with both standards; the cube divided by the interpolated
    # response (one spaxel of 0.025" squared)
    out = TelluricStep.call(cube, telluric_files=[low, high])
    tel = out.meta.telluric
    assert (tel.method, tel.airmass, tel.airmass2) == ("BRACKET", 1.1, 1.3)
    assert tel.weight2 == pytest.approx(0.5)
    assert tel.hours == pytest.approx(-1.0) and tel.hours2 == pytest.approx(1.0)
    np.testing.assert_allclose(out.data[:, 0, 0] * r * 0.025**2, 1.0, rtol=1e-5)
    # one standard: its absorption rescaled as a power law, which misses the saturated bin
    one = TelluricStep.call(cube, telluric_files=[low])
    assert (one.meta.telluric.method, one.meta.telluric.airmass_exponent) == (
        "SCALED", pytest.approx(1.2 / 1.1))
    # off: the nearest standard alone, rescaled
    assert TelluricStep.call(cube, telluric_files=[low, high],
                             bracket_airmass=False).meta.telluric.method == "SCALED"


def test_step_skips_a_standard_and_a_cube_without_references(caplog):
    cube = CubeModel(data=np.ones((3, 2, 2), np.float32), err=np.ones((3, 2, 2), np.float32),
                     wavelength=np.array([2.0, 2.1, 2.2]))
    cube.meta.observation.obsname = "SLI-TEL"
    out = TelluricStep.call(cube)
    assert out.meta.cal_step.telluric == "SKIPPED"
    cube.meta.observation.obsname = "SLI-SCI"
    cube.meta.instrument.filter = "Kbb"
    out = TelluricStep.call(cube, telluric_files=[])
    assert out.meta.cal_step.telluric == "SKIPPED"
    assert "no telluric standard applies" in caplog.text
    assert np.array_equal(out.data, np.ones((3, 2, 2)))


def test_field_aperture_is_the_largest_the_field_holds():
    """The aperture a narrow field (the 4 mas lenslet's 9-20 spaxel rows) can hold: at most
    MAX_APERTURE_OUTSIDE of its area beyond the field; a field that holds the asked radius
    keeps it; an off-centre star gets less; never below MIN_APERTURE_SPAXELS."""
    from iris_tasks.masters.telluric import (
        MAX_APERTURE_OUTSIDE,
        MIN_APERTURE_SPAXELS,
        aperture_outside_fraction,
        field_aperture,
    )

    assert field_aperture(25.0, (64, 64)) == 25.0
    for rows in (9, 20):
        r = field_aperture(25.0, (rows, 128))
        assert 1.5 < r < 25.0
        out = aperture_outside_fraction(63.5, (rows - 1) / 2, r, (rows, 128))
        assert MAX_APERTURE_OUTSIDE - 0.005 < out <= MAX_APERTURE_OUTSIDE
        assert aperture_outside_fraction(63.5, (rows - 1) / 2, r + 0.2, (rows, 128)) > MAX_APERTURE_OUTSIDE
    centred = field_aperture(25.0, (9, 128))
    assert field_aperture(25.0, (9, 128), at=(63.5, 2.0)) < centred
    assert field_aperture(25.0, (2, 128)) == MIN_APERTURE_SPAXELS
