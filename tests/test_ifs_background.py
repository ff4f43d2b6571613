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
    assert fit.n_pixels < pixels.sum()  # the +50 outliers were clipped


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


# -- end to end: ramps with the default detector's 1/f noise -> readout -> iris_ifs2 ----------

E2E_SIZE = 1024  # the slicer's 10 slices, which the instrument-model builder needs
E2E_SEED = 11


@pytest.mark.slow
def test_slicer_fluxes_with_the_default_1f_noise(tmp_path):
    """A slicer science + sky pair (10 x 30 s) simulated up the ramp with the default detector
    (1/f noise on), through the readout and iris_ifs2 with an instrument model the builder
    learned from lamp flats and arcs. The whole cube must carry the source's flux: without the
    background model the readout's residual 1/f adds ~-0.004 e-/s to every voxel, -8 % of the
    source over the cube (measured 2026-12-07); with it -1.3 %."""
    from test_ifs_model import LAMP, PREFIX, _source_truth, _spec, write_rate  # isort: skip

    from iris_tasks.ifs import Ifs2Pipeline
    from iris_tasks.masters.ifs_model import build_ifs_model, save_ifs_model
    from iris_tasks.simulate.frames import FrameFactory
    from iris_tasks.simulate.references import write_reference_files
    from iris_tasks.steps import ReadoutStep

    mode = "SLICER"
    cal = FrameFactory(size=E2E_SIZE, seed=E2E_SEED,
                       detector_overrides={"onef_rms": 0.0, "cr_rate": 0.0})
    rng = np.random.default_rng(E2E_SEED)
    flats, arcs = [], []
    for i in (1, 2):
        spec = _spec(mode, LAMP[mode], i, 2.0 + 0.05 * i)
        flats.append(tmp_path / f"{spec.filename[:-5]}_rate.fits")
        write_rate(cal, spec, flats[-1], rng)
    for n, lamp in enumerate(("Ar", "Kr", "Ne", "Xe"), 1):
        spec = _spec(mode, f"{PREFIX[mode]}-IDP", n, 2.2 + 0.02 * n, lamps=lamp)
        arcs.append(tmp_path / f"{spec.filename[:-5]}_rate.fits")
        write_rate(cal, spec, arcs[-1], rng)
    trace = str(save_ifs_model(build_ifs_model(flats, arcs, subtract_dark=False),
                               tmp_path / "model"))

    factory = FrameFactory(size=E2E_SIZE, seed=E2E_SEED)  # the default detector: 1/f on
    assert factory.detector("IFS").onef_rms > 0
    refs = write_reference_files(tmp_path / "refs", ["IFS"], E2E_SIZE, E2E_SEED,
                                 ifs_configs=((mode, "25", "Kbb"),), factory=factory)

    def ref(kind: str) -> str:
        return str(next(p for p in refs if f"_{kind}_" in p.name))

    readout = {f"override_{k}": ref(k)
               for k in ("mask", "saturation", "linearity", "readnoise", "gain")}
    rates = {}
    for kind, hour in (("SKY", 7.9), ("SCI", 8.0)):
        ramp, _ = factory.make(_spec(mode, f"{PREFIX[mode]}-{kind}", 1, hour, read_time=30.0))
        rates[kind] = tmp_path / f"{kind}_rate.fits"
        ReadoutStep.call(ramp, **readout).save(str(rates[kind]))
    steps = {"dq_init": {"override_mask": ref("mask")},
             "dark_sub": {"override_dark": ref("dark")},
             "flat_field": {"skip": True},
             "flexure": {"override_ifstrace": trace},
             "extract_cube": {"override_ifstrace": trace, "gain_source": "header"}}
    cube = Ifs2Pipeline.call(str(rates["SCI"]), sky_files=[str(rates["SKY"])], steps=steps)
    bkg = cube.meta.ifs_background
    assert bkg.method == "CHANNEL" and bkg.n_pixels > 10_000 and bkg.n_channels > 0
    assert bkg.knot_rows == 64 and np.isfinite(bkg.lit_mean) and bkg.channel_sigma >= 0

    data = np.where(np.isfinite(cube.data), cube.data, 0.0)
    measured = data.sum(axis=0)
    truth = _source_truth(factory, mode, np.asarray(cube.wavelength))
    j, i = np.unravel_index(np.argmax(truth), truth.shape)
    box3 = (slice(j - 1, j + 2), slice(i - 1, i + 2))
    box5 = (slice(j - 2, j + 3), slice(i - 2, i + 3))
    # The chain's own global factor (the PSF halo beyond the profile window, the lamp-relative
    # throughput) from the 5x5 aperture, where the source dominates any background; the
    # rest of the cube must then add up to the truth: the background is what it tests.
    scale = measured[box5].sum() / truth[box5].sum()
    whole_err = measured.sum() / (scale * truth.sum()) - 1.0
    box3_err = measured[box3].sum() / (scale * truth[box3].sum()) - 1.0
    print(f"scale {scale:.4f} whole cube {whole_err:+.4f} 3x3 {box3_err:+.4f} "
          f"BKGMEAN {bkg.lit_mean:+.4g} BKGCHSIG {bkg.channel_sigma:.3g}")
    assert abs(whole_err) < 0.02
    assert abs(box3_err) < 0.01
