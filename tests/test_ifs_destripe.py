"""Residual 1/f row-stripe removal from the unlit IFS pixels (destripe / DestripeStep)."""

import datetime as dt
import logging

import numpy as np
import pytest

from iris_tasks import datamodels as dm
from iris_tasks.ifs import Ifs2Pipeline
from iris_tasks.ifs.destripe import channel_edges, destripe, row_channel_offsets, unlit_mask
from iris_tasks.ifs.destripe_step import DestripeStep, clear_mask_cache
from iris_tasks.ifs.extract_step import clear_geometry_cache


@pytest.fixture(autouse=True)
def _fresh_caches():
    clear_mask_cache()
    clear_geometry_cache()
    yield
    clear_mask_cache()
    clear_geometry_cache()


# -- pure functions ---------------------------------------------------------------------------

def test_channel_edges_match_the_readout_layout():
    for nx, nchan in ((10, 3), (256, 32), (4096, 64), (7, 7)):
        edges = channel_edges(nx, nchan)
        chan = (np.arange(nx) * nchan) // nx  # the simulator's / readout's channel of a column
        assert np.array_equal(np.repeat(np.arange(nchan), np.diff(edges)), chan)
    with pytest.raises(ValueError):
        channel_edges(4, 5)


def test_unlit_mask_keeps_the_traces_and_their_wings_lit():
    nw = 20
    tx = np.empty((1, 2, nw), np.float32)
    tx[0, 0], tx[0, 1] = 10.0, 30.2
    ty = np.broadcast_to(np.arange(nw, dtype=np.float32) + 5.5, (1, 2, nw)).copy()
    unlit = unlit_mask(tx, ty, 1.0, (40, 48), mask_sigma=3.0)
    rows = slice(5, 5 + nw + 1)  # floor(y) and floor(y) + 1 of the samples
    assert not unlit[rows, 7:14].any() and not unlit[rows, 27:34].any()
    assert unlit[rows, 14:27].all() and unlit[rows, :7].all() and unlit[rows, 34:].all()
    assert unlit[:5].all() and unlit[5 + nw + 1:].all()
    assert unlit_mask(tx, ty, 1.0, (40, 48), mask_sigma=5.0).sum() < unlit.sum()


def _striped(seed=7, ny=40, nx=256, nchan=4):
    rng = np.random.default_rng(seed)
    truth = np.zeros((ny, nx))
    lit = np.zeros((ny, nx), bool)
    for x0 in range(3, nx, 12):  # 'spectra' 3 columns wide every 12 columns
        lit[:, x0:x0 + 3] = True
    truth[lit] = 50.0
    stripes = rng.normal(0.0, 5.0, (ny, nchan))
    edges = channel_edges(nx, nchan)
    image = truth + np.repeat(stripes, np.diff(edges), axis=1) + rng.normal(0.0, 1.0, (ny, nx))
    return image.astype(np.float32), truth, lit, stripes, edges


def test_injected_stripes_are_removed_without_biasing_the_lit_pixels():
    image, truth, lit, stripes, edges = _striped()
    usable = ~lit
    # rows 10-12 of channel 2 see only 5 unlit pixels: no estimate of their own
    usable[10:13, edges[2] + 5:edges[3]] = False
    res = destripe(image, usable, 4, min_unlit=16, fallback=False)
    assert (res.n_direct, res.n_fallback, res.n_skipped) == (40 * 4 - 3, 0, 3)
    assert res.counts[11, 2] == 5 and res.counts[0, 0] == 48

    done = np.ones((40, 4), bool)
    done[10:13, 2] = False
    # each offset to the median's noise (1.25 / sqrt(48) ~ 0.18 DN), from 5 DN stripes
    assert np.max(np.abs(res.offsets[done] - stripes[done])) < 0.8
    assert res.rms == pytest.approx(np.sqrt(np.mean(stripes[done] ** 2)), rel=0.05)
    cols = np.repeat(done, np.diff(edges), axis=1)
    resid = res.data - truth
    assert np.std(resid[cols]) < 1.1  # the white noise (1.0) and little else
    # lit pixels: the stripe goes, their flux stays (mean error over 3840 pixels ~ 0.02)
    assert abs(np.mean(resid[cols & lit])) < 0.1
    # the segments without an estimate are not touched at all
    assert np.array_equal(res.data[10:13, edges[2]:edges[3]], image[10:13, edges[2]:edges[3]])
    assert res.data.dtype == np.float32 and image is not res.data

    # by default a row needs 4 measured channels to lend its median; here 3 do
    assert destripe(image, usable, 4, min_unlit=16).n_skipped == 3
    fb = destripe(image, usable, 4, min_unlit=16, fallback=True, fallback_channels=3)
    assert (fb.n_fallback, fb.n_skipped) == (3, 0)
    for row in (10, 11, 12):
        others = res.offsets[row, [0, 1, 3]]
        assert fb.offsets[row, 2] == pytest.approx(np.median(others))


