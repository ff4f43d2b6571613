"""The simulator agrees with the reduction: sky orientation (assign_wcs) and flat references
(DN/s flats, as the nightly masters measure them). Small arrays, noiseless frames."""

import datetime as dt
import math

import numpy as np
import pytest
from astropy.io import fits

from iris_tasks import datamodels as dm
from iris_tasks.datamodels.dqflags import pixel
from iris_tasks.simulate import (
    FrameFactory,
    FrameSpec,
    apply_linearity,
    simulate_ramp,
    write_atomic,
    write_reference_files,
)
from iris_tasks.simulate.scenes import dither_offset
from iris_tasks.simulate.sky import pixel_to_sky, reference_pixel, sky_to_pixel
from iris_tasks.steps.assign_wcs import imager_wcsinfo, wcs_from_wcsinfo

START = dt.datetime(2026, 11, 24, 8, 0, tzinfo=dt.UTC)
SCALE_DEG = 4.0 / 3.6e6


# ---------------------------------------------------------------------- sky orientation
def test_sky_convention_north_up_east_left_and_pa_east_of_north():
    crpix = (32.5, 32.5)
    ra0, dec0 = 150.0, 2.0
    x0, y0 = crpix[0] - 1, crpix[1] - 1
    east = (ra0 + 10 * SCALE_DEG / math.cos(math.radians(dec0)), dec0)
    north = (ra0, dec0 + 10 * SCALE_DEG)
    # PA = 0: north is +Y, east is -X
    x, y = sky_to_pixel(*east, ra0, dec0, 0.0, crpix)
    assert (x - x0, y - y0) == pytest.approx((-10.0, 0.0), abs=1e-6)
    x, y = sky_to_pixel(*north, ra0, dec0, 0.0, crpix)
    assert (x - x0, y - y0) == pytest.approx((0.0, 10.0), abs=1e-6)
    # PA = 90: detector +Y points east, so east lands on +Y and north on +X
    x, y = sky_to_pixel(*east, ra0, dec0, 90.0, crpix)
    assert (x - x0, y - y0) == pytest.approx((0.0, 10.0), abs=1e-6)
    x, y = sky_to_pixel(*north, ra0, dec0, 90.0, crpix)
    assert (x - x0, y - y0) == pytest.approx((10.0, 0.0), abs=1e-6)
    # exact round trip far from the tangent point
    xs, ys = np.array([-3000.0, 17.3, 4000.0]), np.array([2500.0, -1.2, 60.0])
    ra, dec = pixel_to_sky(xs, ys, ra0, dec0, 33.0, crpix)
    xb, yb = sky_to_pixel(ra, dec, ra0, dec0, 33.0, crpix)
    np.testing.assert_allclose(xb, xs, atol=1e-7)
    np.testing.assert_allclose(yb, ys, atol=1e-7)


def _wcs_of(path):
    """The reduction's WCS of a raw frame, from its header (what assign_wcs would write)."""
    model = dm.open_model(path)
    try:
        p, sub = model.meta.pointing, model.meta.subarray
        info = imager_wcsinfo(float(p.ra), float(p.dec), float(p.pa), model.data.shape[-2:],
                              xstart=sub.xstart, ystart=sub.ystart)
        return wcs_from_wcsinfo(info), float(p.pa)
    finally:
        model.close()


@pytest.mark.parametrize("pa", [37.5, 250.0])
def test_true_star_radec_maps_to_true_pixel_through_the_reduction_wcs(tmp_path, pa):
    factory = FrameFactory(size=96, seed=11)
    frames = {}
    for dither in (0, 3):
        spec = FrameSpec(detector="IMG2", obsname="IMG1-SCI", exp_no=dither + 1, start=START,
                         nreads=3, dither_index=dither, pa=pa)
        model, truth = factory.make(spec, noise=False, cosmic_rays=False)
        path = write_atomic(model, tmp_path / spec.filename)
        frames[dither] = (path, truth, model.data[0, -1].astype(float) - model.data[0, 0])
        model.close()
    hot = factory.detector("IMG2").hot
    for path, truth, signal in frames.values():
        wcs, header_pa = _wcs_of(path)
        assert header_pa == pa and truth["pa_deg"] == pa
        stars = truth["scene"]["stars"]
        assert len(stars["ra_deg"]) >= 3
        x, y = wcs.all_world2pix(np.array(stars["ra_deg"]), np.array(stars["dec_deg"]), 0)
        np.testing.assert_allclose(x, stars["x"], rtol=0, atol=0.01)
        np.testing.assert_allclose(y, stars["y"], rtol=0, atol=0.01)
        # and the light is there: each bright star peaks within a pixel of its truth position
        signal[hot] = np.median(signal)  # hot pixels: the other compact sources here
        bright = [k for k, f in enumerate(stars["flux_e_per_s"]) if f > 300]
        assert bright
        for k in bright:
            cx, cy = round(stars["x"][k]), round(stars["y"][k])
            box = signal[cy - 2:cy + 3, cx - 2:cx + 3]
            iy, ix = np.unravel_index(np.argmax(box), box.shape)
            assert abs(cx - 2 + ix - stars["x"][k]) <= 1 and abs(cy - 2 + iy - stars["y"][k]) <= 1
    # a dither keeps the sky positions and moves the stars by the dither offset in pixels
    s0, s3 = frames[0][1]["scene"]["stars"], frames[3][1]["scene"]["stars"]
    assert s0["ra_deg"] == s3["ra_deg"] and s0["dec_deg"] == s3["dec_deg"]
    dx, dy = dither_offset(96, 3)
    np.testing.assert_allclose(np.subtract(s3["x"], s0["x"]), dx, atol=1e-3)
    np.testing.assert_allclose(np.subtract(s3["y"], s0["y"]), dy, atol=1e-3)


