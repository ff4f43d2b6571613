"""The fast real-time paths of the steps against their references.

* the mesh background model against photutils Background2D (the oracle), piece by piece and
  end to end on simulated sky frames, with the documented tolerance;
* blockwise dark/flat/sky arithmetic against whole-array evaluation (bit-identical);
* detector maps that copy only what they change.
"""

import warnings

import numpy as np
import pytest
from astropy.stats import SigmaClip
from scipy import ndimage

from iris_tasks.datamodels.dqflags import pixel
from iris_tasks.steps import _mesh, _stats, dark_sub, flat_field, readout, sky_sub

# Documented tolerance of the mesh model against photutils Background2D (sky_sub.py):
# background within 1e-4 of the background RMS, variance within 1e-4 relative.
BACKGROUND_TOL_RMS = 1e-4
VARIANCE_TOL_REL = 1e-4


def _sky(rng, shape, *, level=100.0, noise=5.0, star_fraction=0.002, bad_fraction=0.02):
    """A simulated sky frame: gradient + noise + stars + bad pixels (DO_NOT_USE)."""
    ny, nx = shape
    yy, xx = np.mgrid[:ny, :nx]
    truth = level + 0.02 * xx + 0.01 * yy + 3.0 * np.sin(xx / 40.0)
    data = (truth + rng.normal(0.0, noise, shape)).astype(np.float32)
    stars = rng.random(shape) < star_fraction
    data[stars] += rng.uniform(20.0, 5000.0, int(stars.sum())).astype(np.float32)
    dq = np.zeros(shape, np.uint32)
    bad = rng.random(shape) < bad_fraction
    dq[bad] = pixel["DO_NOT_USE"]
    data[bad & (rng.random(shape) < 0.5)] = np.nan
    return data, dq