def test_rows_without_unlit_pixels_stay_unchanged_and_nan_pixels_stay_nan():
    image, _, lit, _, _ = _striped(seed=3)
    usable = ~lit
    usable[20] = False  # a whole row lit: no estimate in any channel, fallback or not
    image[5, 40] = np.nan
    usable[5, 40] = False
    res = destripe(image, usable, 4, min_unlit=16)
    assert res.n_skipped == 4 and np.array_equal(res.data[20], image[20])
    assert np.isnan(res.data[5, 40]) and np.isfinite(res.data[5, 41])
    med, counts = row_channel_offsets(image, usable, 4)
    assert np.isnan(med[20]).all() and (counts[20] == 0).all()
    # unequal channels (nx not a multiple of nchan) go through the padded path
    res3 = destripe(image[:, :250], usable[:, :250], 3, min_unlit=16)
    assert res3.offsets.shape == (40, 3) and res3.n_direct == 39 * 3


# -- the step on a simulated frame with the simulator's 1/f noise ----------------------------

SIZE = 256
NCHAN = 2  # 128-column channels, the width of a 4k channel (32 outputs x 128 columns)
ONEF = 8.0  # DN per read: 4x the simulator default so the stripes stand out at 256 px


@pytest.fixture(scope="module")
def onef_frames(tmp_path_factory):
    """LEN-SCI and LEN-SKY rates (256 px, 1/f noise, no cosmic rays) with CRDS references."""
    from iris_tasks.calib.testing import temporary_cache
    from iris_tasks.simulate.frames import FrameFactory, FrameSpec, write_atomic
    from iris_tasks.simulate.references import write_reference_files
    from iris_tasks.steps import ReadoutStep

    root = tmp_path_factory.mktemp("ifs_destripe")
    factory = FrameFactory(size=SIZE, seed=1, nchan=NCHAN,
                           detector_overrides={"onef_rms": ONEF, "cr_rate": 0.0}, optics="ideal")
    start = dt.datetime(2026, 11, 24, 6, 0, tzinfo=dt.UTC)
    raws = {}
    for obs in ("LEN-SCI", "LEN-SKY"):
        spec = FrameSpec(detector="IFS", obsname=obs, exp_no=1, start=start, filter="Kbb",
                         nreads=10, ifsscale="4")
        model, _ = factory.make(spec)
        model.meta.exposure.nchan = NCHAN  # the simulator does not write NCHAN
        raws[obs] = write_atomic(model, root / "raw" / spec.filename)
    refs = write_reference_files(root / "refs", ["IFS"], SIZE, 1, "2020-01-01T00:00:00",
                                 readpatts=("UTR10",), ifs_configs=(("LENSLET", "4", "Kbb"),),
                                 factory=factory, nchan=NCHAN)
    with temporary_cache(root / "cache") as calib:
        calib.publish_references([str(r) for r in refs], "destripe test references")
        rates = {}
        for obs, raw in raws.items():
            rates[obs] = root / f"{raw.stem}_rate.fits"
            ReadoutStep.call(str(raw)).save(str(rates[obs]))
        yield factory, rates


def test_simulated_1f_stripes_drop_on_held_out_unlit_pixels(onef_frames):
    """Estimate from the even columns' unlit pixels, judge on the odd columns' ones."""
    factory, rates = onef_frames
    trace = factory.trace("LENSLET", "4", "Kbb")
    rate = dm.open_model(rates["LEN-SCI"])
    assert rate.meta.exposure.nchan == NCHAN
    data = np.asarray(rate.data, np.float32)
    unlit = unlit_mask(trace.trace_x, trace.trace_y, trace.psf_sigma, data.shape)
    unlit[:4] = unlit[-4:] = False
    unlit[:, :4] = unlit[:, -4:] = False
    even, odd = unlit.copy(), unlit.copy()
    even[:, 1::2] = False
    odd[:, 0::2] = False
    res = destripe(data, even, NCHAN, min_unlit=8, fallback=False)
    before, n_odd = row_channel_offsets(data, odd, NCHAN)
    after, _ = row_channel_offsets(res.data, odd, NCHAN)
    judged = (res.counts >= 8) & (n_odd >= 8)
    assert judged.sum() > 100  # the rows outside the (dense, at 256 px) lenslet field
    rms_before = np.sqrt(np.mean(before[judged] ** 2))
    rms_after = np.sqrt(np.mean(after[judged] ** 2))
    # measured 0.45 -> 0.12 DN/s; the held-out medians' own noise is ~0.07
    assert rms_after < rms_before / 2.5


