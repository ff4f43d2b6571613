"""Picture frame: an edge pattern whose amplitude drifts over the ramp; the reference-pixel
correction carries the border's share of it to the whole frame. ``correct_picture_frame``
fits its amplitude on background pixels and removes it (the readout step's ``picture_frame``)."""

import numpy as np
import pytest

import readout_cy as rc
from iris_tasks.datamodels.dqflags import pixel
from iris_tasks.steps import readout as ro
from readout_cy.reference import refpix_pattern_correction

sim = pytest.importorskip("iris_tasks.simulate.detector")

N = 128
NCH = 8


def _pattern(ny: int, nx: int, scale: float) -> np.ndarray:
    y, x = np.arange(ny), np.arange(nx)
    d = np.minimum.outer(np.minimum(y, ny - 1 - y), np.minimum(x, nx - 1 - x))
    return np.exp(-d / scale)


@pytest.mark.parametrize("masked", [False, True])
def test_pattern_correction_is_what_the_kernels_do(masked):
    """A noiseless ramp of a flat level plus a pattern growing at a DN/s: the kernels' slopes
    equal a * (p - off[c] - rowc[y]) from refpix_pattern_correction, also with reference
    pixels left out (mask); no pattern: zero slopes."""
    ny, nx, nr = 64, 64, 6
    t = 1.4 * (np.arange(nr) + 1)
    p = _pattern(ny, nx, 6.0)
    a = 400.0  # DN/s at the edge: rounding to integers leaves < 0.2 DN/s (5e-4)
    reads = np.rint(1000.0 + a * t[:, None, None] * p[None]).astype(np.uint16)
    mask = np.zeros((ny, nx), bool)
    if masked:
        mask[0, 3:40] = True
        mask[10:30, 1] = True
        mask[ny - 2, :] = True
    kw = dict(
        gain=2.0,
        read_noise=5.0,
        saturation=60000.0,
        dqflags=pixel,
        refpix_channels=4,
        jump_threshold=None,
        weighting="unweighted",
        refpix_reject=None,
        refpix_mask=mask if masked else None,
    )
    res = rc.process_ramp(reads, t, **kw)
    excl = res.refpix.excluded if masked else None
    if masked:
        assert len(excl[0]) > 0
    off, rowc = refpix_pattern_correction(
        p[np.r_[0:4, ny - 4 : ny]], p[:, np.r_[0:4, nx - 4 : nx]], 4, 11, excl
    )
    chan = (np.arange(nx) * 4) // nx
    expect = a * (p - off[chan][None, :] - rowc[:, None])
    inner = np.s_[4:-4, 4:-4]
    np.testing.assert_allclose(res.slope[inner], expect[inner], atol=0.2)
    assert np.abs(expect[inner]).max() > 100  # the test has a pattern to see
    flat = rc.process_ramp(np.full_like(reads, 1000), t, **kw)
    assert np.abs(flat.slope[inner]).max() < 1e-4


def test_pattern_correction_names_bad_input():
    with pytest.raises(ValueError, match="top_bottom must be"):
        refpix_pattern_correction(np.zeros((4, 64)), np.zeros((64, 8)), 4, 11)
    with pytest.raises(ValueError, match="off the border"):
        refpix_pattern_correction(
            np.zeros((8, 64)), np.zeros((64, 8)), 4, 11, (np.array([20]), np.array([20]))
        )


def _frame(seed: int, **kw):
    det = sim.DetectorModel.for_detector("IMG1", size=N, seed=2, nchan=NCH, **kw)
    reads, truth = sim.simulate_ramp(
        det, 5.0, nreads=10, rng=30 + seed, noise=["poisson", "read", "ktc"], cosmic_rays=False
    )
    maps = ro.detector_maps(
        gain=det.gain,
        read_noise=det.read_noise,
        saturation=det.saturation_reference(),
        nonlinearity=det.linearity_coefficients()[0],
    )
    res = ro.process(reads, truth["read_times"], maps, mode="utr", channels=NCH)
    clean = det.active & ~det.hot & ~det.dead & ~det.low_qe
    y = np.arange(N)
    d = np.minimum.outer(np.minimum(y, N - 1 - y), np.minimum(y, N - 1 - y))
    return res, truth["rate_e_per_s"] / det.gain, clean & (d >= 32)


@pytest.fixture(scope="module")
def frames():
    return {
        label: [_frame(s, **kw) for s in (1, 2)]
        for label, kw in (
            ("white", {}),
            ("drift", dict(picture_frame_drift=0.5, picture_frame_scale=8.0)),
        )
    }


