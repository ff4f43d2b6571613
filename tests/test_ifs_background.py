"""Residual 1/f background of IFS frames fitted on the extraction's residual (iris_tasks.ifs.background)."""

import numpy as np
import pytest

from iris_tasks.ifs.background import (
    BackgroundSpec,
    background_pixels,
    fit_background,
    row_basis,
)
from iris_tasks.ifs.destripe import channel_edges
from iris_tasks.ifs.extract import build_geometry, extract


def test_row_basis_is_a_partition_of_unity_with_knots_at_both_ends():
    knots, basis = row_basis(100, 24)
    assert knots[0] == 0 and knots[-1] == 99 and basis.shape == (100, knots.size)
    assert np.allclose(basis.sum(axis=1), 1.0)
    assert np.allclose(basis @ knots, np.arange(100))  # reproduces a straight line exactly
    with pytest.raises(ValueError):
        row_basis(10, 0)


def _channel_curves(rng, ny, nchan, knot_rows, common_rms, channel_rms):
    knots, basis = row_basis(ny, knot_rows)
    common = rng.normal(0.0, common_rms, knots.size)
    curves = common + rng.normal(0.0, channel_rms, (nchan, knots.size))
    return basis @ curves.T, curves  # (ny, nchan), (nchan, K)


def test_channels_with_pixels_get_their_own_curve_and_the_others_the_common_one():
    rng = np.random.default_rng(5)
    ny, nx, nchan = 256, 256, 8
    spec = BackgroundSpec(nchan=nchan, knot_rows=32, border=0)
    per_row, curves = _channel_curves(rng, ny, nchan, 32, 1.0, 0.5)
    edges = channel_edges(nx, nchan)
    truth = np.repeat(per_row, np.diff(edges), axis=1)
    residual = truth + rng.normal(0.0, 0.1, (ny, nx))
    residual[::17, 3::41] += 50.0  # cosmic-ray remnants in the measuring pixels
    pixels = np.zeros((ny, nx), bool)
    for c in range(nchan - 2):  # the last two channels have no background pixel
        pixels[:, edges[c] + 2:edges[c] + 6] = True
    fit = fit_background(residual, np.full((ny, nx), 100.0), pixels, spec)
    assert fit.n_channels_measured == nchan - 2
    # own curves: to the noise of 4 columns x ~32 rows per knot (0.1 / sqrt(128) ~ 0.01)
    assert np.abs(fit.curves[: nchan - 2] - curves[: nchan - 2]).max() < 0.06
    # channel scatter estimated from the data (0.5 drawn)
    assert 0.3 < fit.channel_sigma < 0.7
    # the unmeasured channels take the mean curve of the measured ones
    mean_measured = curves[: nchan - 2].mean(axis=0)
    assert np.abs(fit.curves[nchan - 2:] - mean_measured).max() < 0.06
    assert fit.image.shape == (ny, nx)
    own = truth[:, : edges[nchan - 2]]
    assert np.abs(fit.image[:, : edges[nchan - 2]] - own).max() < 0.06
    # the +50 outliers have a bounded influence: as if they were not there
    clean = fit_background(residual - np.where(residual - truth > 25.0, 50.0, 0.0),
                           np.full((ny, nx), 100.0), pixels, spec)
    assert np.abs(fit.curves - clean.curves).max() < 0.03  # 0.7 with plain least squares
    assert fit.n_pixels == pixels.sum()


def test_background_pixels_are_the_dark_and_faint_ones_inside_the_border():
    light = np.zeros((20, 20))
    light[:, 5:15] = 1.0
    light[:, 15] = 0.02  # a profile wing
    usable = np.ones((20, 20), bool)
    usable[10, 2] = False
    px = background_pixels(light, usable, 0.05, border=2)
    assert px[5, 15] and px[5, 3] and not px[5, 10] and not px[10, 2]
    assert not px[:2].any() and not px[:, -2:].any()


# -- the extraction with a background on a toy slicer -----------------------------------------

NY, NX, NCHAN = 160, 128, 4
SLICES = (8, 46, 84)  # first column of each 30-spaxel slice; gaps of 8 columns between
NSPAX, NWAVE = 30, 120
SIGMA = 0.6


