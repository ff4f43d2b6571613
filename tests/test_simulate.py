"""The simulator's detector statistics checked against its own inputs (small arrays, fast)."""

import dataclasses

import numpy as np
import pytest

from iris_tasks.simulate import (
    DetectorModel,
    StarField,
    apply_linearity,
    build_scene,
    build_trace,
    inverse_series,
    project_cube,
    simulate_ramp,
)
from iris_tasks.simulate.detector import _column_segments, _poisson_increments


@pytest.fixture(scope="module")
def det():
    return DetectorModel.for_detector("IMG2", 64, seed=5)


def _good(det):
    return det.active & ~det.hot & ~det.dead


def test_detector_is_deterministic_per_name_and_seed():
    a = DetectorModel.for_detector("IMG1", 64, seed=1)
    b = DetectorModel.for_detector("IMG1", 64, seed=1)
    c = DetectorModel.for_detector("IMG3", 64, seed=1)
    np.testing.assert_array_equal(a.bias, b.bias)
    np.testing.assert_array_equal(a.dark_current, b.dark_current)
    assert a.det_id == b.det_id
    assert not np.array_equal(a.bias, c.bias)
    with pytest.raises(ValueError, match="unknown detector"):
        DetectorModel.for_detector("IMG9", 64)


def test_detector_maps_have_the_documented_properties():
    d = DetectorModel.for_detector("IMG1", 256, seed=2)
    act = d.active
    assert act.sum() == (256 - 8) ** 2
    assert 1.9 < d.gain_nominal < 2.2
    normal = act & ~d.hot
    assert 0.003 < np.median(d.dark_current[normal]) < 0.007
    hot_frac = d.hot.sum() / act.sum()
    assert 0.0003 < hot_frac < 0.003
    assert np.all((d.dark_current[d.hot] >= 1.0) & (d.dark_current[d.hot] <= 10.0))
    assert np.all(d.dark_current[~act] == 0) and np.all(d.pixel_response[~act] == 0)
    assert 60000 <= d.saturation.min() and d.saturation.max() <= 65000
    flat = d.flat("Ks")
    good = act & ~d.dead & ~d.low_qe
    assert flat[good].mean() == pytest.approx(1.0, abs=1e-4)
    assert 0.01 < flat[good].std() < 0.06  # pixel-to-pixel + large scale
    assert np.all(flat[d.dead] == 0)
    assert not np.array_equal(d.flat("Ks"), d.flat("H"))  # large-scale part depends on filter


def test_read_noise_from_read_differences(det):
    quiet = dataclasses.replace(det, onef_rms=0.0)
    reads, _ = simulate_ramp(quiet, None, 24, rng=1, cosmic_rays=False)
    diff = np.diff(reads[0].astype(np.float64), axis=0)
    for region in (~det.active, _good(det)):
        measured = np.sqrt(np.mean(diff[:, region].var(axis=0, ddof=1)) / 2)
        expected = np.sqrt(np.mean(det.read_noise[region] ** 2) + 1 / 12)  # + quantisation
        assert measured == pytest.approx(expected, rel=0.03)


def test_one_over_f_noise_is_correlated_along_rows(det):
    only_onef = dataclasses.replace(det, onef_common=0.0)
    reads, _ = simulate_ramp(only_onef, None, 4, rng=3, cosmic_rays=False, noise={"onef"})
    frame = reads[0, 1].astype(np.float64) - reads[0, 0]
    # Within one channel and one row the 1/f noise is nearly constant (slow compared to a row).
    chan = det.channel_of_column
    c0 = frame[:, chan == 0]
    row_means = c0.mean(axis=1)
    assert row_means.std() > 2 * np.abs(c0 - row_means[:, None]).mean() / 3
    assert frame.std() > 1.0
    chans, segs = _column_segments(64, 32, 2)
    assert chans[0] == 0 and segs[0] == 0 and chans[2] == 1 and segs[2] == 1  # odd channels reversed


def test_poisson_variance_of_last_minus_first(det):
    """Shot noise: variance of (last - first) over many ramps equals signal/gain + 2 rn^2,
    below and above the normal-approximation threshold (after linearising)."""
    coeffs, _ = det.linearity_coefficients()
    good = _good(det)
    for rate, normal in ((60.0, False), (1500.0, True)):
        reads, truth = simulate_ramp(det, rate, 5, nramps=24, rng=4, cosmic_rays=False,
                                     noise={"poisson", "read", "ktc"})
        assert (truth["n_normal_approx"] > 0) == normal
        lin = apply_linearity(coeffs, reads.astype(np.float64) - det.bias)
        d = lin[:, -1] - lin[:, 0]
        measured = d.var(axis=0, ddof=1)
        predicted = d.mean(axis=0) / det.gain + 2 * det.read_noise**2 + 2 / 12
        assert np.mean(measured[good]) / np.mean(predicted[good]) == pytest.approx(1.0, abs=0.04)
        signal_e = d.mean(axis=0) * det.gain
        expected_e = rate * 4 * 1.4 + det.dark_current * 4 * 1.4
        assert np.median(signal_e[good] / expected_e[good]) == pytest.approx(1.0, abs=0.005)