def test_picture_frame_drift_is_removed(frames):
    """0.5 DN/s drift (scale 8 px): the reference-pixel correction leaves ~-0.4 DN/s in the
    interior; after the correction < 0.05, with the scale fitted near 8 px."""
    for res, true, inner in frames["drift"]:
        before = float((res.slope - true)[inner].mean())
        slope = res.slope.copy()
        pf = ro.correct_picture_frame(slope, res.dq, channels=NCH, excluded=res.refpix.excluded)
        after = float((slope - true)[inner].mean())
        assert before < -0.3
        assert abs(after) < 0.05, (before, after, pf)
        assert pf.scale_fitted and 5.0 < pf.scale < 12.0
        assert abs(pf.amplitude - 0.5) < 5 * pf.amplitude_err + 0.05
        # a given scale: the same within noise
        fixed = res.slope.copy()
        pf8 = ro.correct_picture_frame(
            fixed, res.dq, channels=NCH, scale=8.0, excluded=res.refpix.excluded
        )
        assert not pf8.scale_fitted and pf8.scale == 8.0
        assert abs(float((fixed - true)[inner].mean())) < 0.05


def test_no_picture_frame_no_change(frames):
    """Frames without the effect: no pattern detected (the fallback scale), the amplitude
    within noise and the interior mean moved by less than 3 of its errors x the template."""
    for res, _true, inner in frames["white"]:
        slope = res.slope.copy()
        pf = ro.correct_picture_frame(slope, res.dq, channels=NCH, excluded=res.refpix.excluded)
        assert not pf.scale_fitted and pf.scale == 16.0
        assert abs(pf.amplitude) < 4 * pf.amplitude_err
        moved = float((slope - res.slope)[inner].mean())
        assert abs(moved) < 3 * pf.amplitude_err + 1e-6
        ok = np.isfinite(res.slope)
        assert np.array_equal(np.isfinite(slope), ok)  # NaN stays NaN


def test_correct_picture_frame_names_bad_input(frames):
    res = frames["white"][0][0]
    with pytest.raises(TypeError, match="float32"):
        ro.correct_picture_frame(res.slope.astype(np.float64), res.dq, channels=NCH)
    with pytest.raises(ValueError, match="scale must be > 0"):
        ro.correct_picture_frame(res.slope.copy(), res.dq, channels=NCH, scale=0.0)
    with pytest.raises(ValueError, match="not divisible"):
        ro.correct_picture_frame(res.slope.copy(), res.dq, channels=7)
    dq = np.full_like(res.dq, pixel["DO_NOT_USE"])
    with pytest.raises(ValueError, match="usable background pixels"):
        ro.correct_picture_frame(res.slope.copy(), dq, channels=NCH)


def test_readout_step_picture_frame_option(tmp_path):
    """picture_frame=True equals correct_picture_frame on the step's plain output; off by
    default; a negative scale is refused with the file named."""
    from test_steps_support import detector_references, write_ramp

    from iris_tasks.steps import ReadoutStep

    refs = detector_references(tmp_path / "refs")
    over = {
        f"override_{t}": str(refs[t])
        for t in ("mask", "saturation", "linearity", "readnoise", "gain")
    }
    raw = write_ramp(tmp_path / "sci.fits", np.full((64, 64), 20.0))
    plain = ReadoutStep.call(str(raw), **over)
    out = ReadoutStep.call(str(raw), picture_frame=True, picture_frame_scale=8.0, **over)
    expect = np.array(plain.data, np.float32)
    ro.correct_picture_frame(
        expect, np.array(plain.dq), channels=plain.meta.exposure.nchan or 32, scale=8.0
    )
    np.testing.assert_allclose(out.data, expect, rtol=0, atol=1e-5)
    assert not np.array_equal(out.data, plain.data)
    with pytest.raises(ValueError, match="sci.fits.*picture_frame_scale"):
        ReadoutStep.call(str(raw), picture_frame=True, picture_frame_scale=-1.0, **over)


def test_without_reference_pixels_the_template_is_the_pattern():
    """refpix=False (subarrays): T = p, a negative amplitude is removed as well."""
    rng = np.random.default_rng(5)
    n = 96
    p = _pattern(n, n, 6.0)
    base = (3.0 + 0.3 * rng.standard_normal((n, n))).astype(np.float32)
    slope = (base - 0.8 * p).astype(np.float32)
    slope[40, 50] = np.nan
    dq = np.zeros((n, n), np.uint32)
    pf = ro.correct_picture_frame(slope, dq, channels=4, refpix=False)
    assert pf.scale_fitted and 4.5 < pf.scale < 8.0
    assert abs(pf.amplitude + 0.8) < 5 * pf.amplitude_err
    assert abs(float(np.nanmean(slope[:6] - base[:6]))) < 0.05  # the edge rows, where p ~ 1
    assert np.isnan(slope[40, 50])