def _toy_slicer():
    """Trace (1 slice row per slice, 30 spaxels one column apart), a source cube, and the
    noiseless image with a smooth per-channel background that differs between channels."""
    ns = len(SLICES)
    tx = np.empty((ns, NSPAX, NWAVE), np.float32)
    ty = np.empty_like(tx)
    k = np.arange(NWAVE)
    for j, x0 in enumerate(SLICES):
        for i in range(NSPAX):
            tx[j, i] = x0 + i + 0.002 * (k - 60)
            ty[j, i] = 15.3 + 1.01 * k + 0.15 * j
    geom = build_geometry(tx, ty, SIGMA, (NY, NX))
    jj, ii = np.mgrid[:ns, :NSPAX]
    spatial = 100.0 * np.exp(-0.5 * (((ii - 14.6) / 2.5) ** 2 + ((jj - 1.1) / 0.8) ** 2)) + 2.0
    spectrum = 1.0 + 0.3 * np.sin(k / 9.0)
    cube = spectrum[:, None, None] * spatial[None]
    image = geom.project(cube)
    edges = channel_edges(NX, NCHAN)
    y = np.arange(NY)[:, None] / NY
    per_channel = 0.4 + 0.3 * y + np.array([[0.0, -0.5, 0.35, 0.2]]) * (1.0 - y)
    background = np.repeat(per_channel, np.diff(edges), axis=1)
    return geom, cube, image, background


@pytest.mark.parametrize("reweight", [0, 1])
def test_extraction_removes_a_channel_background_it_cannot_see_inside_the_slices(reweight):
    geom, cube, image, background = _toy_slicer()
    rng = np.random.default_rng(3)
    read_var = np.full((NY, NX), 0.05**2)
    data = image + background + rng.normal(0.0, 0.05, (NY, NX))
    var = read_var + 1e-4 * np.maximum(image, 0)
    good = np.ones((NY, NX), bool)
    kw = dict(read_variance=read_var, poisson_coef=1e-4, reweight=reweight, noise_tol=0.0,
              rtol=1e-10, maxiter=300)
    plain = extract(geom, data, var, good, **kw)
    spec = BackgroundSpec(nchan=NCHAN, knot_rows=40)
    fixed = extract(geom, data, var, good, background=spec, **kw)
    total = cube.sum()
    box = (slice(None), slice(0, 3), slice(11, 19))
    err_plain = plain.flux.sum() / total - 1.0
    err_fixed = fixed.flux.sum() / total - 1.0
    box_plain = plain.flux[box].sum() / cube[box].sum() - 1.0
    box_fixed = fixed.flux[box].sum() / cube[box].sum() - 1.0
    # without the model the background goes into the fluxes (+7 % of the whole cube here)
    assert abs(err_plain) > 0.03 and abs(box_plain) > 0.01
    assert abs(err_fixed) < 0.003 and abs(box_fixed) < 0.002, (err_fixed, box_fixed)
    assert fixed.background is not None and plain.background is None
    lit = geom.lit()
    assert fixed.background.lit_mean == pytest.approx(background[lit].mean(), rel=0.05)
    assert fixed.background.n_channels_measured == NCHAN
    assert np.abs(fixed.background.image - background)[4:-4, 4:-4].max() < 0.05



def test_extract_cube_records_the_background_it_subtracted(tmp_path):
    """The step: BKGMETH='NONE' by default (and for modes not in background_modes), CHANNEL
    with the fit's figures when asked; a uniform offset added to a slicer frame is found."""
    from test_ifs_steps import GAIN, write_rate, write_trace  # isort: skip

    from iris_tasks.ifs import ExtractCubeStep
    from iris_tasks.simulate import project_cube

    trace, trace_path = write_trace(tmp_path / "trace.fits", "SLICER")
    cube = np.ones(trace.cube_shape)
    offset = 0.3  # e-/s per pixel
    image = project_cube(trace, cube, (128, 128)) + offset
    rate = write_rate(tmp_path / "rate.fits", "SLICER", image, var_e=0.01)
    kw = dict(override_ifstrace=str(trace_path), gain_source="header", noise_tol=0.0,
              rtol=1e-10)
    plain = ExtractCubeStep.call(str(rate), **kw)
    assert plain.meta.ifs_background.method == "NONE"
    fixed = ExtractCubeStep.call(str(rate), background=True, background_knot_rows=32, **kw)
    meta = fixed.meta.ifs_background
    assert meta.method == "CHANNEL" and meta.n_pixels > 0 and meta.knot_rows == 32
    assert meta.lit_mean == pytest.approx(offset, rel=0.02)
    inner = (slice(5, -5), slice(None), slice(None))  # away from the spectrum ends
    assert abs(np.nanmean(fixed.data[inner]) - 1.0) < 0.02 < abs(np.nanmean(plain.data[inner]) - 1.0)
    assert fixed.meta.bunit_data == "electron/s" and GAIN > 0
    lens = ExtractCubeStep.call(str(rate), background=True, background_modes="LENSLET", **kw)
    assert lens.meta.ifs_background.method == "NONE"