def test_poisson_splitting_matches_independent_increments():
    rng = np.random.default_rng(0)
    lam = np.full((200, 200), 0.05, np.float32)  # 0.5 e- per pixel over 10 reads: split path
    inc, _ = _poisson_increments(rng, lam, 10)
    assert inc.mean() == pytest.approx(0.05, rel=0.05)
    assert inc.var() == pytest.approx(0.05, rel=0.05)
    per_read = inc.reshape(10, -1).mean(axis=1)
    assert per_read.std() < 0.01  # uniform in time


def test_star_flux_recovered_by_aperture_sum(det):
    star = StarField(x=[31.3], y=[30.6], flux=[4000.0], fwhm_px=3.0)
    rate = star.render(det.shape)
    assert rate.sum() == pytest.approx(4000.0, rel=1e-5)
    reads, truth = simulate_ramp(det, rate, 8, rng=0, cosmic_rays=False, noise=False)
    coeffs, _ = det.linearity_coefficients()
    lin = apply_linearity(coeffs, reads[0].astype(np.float64) - det.bias)
    slope_e = (lin[-1] - lin[0]) * det.gain / (7 * 1.4)
    R = star.stamp_radius
    ap = np.s_[31 - R:31 + R + 1, 32 - R:32 + R + 1]
    recovered = slope_e[ap].sum() - det.dark_current[ap].sum()
    assert recovered == pytest.approx(4000.0, rel=0.005)


def test_nonlinearity_and_inverse_coefficients(det):
    rate = 8000.0
    reads, truth = simulate_ramp(det, rate, 10, rng=1, cosmic_rays=False, noise=False)
    raw = reads[0].astype(np.float64) - det.bias
    true = truth["read_times"][:, None, None] * truth["rate_e_per_s"] / det.gain
    good = _good(det)
    below = (reads[0] < det.saturation_reference()) & good
    # forward model: measured = true * (1 - a * true), a few % low near full well
    np.testing.assert_allclose(raw[below], (true * (1 - det.nonlin_a * true))[below], atol=0.51)
    assert (1 - raw[below] / true[below]).max() > 0.03
    coeffs, err = det.linearity_coefficients()
    assert err < 1e-5 and coeffs.shape[0] >= 3
    lin = apply_linearity(coeffs, raw)
    bright = below & (true > 1000)
    assert np.max(np.abs(lin[bright] / true[bright] - 1)) < 1e-3
    g, err = inverse_series(0.06)
    assert err < 1e-5
    assert g[0] == pytest.approx(1.0, rel=1e-5) and g[1] == pytest.approx(1.0, rel=0.01)  # t = m + a m^2 + ...
    v = 0.04
    exact = (1 - np.sqrt(1 - 4 * v)) / 2 / v
    assert np.polynomial.polynomial.polyval(v, g) == pytest.approx(exact, rel=1e-5)


def test_saturation_plateau_and_uint16_clipping(det):
    reads, _ = simulate_ramp(det, 2.0e5, 6, rng=2, cosmic_rays=False, noise=False)
    good = _good(det)
    last = reads[0, -1]
    np.testing.assert_array_equal(last[good], np.rint(det.saturation[good]))
    assert np.all(last[good] >= det.saturation_reference()[good])
    noisy, _ = simulate_ramp(det, 2.0e5, 6, rng=2, cosmic_rays=False)
    plateau = noisy[0, -1].astype(float) - det.saturation
    # saturated reads keep read and 1/f noise around the plateau
    assert abs(np.median(plateau[good])) < 3.0 and plateau[good].std() < 8
    high = dataclasses.replace(det, bias=det.bias + 60000, saturation=det.saturation + 60000)
    r, _ = simulate_ramp(high, 100.0, 3, rng=0, cosmic_rays=False)
    assert r.dtype == np.uint16 and r.max() == 65535
    low = dataclasses.replace(det, bias=det.bias - 20000)
    r, _ = simulate_ramp(low, None, 3, rng=0, cosmic_rays=False)
    assert r.min() == 0