def _astropy_box_stats(data, bad, box, exclude=50.0):
    """Per-box sigma-clipped median/std the way Background2D computes them."""
    ny, nx = data.shape
    nby, nbx = -(-ny // box), -(-nx // box)
    med = np.full((nby, nbx), np.nan, np.float32)
    std = np.full((nby, nbx), np.nan, np.float32)
    clip = SigmaClip(sigma=3.0, maxiters=10)
    for i in range(nby):
        for j in range(nbx):
            sl = np.s_[i * box:(i + 1) * box, j * box:(j + 1) * box]
            v = data[sl][~bad[sl] & np.isfinite(data[sl])]
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                c = clip(v, masked=False, copy=True) if v.size else v
            if np.count_nonzero(~np.isnan(c)) <= (1 - exclude / 100) * box * box:
                continue
            med[i, j], std[i, j] = np.nanmedian(c), np.nanstd(c)
    return med, std


@pytest.mark.parametrize("shape,box", [((96, 80), 16), ((100, 130), 32), ((64, 64), 8)])
def test_box_statistics_equal_astropy_sigma_clip(rng, shape, box):
    data, dq = _sky(rng, shape, star_fraction=0.05)
    data[: shape[0] // 3, : shape[1] // 4] += rng.exponential(300, (shape[0] // 3, shape[1] // 4)
                                                              ).astype(np.float32)  # crowded
    bad = dq != 0
    bad[-box:, :box] = rng.random((box, box)) < 0.7  # a box that gets excluded
    for threads in (1, 2):
        med, std = _mesh.box_statistics(data, bad, box, threads=threads)
        ref_med, ref_std = _astropy_box_stats(data, bad, box)
        np.testing.assert_array_equal(med, ref_med)  # same clipped set, same median
        np.testing.assert_allclose(std, ref_std, rtol=1e-6)  # double vs float32 sums


def test_box_statistics_all_masked_is_an_error():
    data = np.ones((32, 32), np.float32)
    with pytest.raises(ValueError, match="usable pixels"):
        _mesh.box_statistics(data, np.ones((32, 32), bool), 16)


def test_fill_and_filter_equal_photutils_post_processing(rng):
    from photutils.utils import ShepardIDWInterpolator

    mesh = rng.normal(10.0, 1.0, (9, 12)).astype(np.float32)
    mesh[2, 3] = mesh[0, 0] = mesh[8, 11] = np.nan
    ours = _mesh.fill_and_filter(mesh, 3)
    filled = mesh.copy()
    nan = np.isnan(mesh)
    interp = ShepardIDWInterpolator(np.column_stack(np.nonzero(~nan)), mesh[~nan])
    filled[nan] = interp(np.column_stack(np.nonzero(nan)), n_neighbors=10, power=1.0)
    ref = ndimage.generic_filter(filled, np.nanmedian, size=3, mode="constant", cval=np.nan)
    np.testing.assert_array_equal(ours, ref)


@pytest.mark.parametrize("mesh_shape,box,shape", [((4, 5), 32, (128, 150)),
                                                  ((16, 16), 64, (1024, 1024))])
def test_upsample_equals_scipy_zoom(rng, mesh_shape, box, shape):
    mesh = (100.0 + rng.normal(0.0, 1.0, mesh_shape)).astype(np.float32)
    ref = ndimage.zoom(mesh, box, order=3, mode="reflect", grid_mode=True)[: shape[0], : shape[1]]
    np.clip(ref, mesh.min(), mesh.max(), out=ref)
    out = _mesh.upsample(mesh, box, shape)
    # Small images go through scipy itself; large ones through two BLAS products in float32.
    np.testing.assert_allclose(out, ref, rtol=0, atol=2e-6 * float(np.abs(mesh).max()))
    flat = _mesh.upsample(np.full(mesh_shape, 3.0, np.float32), box, shape)
    assert flat.shape == shape and (flat == 3.0).all()


@pytest.mark.parametrize("shape", [(7, 5), (33, 65), (64, 64), (100, 130)])
def test_dilate_cross_equals_scipy(rng, shape):
    mask = rng.random(shape) < 0.02
    mask[0, -1] = mask[-1, 0] = True  # edges and the last word's padding
    for iterations in (1, 3):
        np.testing.assert_array_equal(_mesh.dilate_cross(mask, iterations),
                                      ndimage.binary_dilation(mask, iterations=iterations))


@pytest.mark.parametrize("shape,box", [((256, 256), 32), ((200, 170), 32)])
def test_mesh_model_matches_background2d(rng, shape, box):
    """End to end, both passes: the documented tolerance against the photutils oracle."""
    science, dq = _sky(rng, shape)
    fast = sky_sub.model_background(science, dq, box_size=box)
    ref = sky_sub.model_background(science, dq, box_size=box, engine="photutils")
    rms = np.sqrt(ref.variance / (np.pi / 2) * box * box)
    assert np.max(np.abs(fast.background - ref.background) / rms) < BACKGROUND_TOL_RMS
    np.testing.assert_allclose(fast.variance, ref.variance, rtol=VARIANCE_TOL_REL)
    assert fast.level == pytest.approx(ref.level, rel=1e-6)
    assert fast.method == ref.method == "model" and not fast.no_sky.any()
    assert "Background2D" in fast.detail and "mesh" in fast.detail
    assert fast.background.dtype == fast.variance.dtype == np.float32


def test_mesh_model_unknown_engine():
    with pytest.raises(ValueError, match="engine"):
        sky_sub.model_background(np.ones((64, 64), np.float32), np.zeros((64, 64), np.uint32),
                                 engine="nope")


def test_blockwise_arithmetic_is_bit_identical(rng, monkeypatch):
    """dark/flat/sky results do not depend on the block size (7-pixel blocks vs one block)."""
    shape = (37, 23)

    def arr(nan=0.02, neg=0.0):
        a = rng.normal(1.0, 0.3, shape).astype(np.float32)
        a[rng.random(shape) < nan] = np.nan
        a[rng.random(shape) < neg] *= -1
        return a

    sci, err, dark, dark_err, flat, flat_err = arr(), np.abs(arr()), arr(), arr(), arr(neg=0.05), arr()
    dq = rng.integers(0, 2**20, shape).astype(np.uint32)
    ref_dq = rng.integers(0, 2**20, shape).astype(np.uint32)
    var = [np.abs(arr()) for _ in range(3)]
    est = sky_sub.SkyEstimate(arr(), np.abs(arr()), rng.random(shape) < 0.1, "model", 1.0, "x")

    def run():
        return (dark_sub.subtract_dark(sci, err, dq, dark, dark_err, ref_dq),
                flat_field.apply_flat(sci, err, dq, flat, flat_err, ref_dq, *var),
                sky_sub.subtract_sky(sci, err, dq, est))

    monkeypatch.setattr(_stats, "BLOCK_PIXELS", 7)
    small = run()
    monkeypatch.setattr(_stats, "BLOCK_PIXELS", 10**9)
    whole = run()
    for a, b in zip(small[0] + tuple(small[1].values()) + small[2],
                    whole[0] + tuple(whole[1].values()) + whole[2], strict=True):
        assert a.dtype == b.dtype and np.array_equal(a, b, equal_nan=True)


def test_row_blocks_cover_the_first_axis():
    blocks = _stats.row_blocks((10, 4), 12)
    assert blocks == [slice(0, 3), slice(3, 6), slice(6, 9), slice(9, 10)]
    assert _stats.row_blocks((0, 4), 12) == [slice(0, 0)]


def test_detector_maps_copy_only_what_they_change():
    shape = (4, 5)
    gain = np.full(shape, 2.0, np.float32)
    rn = np.full(shape, 5.0, np.float32)
    sat = np.full(shape, 6e4, np.float32)
    coeffs = np.stack([np.zeros(shape), np.ones(shape)]).astype(np.float32)
    clean = readout.detector_maps(gain=gain, read_noise=rn, saturation=sat, nonlinearity=coeffs,
                                  linearity_dq=np.zeros(shape, np.uint32))
    for got, given in ((clean.gain, gain), (clean.read_noise, rn), (clean.saturation, sat),
                       (clean.nonlinearity, coeffs)):
        assert np.shares_memory(got, given)  # nothing to change: no 4k copy
    lin_dq = np.zeros(shape, np.uint32)
    lin_dq[1, 2] = pixel["NO_LIN_CORR"]
    sat_bad = sat.copy()
    sat_bad[0, 0] = -1.0
    maps = readout.detector_maps(gain=gain, read_noise=rn, saturation=sat_bad,
                                 nonlinearity=coeffs, linearity_dq=lin_dq)
    assert np.isnan(maps.nonlinearity[:, 1, 2]).all() and np.isnan(maps.saturation[0, 0])
    assert not np.isnan(coeffs).any() and sat_bad[0, 0] == -1.0  # inputs untouched