def test_reference_pixel_rule_matches_the_reduction():
    for shape, start in (((96, 96), (1, 1)), ((512, 256), (101, 7)), ((64, 80), (None, None))):
        info = imager_wcsinfo(10.0, -20.0, 0.0, shape, xstart=start[0], ystart=start[1])
        assert reference_pixel(shape, *start) == (info["crpix1"], info["crpix2"])


def test_telluric_star_radec_through_the_reduction_wcs(tmp_path):
    factory = FrameFactory(size=64, seed=2)
    spec = FrameSpec(detector="IMG1", obsname="IMG1-TEL", exp_no=1, start=START, nreads=2,
                     pa=-20.0)
    model, truth = factory.make(spec, noise=False, cosmic_rays=False)
    path = write_atomic(model, tmp_path / spec.filename)
    model.close()
    wcs, _ = _wcs_of(path)
    stars = truth["scene"]["stars"]
    x, y = wcs.all_world2pix(np.array(stars["ra_deg"]), np.array(stars["dec_deg"]), 0)
    np.testing.assert_allclose(x, stars["x"], atol=0.01)
    np.testing.assert_allclose(y, stars["y"], atol=0.01)


# ---------------------------------------------------------------------- flat references
def _rate_dn_per_s(reads, det, refs_dir, readpatt):
    """Noiseless ramp -> dark-subtracted rate in DN/s, the way the reduction gets there:
    bias removed, linearity reference applied, last - first read over the time, dark reference."""
    name = det.name
    with fits.open(refs_dir / f"iris_sim_linearity_{name}.fits") as lin, \
            fits.open(refs_dir / f"iris_sim_dark_{name}_{readpatt}.fits") as dark:
        coeffs = lin["COEFFS"].data.astype(np.float64)
        dark_rate = dark["SCI"].data.astype(np.float64)
    linear = apply_linearity(coeffs, reads[0].astype(np.float64) - det.bias)
    nreads = reads.shape[1]
    return (linear[-1] - linear[0]) / ((nreads - 1) * 1.4) - dark_rate


def _check_uniform(rate, flat_path, det, qe_flat):
    with fits.open(flat_path) as ref:
        flat = ref["SCI"].data.astype(np.float64)
        flat_dq = ref["DQ"].data
    usable = det.active & ((flat_dq & pixel["NO_FLAT_FIELD"]) == 0)
    assert usable.sum() > 0.99 * det.active.sum() - det.dead.sum()
    good = usable & ~det.low_qe & ~det.hot & ~det.dead
    assert np.median(flat[good]) == pytest.approx(1.0, abs=1e-6)
    ratio = rate[usable] / flat[usable]
    spread = (ratio.max() - ratio.min()) / np.median(ratio)
    assert spread < 1e-3, spread
    # the QE flat alone leaves the gain pattern (per-channel +-2 %, per-pixel 0.5 %) behind
    old = rate[usable] / qe_flat[usable]
    assert np.std(old) / np.median(old) > 3e-3


def test_imager_flat_reference_flattens_a_flat_lamp_frame(tmp_path):
    factory = FrameFactory(size=64, seed=4)
    refs = tmp_path / "refs"
    write_reference_files(refs, ["IMG3"], size=64, seed=4, readpatts=("UTR5",),
                          imager_filters=("Ks",), factory=factory)
    spec = FrameSpec(detector="IMG3", obsname="IMG1-NFF", exp_no=1, start=START, nreads=5,
                     filter="Ks")
    model, truth = factory.make(spec, noise=False, cosmic_rays=False)
    reads = np.asarray(model.data)
    model.close()
    det = factory.detector("IMG3")
    rate = _rate_dn_per_s(reads, det, refs, "UTR5")
    _check_uniform(rate, refs / "iris_sim_flat_IMG3_Ks.fits", det, det.flat("Ks"))
    # the truth keeps the QE flat (applied to the light) and the DN/s flat (the reference)
    assert truth["flat_applied"] == "FLAT_KS"


def test_ifs_flat_references_flatten_a_uniform_lamp(tmp_path):
    factory = FrameFactory(size=64, seed=6)
    refs = tmp_path / "refs"
    configs = (("LENSLET", "4", "Kbb"), ("SLICER", "25", "Kbb"))
    write_reference_files(refs, ["IFS"], size=64, seed=6, readpatts=("UTR4",),
                          ifs_configs=configs, factory=factory)
    det = factory.detector("IFS")
    # The IFS lamp is dispersed into spectra; the pixel flat is the response to uniform light.
    reads, _ = simulate_ramp(det, 2000.0, nreads=4, read_time=1.4, rng=0, cosmic_rays=False,
                             flat=det.flat("Kbb"), noise=False)
    rate = _rate_dn_per_s(reads, det, refs, "UTR4")
    for mode in ("LENSLET", "SLICER"):
        _check_uniform(rate, refs / f"iris_sim_flat_IFS_Kbb_{mode}.fits", det, det.flat("Kbb"))
