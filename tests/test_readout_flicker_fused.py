"""clean_flicker's background sums computed inside the readout's row loop
(``process_ramp(flicker=FlickerSpec(...))``, the kernel ``Plan.run_raw_flicker``).

The fused sums must be the sums of the separate pass (``flicker_sums`` of the finished
result) bit for bit -- the same row functions over the same values -- for any number of
threads, dilation and chunk length (chunks shorter than, equal to and longer than the
frame; boundaries where a chunk is shorter than the dilation), and the numpy twin
(``readout_cy.reference.process_ramp(flicker=)``) within float64 rounding.  The ramp planes
themselves must not change.
"""

import numpy as np
import pytest

import readout_cy as rc
from iris_tasks.datamodels.dqflags import pixel as DQ
from iris_tasks.steps import readout as ro
from readout_cy import reference as ref

PLANES = ("slope", "var_poisson", "var_rnoise", "err", "dq", "nused")


def _ramp(ny=75, nx=128, nreads=6, nramps=1, seed=3):
    """Sky with stars, a few saturating, cosmic rays, a dead-gain pixel, reference border;
    75 rows (not a multiple of 7 or of the chunk lengths)."""
    rng = np.random.default_rng(seed)
    t = np.arange(nreads) * 1.5 + 0.4
    flux = np.full((ny, nx), 4.0)
    for _ in range(12):
        y0, x0 = rng.uniform(6, ny - 6), rng.uniform(6, nx - 6)
        yy, xx = np.mgrid[:ny, :nx]
        flux += 10 ** rng.uniform(1.5, 3.5) * np.exp(-((yy - y0) ** 2 + (xx - x0) ** 2) / 3.0)
    flux[ny // 4, nx // 3 + 3] = 30000.0  # saturates in the second read
    flux[:4] = flux[-4:] = 0.0
    flux[:, :4] = flux[:, -4:] = 0.0
    reads = np.empty((nramps, nreads, ny, nx), np.uint16)
    for r in range(nramps):
        crs = rng.random((ny, nx)) < 0.01
        cr_read = rng.integers(1, nreads, (ny, nx))
        for i in range(nreads):
            v = 10000.0 + flux * t[i] + rng.normal(0.0, 5.0, (ny, nx))
            v += np.where(crs & (cr_read <= i), 800.0, 0.0)
            reads[r, i] = np.clip(v, 0, 65535)
    gain = np.full((ny, nx), 2.0, np.float32)
    gain[ny // 3, nx // 3] = np.nan  # DO_NOT_USE: slope NaN, err 0
    pdq = np.zeros((ny, nx), np.uint32)
    pdq[rng.random((ny, nx)) < 0.005] = DQ["HOT"]
    pdq[ny // 2, nx // 2] = DQ["DEAD"]
    coef = np.zeros((3, ny, nx), np.float32)
    coef[1], coef[2] = 1.0, 1e-7
    kw = dict(gain=gain, read_noise=5.0, saturation=40000.0, nonlinearity=coef, dqflags=DQ,
              refpix_channels=4, pixel_dq=pdq)
    return reads if nramps > 1 else reads[0], t, kw


def _spec(dilate=2, chunk=256, channels=4, skip=ro.FLICKER_SKIP_FLAGS):
    return rc.FlickerSpec(channels=channels, skip=skip, dilate=dilate, chunk_rows=chunk)


def _separate(res, spec):
    return rc.flicker_sums(res.slope, res.err, res.dq, skip=spec.skip, channels=spec.channels,
                           nsigma=spec.nsigma, dilate=spec.dilate)


def test_fused_sums_equal_the_separate_pass_bit_for_bit():
    reads, t, kw = _ramp()
    plain = rc.process_ramp(reads, t, threads=1, **kw)
    assert plain.flicker is None
    bg = 0
    for threads in (1, 3):
        for dilate in (0, 1, 2, 3):
            want = _separate(plain, _spec(dilate))
            # chunks of 1 row (every row at a boundary), shorter than 2 x dilate, 7 and 64
            # rows, and one chunk for the whole frame
            for chunk in (1, 3, 7, 64, 256):
                got = rc.process_ramp(reads, t, threads=threads, flicker=_spec(dilate, chunk),
                                      **kw)
                for name in PLANES:
                    np.testing.assert_array_equal(getattr(got, name), getattr(plain, name),
                                                  err_msg=name)
                assert got.flicker.spec == _spec(dilate, chunk)
                assert len(got.flicker.sums) == 6
                for g, w in zip(got.flicker.sums, want, strict=True):
                    assert g.dtype == w.dtype
                    np.testing.assert_array_equal(g, w, err_msg=f"{threads} {dilate} {chunk}")
            bg += int(want[3].sum())
    assert bg > 0.3 * 75 * 128 * 8  # the frame is mostly background: the sums are not empty


def test_fused_sums_equal_the_twin():
    """readout_cy.reference.process_ramp(flicker=) (numpy sums of the twin's result): the
    counts equal, the float64 sums to rounding (another summation order)."""
    reads, t, kw = _ramp(ny=40, nx=64)
    for dilate in (0, 2):
        got = rc.process_ramp(reads, t, threads=2, flicker=_spec(dilate, 16), **kw)
        twin = ref.process_ramp(reads, t, flicker=_spec(dilate, 16), **kw)
        for name in PLANES:
            np.testing.assert_array_equal(getattr(got, name), getattr(twin, name), err_msg=name)
        for g, w in zip(got.flicker.sums, twin.flicker.sums, strict=True):
            if g.dtype.kind == "i":
                np.testing.assert_array_equal(g, w)
            else:
                np.testing.assert_allclose(g, w, rtol=1e-12, atol=1e-12)
        assert twin.flicker.sums[3].sum() > 0


@pytest.mark.parametrize("mode", ["utr", "cds"])
def test_fused_sums_with_several_ramps_and_modes(mode):
    reads, t, kw = _ramp(ny=50, nx=64, nramps=2)
    plain = rc.process_ramp(reads, t, mode=mode, threads=1, **kw)
    got = rc.process_ramp(reads, t, mode=mode, threads=2, flicker=_spec(2, 8), **kw)
    for name in PLANES:
        np.testing.assert_array_equal(getattr(got, name), getattr(plain, name))
    for g, w in zip(got.flicker.sums, _separate(plain, _spec(2)), strict=True):
        np.testing.assert_array_equal(g, w)


def test_skip_bits_set_after_the_row_loop_give_the_sums_of_the_finished_dq():
    """BAD_REF_PIXEL / UNRELIABLE_BIAS come from the reference-pixel report after the row
    loop: with them in ``skip`` the sums are taken from the finished DQ (not fused), the
    same as the separate pass."""
    reads, t, kw = _ramp()
    mask = np.zeros(reads.shape[-2:], bool)
    mask[:4, :32] = True  # channel 0 has no usable top/bottom reference: UNRELIABLE_BIAS
    mask[-4:, :32] = True
    spec = _spec(skip=ro.FLICKER_SKIP_FLAGS | DQ["UNRELIABLE_BIAS"])
    got = rc.process_ramp(reads, t, threads=2, flicker=spec, refpix_mask=mask, **kw)
    assert (got.dq[:, :32] & DQ["UNRELIABLE_BIAS"]).all()
    for g, w in zip(got.flicker.sums, _separate(got, spec), strict=True):
        np.testing.assert_array_equal(g, w)
    assert (got.flicker.sums[3][:, 0] == 0).all()  # that channel has no background


def test_flicker_spec_is_checked():
    reads, t, kw = _ramp(ny=24, nx=64)
    with pytest.raises(ValueError, match="not divisible by channels=5"):
        rc.process_ramp(reads, t, flicker=_spec(channels=5), **kw)
    with pytest.raises(ValueError, match="chunk_rows"):
        rc.process_ramp(reads, t, flicker=_spec(chunk=0), **kw)
    with pytest.raises(TypeError, match="FlickerSpec"):
        rc.process_ramp(reads, t, flicker={"channels": 4}, **kw)


def test_clean_flicker_with_fused_sums_equals_clean_flicker_alone():
    """readout.process(flicker=flicker_spec(...)) then clean_flicker(sums=): the same
    slopes, variances, err and stripes as clean_flicker's own pass; sums asked for with
    other arguments are refused."""
    reads, t, kw = _ramp()
    maps = ro.detector_maps(gain=kw["gain"], read_noise=np.full(reads.shape[-2:], 5.0, np.float32),
                            saturation=np.full(reads.shape[-2:], 40000.0, np.float32),
                            nonlinearity=kw["nonlinearity"], mask_dq=kw["pixel_dq"])
    out = {}
    for fused in (False, True):
        res = ro.process(reads, t, maps, mode="utr", channels=4,
                         flicker=ro.flicker_spec(4) if fused else None)
        assert (res.flicker is not None) == fused
        fl = ro.clean_flicker(res.slope, res.err, res.dq, channels=4, var_rnoise=res.var_rnoise,
                              var_poisson=res.var_poisson, smooth_rows=32, sums=res.flicker)
        out[fused] = (res, fl)
    (a, fa), (b, fb) = out[False], out[True]
    for name in PLANES:
        np.testing.assert_array_equal(getattr(a, name), getattr(b, name), err_msg=name)
    np.testing.assert_array_equal(fa.stripes, fb.stripes)
    np.testing.assert_array_equal(fa.acn, fb.acn)
    assert fa.background_fraction == fb.background_fraction > 0.3
    res = ro.process(reads, t, maps, mode="utr", channels=4, flicker=ro.flicker_spec(4))
    for other in (dict(dilate=1), dict(nsigma=4.0), dict(skip_flags=DQ["DO_NOT_USE"])):
        with pytest.raises(ValueError, match="sums given were computed for"):
            ro.clean_flicker(res.slope, res.err, res.dq, channels=4, sums=res.flicker, **other)
    # a pass that changes the slopes drops them (the IPC deconvolution here; snowball
    # re-fits: tests/test_readout_snowballs.py)
    ro.ipc_deconvolve(res, ro.ipc_kernel(0.01), border=4)
    assert res.flicker is None


def test_readout_step_with_clean_flicker_equals_the_function_on_its_plain_output(tmp_path):
    """The step with clean_flicker on (sums from the row loop) = the step without it,
    then clean_flicker on its output (its own pass over the frame)."""
    from astropy.io import fits
    from test_steps_support import N, detector_references, write_ramp

    from iris_tasks.steps import ReadoutStep

    refs = detector_references(tmp_path / "refs")
    over = {f"override_{t}": str(refs[t])
            for t in ("mask", "saturation", "linearity", "readnoise", "gain")}
    rate = np.full((N, N), 20.0)
    rate[20:23, 30:33] = 900.0  # a source for the mask
    raw = write_ramp(tmp_path / "sci.fits", rate, seed=4)
    with fits.open(raw, mode="update") as hdul:
        hdul[0].header["NCHAN"] = 4  # 16-column channels (the default 32 would be 2 wide)
    plain = ReadoutStep.call(str(raw), clean_flicker=False, **over)  # imager: on by default
    out = ReadoutStep.call(str(raw), clean_flicker=True, flicker_rows=32, **over)
    slope, err = np.array(plain.data), np.array(plain.err)
    vr, vp = np.array(plain.var_rnoise), np.array(plain.var_poisson)
    ro.clean_flicker(slope, err, np.array(plain.dq), channels=4, var_rnoise=vr,
                     var_poisson=vp, smooth_rows=32)
    np.testing.assert_array_equal(out.data, slope)
    np.testing.assert_array_equal(out.err, err)
    np.testing.assert_array_equal(out.var_rnoise, vr)
    np.testing.assert_array_equal(out.dq, plain.dq)
    assert not np.array_equal(out.data, plain.data)