def test_cosmic_rays_at_expected_rate_and_visible_as_jumps(det):
    busy = dataclasses.replace(det, cr_rate=3000.0)
    nreads, read_time, nramps = 10, 1.4, 3
    reads, truth = simulate_ramp(busy, None, nreads, read_time, nramps, rng=7, noise=False)
    cr = truth["cosmic_rays"]
    area_cm2 = (64 - 8) ** 2 * 1e-6
    expected = 3000.0 * area_cm2 * nreads * read_time * nramps
    assert abs(cr["x"].size - expected) < 4 * np.sqrt(expected)
    assert np.all(~np.isin(cr["y"], [0, 1, 2, 3, 60, 61, 62, 63]))
    diff = np.diff(reads.astype(np.float64), axis=1)
    seen = 0
    later = np.flatnonzero(cr["read"] >= 1)
    for i in later:
        jump = diff[cr["ramp"][i], cr["read"][i] - 1, cr["y"][i], cr["x"][i]]
        seen += jump > 0.5 * 0.6 * cr["electrons"][i] / 2.2 - 1
    assert seen >= 0.95 * later.size
    # no cosmic rays when disabled
    _, quiet = simulate_ramp(busy, None, nreads, read_time, 1, rng=7, cosmic_rays=False)
    assert quiet["cosmic_rays"]["x"].size == 0


def test_reference_pixels_see_no_light_and_channel_biases_show(det):
    reads, _ = simulate_ramp(det, 500.0, 5, rng=3)
    d = reads[0, -1].astype(float) - reads[0, 0]
    ref = ~det.active
    assert abs(d[ref].mean()) < 1.0 and d[det.active].mean() > 900
    first = reads[0, 0].astype(float)
    rows = np.r_[0:4, 60:64]
    chan = det.channel_of_column
    medians = np.array([np.median(first[rows][:, chan == c]) for c in range(det.nchan)])
    assert medians.std() > 50  # ~150 DN channel offsets
    assert np.corrcoef(medians, det.channel_bias)[0, 1] > 0.99


def test_same_rng_same_reads(det):
    a, _ = simulate_ramp(det, 20.0, 4, rng=11)
    b, _ = simulate_ramp(det, 20.0, 4, rng=11)
    c, _ = simulate_ramp(det, 20.0, 4, rng=12)
    assert a.tobytes() == b.tobytes()
    assert a.tobytes() != c.tobytes()


def test_chunking_covers_the_whole_frame(det):
    calls = []
    reads, _ = simulate_ramp(det, 10.0, 3, rng=1, chunk_elements=3 * 64 * 10,
                             progress=lambda f, t: calls.append(f))
    assert len(calls) == 7 and calls[-1] == 1.0
    assert reads[0, 0].min() > 5000  # every row was written (bias ~ 12000)


@pytest.mark.parametrize("mode", ["LENSLET", "SLICER"])
def test_ifs_trace_and_projection_conserve_flux(mode):
    trace = build_trace(mode, 128, "Kbb", seed=1)
    nw, ny_s, nx_s = trace.cube_shape
    assert trace.trace_x.shape == (ny_s, nx_s, nw) and trace.wavelength.size == nw
    assert trace.trace_x.min() >= 4 + 2 and trace.trace_x.max() <= 128 - 4 - 3
    assert trace.trace_y.min() >= 4 + 2 and trace.trace_y.max() <= 128 - 4 - 2
    assert np.all(np.diff(trace.trace_y, axis=2) > 0.9)  # dispersed along +y, ~1 px per bin
    scene = build_scene(trace, seed=1)
    cube = scene.cube("science")
    image = project_cube(trace, cube, (128, 128))
    assert image.sum() == pytest.approx((cube * trace.throughput[None]).sum(), rel=1e-5)
    # a single spaxel at a single wavelength lands where the trace says
    one = np.zeros_like(cube)
    one[nw // 2, ny_s // 2, nx_s // 2] = 100.0
    img = project_cube(trace, one, (128, 128))
    y, x = np.unravel_index(np.argmax(img), img.shape)
    assert abs(x - trace.trace_x[ny_s // 2, nx_s // 2, nw // 2]) <= 0.5
    assert abs(y - trace.trace_y[ny_s // 2, nx_s // 2, nw // 2]) <= 1.0
    line = scene.cube("science").sum(axis=(1, 2))
    k = np.argmin(np.abs(trace.wavelength - scene.line[1]))
    assert line[k] > 1.5 * np.median(line)  # the emission line is in the cube