def test_a_halo_term_keeps_unmodelled_wing_light_out_of_the_background():
    from iris_tasks.ifs.background import halo_image

    ny, nx, nchan = 128, 128, 4
    model = np.zeros((ny, nx))
    model[:, 20:50] = 10.0  # two bright "slices"; the gaps between them see their halo
    model[:, 70:110] = 4.0
    halo = halo_image(model, 3.0, 5)
    spike = np.zeros((1, 40))
    spike[0, 20] = 1.0
    one = halo_image(spike, 3.0, 5)[0]
    assert np.all(one[15:26] == 0.0) and one[26] > 0 and one.sum() == pytest.approx(1.0)
    assert halo[:, 60].min() > 0  # the gap between the slices gets their halo
    assert halo.sum() == pytest.approx(model.sum(), rel=0.05)  # unit-sum kernel, edges aside
    rng = np.random.default_rng(2)
    edges = channel_edges(nx, nchan)
    background = np.repeat(np.array([[0.2, -0.1, 0.05, 0.15]]), np.diff(edges), axis=1)
    background = np.broadcast_to(background, (ny, nx))
    residual = background + 0.01 * halo + rng.normal(0.0, 0.01, (ny, nx))
    pixels = model == 0
    pixels[:, :4] = pixels[:, -4:] = False
    spec = BackgroundSpec(nchan=nchan, knot_rows=64, border=0, halo_px=3.0)
    with_halo = fit_background(residual, np.full((ny, nx), 1e4), pixels, spec, halo=halo)
    without = fit_background(residual, np.full((ny, nx), 1e4), pixels, spec)
    assert with_halo.halo_amplitude == pytest.approx(0.01, rel=0.1)
    err_with = np.abs(with_halo.image - background)[:, 4:-4].max()
    err_without = np.abs(without.image - background)[:, 4:-4].max()
    assert err_with < 0.005 < err_without


def test_row_term_carries_the_common_row_stripes_into_channels_without_pixels():
    rng = np.random.default_rng(8)
    ny, nx, nchan = 256, 256, 8
    edges = channel_edges(nx, nchan)
    stripes = rng.normal(0.0, 0.5, ny)  # row-to-row, common to all channels
    stripes -= np.convolve(stripes, np.ones(33) / 33, mode="same")
    truth = np.repeat(np.full((ny, nchan), 0.2), np.diff(edges), axis=1) + stripes[:, None]
    residual = truth + rng.normal(0.0, 0.05, (ny, nx))
    pixels = np.zeros((ny, nx), bool)
    for c in range(4):
        pixels[:, edges[c] + 1:edges[c] + 9] = True
    w = np.full((ny, nx), 400.0)
    spec = BackgroundSpec(nchan=nchan, knot_rows=32, border=0, row_term=True)
    fit = fit_background(residual, w, pixels, spec)
    plain = fit_background(residual, w, pixels, BackgroundSpec(nchan=nchan, knot_rows=32, border=0))
    far = slice(edges[6], None)  # channels with no pixel of their own
    err_rows = np.sqrt(np.mean((fit.image[8:-8, far] - truth[8:-8, far]) ** 2))
    err_plain = np.sqrt(np.mean((plain.image[8:-8, far] - truth[8:-8, far]) ** 2))
    assert fit.row_offsets is not None and plain.row_offsets is None
    assert err_rows < 0.15 * err_plain, (err_rows, err_plain)