def test_pipeline_destripes_and_the_cube_does_not_get_worse(onef_frames):
    factory, rates = onef_frames
    scene = factory.ifs_scene("LENSLET", "4", "Kbb")
    truth = (scene.source_spectrum * scene.transmission)[:, None, None] * scene.source_profile
    errors = {}
    for label, skip in (("off", True), ("on", False)):
        cube = Ifs2Pipeline.call(str(rates["LEN-SCI"]), sky_files=[str(rates["LEN-SKY"])],
                                 steps={"destripe": {"skip": skip}})
        assert cube.meta.cal_step.destripe == ("SKIPPED" if skip else "COMPLETE")
        assert cube.meta.cal_step.extract_cube == "COMPLETE"
        ok = (cube.dq == 0) & np.isfinite(cube.data)
        assert ok.mean() > 0.9
        errors[label] = np.sqrt(np.mean((cube.data - truth)[ok] ** 2))
        if not skip:
            assert cube.meta.ref_file.ifstrace.name.startswith("crds://tmt_iris_ifstrace")
    assert errors["on"] <= errors["off"] * 1.01


def test_step_changes_only_rows_it_can_measure(onef_frames):
    _, rates = onef_frames
    rate = dm.open_model(rates["LEN-SCI"])
    out = DestripeStep.call(rate)
    assert out.meta.cal_step.destripe == "COMPLETE"
    assert rate.meta.cal_step.destripe is None  # the caller's model is not modified
    diff = np.asarray(out.data, np.float64) - np.asarray(rate.data, np.float64)
    changed = np.abs(diff).max(axis=1) > 0
    assert 0 < changed.sum() < SIZE  # in-field rows have no unlit pixels at 256 px
    # within a row segment the subtracted offset is one constant
    seg = diff[changed][:, : SIZE // NCHAN]
    assert np.allclose(seg, seg[:, :1], atol=1e-4)


def test_step_skips_an_ifs_frame_without_a_trace_for_its_mode(onef_frames, caplog):
    _, rates = onef_frames
    rate = dm.open_model(rates["LEN-SCI"])
    rate.meta.instrument.ifsmode = "SLICER"  # CRDS holds only the lenslet trace
    rate.meta.instrument.ifsscale = "25"
    with caplog.at_level(logging.INFO, logger="iris_tasks"):
        by_default = DestripeStep.call(rate)  # slicer frames are not destriped by default
    assert by_default.meta.cal_step.destripe == "SKIPPED"
    assert "not in modes=LENSLET" in caplog.text
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="iris_tasks"):
        out = DestripeStep.call(rate, modes="LENSLET,SLICER")
    assert out.meta.cal_step.destripe == "SKIPPED"
    assert np.array_equal(out.data, rate.data)
    assert "no usable ifstrace reference" in caplog.text


# -- skipping without the simulator ----------------------------------------------------------

def _image(ifsmode):
    model = dm.ImageModel(data=np.ones((64, 64), np.float32),
                          dq=np.zeros((64, 64), np.uint32))
    model.meta.instrument.name = "IRIS"
    model.meta.instrument.detector = "IFS" if ifsmode else "IMG1"
    model.meta.instrument.filter = "Kbb"
    model.meta.instrument.ifsmode = ifsmode
    return model


def test_step_skips_non_ifs_frames_and_na_traces_with_a_reason(caplog):
    with caplog.at_level(logging.WARNING, logger="iris_tasks"):
        out = DestripeStep.call(_image(None))
    assert out.meta.cal_step.destripe == "SKIPPED"
    assert "IFSMODE=None" in caplog.text
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="iris_tasks"):
        out = DestripeStep.call(_image("LENSLET"), override_ifstrace="N/A")
    assert out.meta.cal_step.destripe == "SKIPPED"
    assert "N/A" in caplog.text
    assert np.all(out.data == 1.0)
    with pytest.raises(TypeError, match="ImageModel"):
        DestripeStep.call(dm.CubeModel(data=np.zeros((2, 4, 4), np.float32)))
    assert DestripeStep.class_alias == "destripe"
    assert Ifs2Pipeline.step_defs["destripe"] is DestripeStep
    assert DestripeStep().skip is False


def test_clipped_mean_is_less_noisy_than_the_median_and_ignores_outliers():
    rng = np.random.default_rng(11)
    ny, nx, nchan = 400, 256, 2
    stripes = rng.normal(0.0, 3.0, (ny, nchan))
    image = (np.repeat(stripes, nx // nchan, axis=1)
             + rng.normal(0.0, 1.0, (ny, nx))).astype(np.float32)
    image[::7, 5] += 1000.0  # hot pixels / cosmic-ray hits in the unlit area
    usable = np.ones((ny, nx), bool)
    med, _ = row_channel_offsets(image, usable, nchan)
    mean3, _ = row_channel_offsets(image, usable, nchan, clip=3.0)
    err_med = np.sqrt(np.mean((med - stripes) ** 2))
    err_mean = np.sqrt(np.mean((mean3 - stripes) ** 2))
    # 1/sqrt(128) = 0.088 for a mean; the median ~1.25x that
    assert err_mean < 0.1 and err_mean < 0.9 * err_med
    assert np.max(np.abs(mean3 - stripes)) < 0.5  # the +1000 pixels are clipped
    res = destripe(image, usable, nchan, clip=3.0)
    assert np.allclose(res.offsets, mean3)
