"""Inter-pixel capacitance: the simulator couples each pixel's signal to its neighbours,
``ipc_deconvolve`` undoes it on the slopes and propagates the variances."""

import copy

import numpy as np
import pytest

from iris_tasks.steps import readout as ro

sim = pytest.importorskip("iris_tasks.simulate.detector")

N = 128
ALPHA = 0.02


@pytest.fixture(scope="module")
def ipc_frame():
    rng = np.random.default_rng(3)
    yy, xx = np.mgrid[:N, :N]
    img = np.full((N, N), 50.0)
    stars = []
    for _ in range(12):
        y0, x0 = rng.uniform(10, N - 10, 2)
        f = 10 ** rng.uniform(3.5, 4.5)
        img += f / (2 * np.pi * 0.64) * np.exp(-((yy - y0) ** 2 + (xx - x0) ** 2) / 1.28)
        stars.append((int(round(y0)), int(round(x0))))
    det = sim.DetectorModel.for_detector("IMG1", size=N, seed=1, nchan=8, ipc_alpha=ALPHA)
    reads, truth = sim.simulate_ramp(det, img.astype(np.float32), nreads=10,
                                     noise=["poisson", "read", "ktc"], rng=4, cosmic_rays=False)
    maps = ro.detector_maps(gain=det.gain, read_noise=det.read_noise,
                            saturation=det.saturation_reference(),
                            nonlinearity=det.linearity_coefficients()[0])
    res = ro.process(reads, truth["read_times"], maps, mode="utr", channels=8)
    good = det.active & ~det.hot & ~det.dead & ~det.low_qe
    return dict(res=res, true=truth["rate_e_per_s"] / det.gain, stars=stars, good=good,
                flat=good & (img < 50.5))


def test_ipc_deconvolution_restores_peaks_and_pulls(ipc_frame):
    f = ipc_frame
    res = f["res"]
    out = copy.deepcopy(res)
    amp = ro.ipc_deconvolve(out, ro.ipc_kernel(ALPHA))
    assert amp == pytest.approx(1.0 / (1.0 - 4 * ALPHA) ** 2, rel=0.01)
    peak = np.array([f["true"][y, x] for y, x in f["stars"]])
    before = np.array([res.slope[y, x] for y, x in f["stars"]]) / peak
    after = np.array([out.slope[y, x] for y, x in f["stars"]]) / peak
    assert before.mean() < 0.975  # the coupling takes ~4 alpha of a sharp peak away
    assert abs(after.mean() - 1.0) < 0.006
    for r, lo, hi in ((out, 0.95, 1.05),):
        z = ((r.slope - f["true"]) / r.err)[f["good"]]
        assert lo < z.std() < hi and abs(z.mean()) < 0.1
    # pixels without a slope stay without one
    dnu = np.isnan(res.slope)
    assert np.array_equal(np.isnan(out.slope), dnu)


def test_no_ipc_no_change():
    det = sim.DetectorModel.for_detector("IMG1", size=64, seed=0)
    assert det.ipc_alpha == 0.0
    k = ro.ipc_kernel(0.0)
    assert k[1, 1] == 1.0 and k.sum() == 1.0
    with pytest.raises(ValueError, match="alpha"):
        ro.ipc_kernel(0.3)


# --- asymmetric kernels, the ipc reference, its builder and the step (2026-12-07) ---------

# an H4RG-like asymmetric kernel: horizontal coupling larger than vertical, one side more
KASYM = np.array([[0.0015, 0.0140, 0.0005],
                  [0.0230, 0.0000, 0.0170],
                  [0.0005, 0.0120, 0.0015]])
KASYM[1, 1] = 1.0 - KASYM.sum()


def _as_result(img):
    from types import SimpleNamespace

    one = np.ones_like(img)
    return SimpleNamespace(slope=img.copy(), var_poisson=one.copy(), var_rnoise=one.copy(),
                           err=np.sqrt(2 * one))


def test_asymmetric_kernel_is_undone_in_its_orientation():
    """The simulator couples with the forward kernel (kernel[1 + dy, 1 + dx] of a pixel's
    charge lands on its neighbour at (dy, dx)); ipc_deconvolve undoes it to float32 rounding.
    The mirrored kernel (the correlation convention the deconvolution used before) does not."""
    rng = np.random.default_rng(7)
    n = 40
    act = np.zeros((n, n), bool)
    act[4:-4, 4:-4] = True
    x = np.where(act, rng.uniform(0.0, 100.0, (n, n)), 0.0).astype(np.float32)
    x[20, 20] = 5000.0  # one sharp source
    y = sim.apply_ipc(x, KASYM, act)
    assert y[20, 21] == pytest.approx(5000 * KASYM[1, 2] + KASYM[1, 1] * x[20, 21]
                                      + KASYM[1, 0] * x[20, 22] + KASYM[0, 1] * x[21, 21]
                                      + KASYM[2, 1] * x[19, 21] + KASYM[0, 0] * x[21, 22]
                                      + KASYM[0, 2] * x[21, 20] + KASYM[2, 0] * x[19, 22]
                                      + KASYM[2, 2] * x[19, 20], rel=1e-5)
    good = _as_result(y)
    ro.ipc_deconvolve(good, KASYM)
    assert np.abs(good.slope - x)[act].max() < 1e-6 * 5000 * 10
    flipped = _as_result(y)
    ro.ipc_deconvolve(flipped, KASYM[::-1, ::-1])
    assert np.abs(flipped.slope - x)[19:22, 19:22].max() > 20.0  # ~ 5000 x 2 x 0.003 x 2
    # the white-noise amplification is sum((K^-1)^2), the same for both orientations
    k_inv_centre = 1.0 / KASYM[1, 1]
    amp = ro.ipc_deconvolve(_as_result(y), KASYM)
    assert k_inv_centre**2 < amp < k_inv_centre**2 * 1.01


def test_bad_ipc_kernels_are_named():
    with pytest.raises(ValueError, match="my kernel: must be 3x3"):
        ro.check_ipc_kernel(np.ones((2, 2)), "my kernel")
    with pytest.raises(ValueError, match="sum to 1.01"):
        ro.check_ipc_kernel(ro.ipc_kernel(0.02) + np.eye(3) * 0.01 / 3)
    inv = np.zeros((3, 3))  # the inverse of a 2 % kernel: centre ~1.09, negative arms
    inv[1, 1], inv[0, 1], inv[2, 1], inv[1, 0], inv[1, 2] = 1.08, -0.02, -0.02, -0.02, -0.02
    with pytest.raises(ValueError, match="inverse"):
        ro.check_ipc_kernel(inv)
    big = np.full((3, 3), 0.1)
    big[1, 1] = 0.2
    with pytest.raises(ValueError, match="not larger than"):
        ro.check_ipc_kernel(big)
    assert ro.ipc_iterations(ro.ipc_kernel(0.02)) == 7
    assert ro.ipc_iterations(ro.ipc_kernel(0.05)) > ro.ipc_iterations(ro.ipc_kernel(0.02))


@pytest.fixture(scope="module")
def pinhole_rates():
    """Rate images of a detector with the asymmetric kernel looking at isolated single-pixel
    sources (a grid of pinholes, like hot pixels of a dark but brighter), through the
    readout: what build_ipc measures."""
    from iris_tasks.datamodels import ImageModel
    from iris_tasks.datamodels.dqflags import pixel

    n = 96
    # (almost) linear pixels: the simulator applies the non-linearity before the coupling, so
    # the readout's per-pixel linearity correction of a bright source would take ~1 % off its
    # measured coupling at 15000 DN (docs/readout.md); this test is about the kernel's shape
    det = sim.DetectorModel.for_detector("IMG1", size=n, seed=2, nchan=8, ipc_kernel=KASYM,
                                         nonlin_a=np.full((n, n), 1e-10, np.float32))
    maps = ro.detector_maps(gain=det.gain, read_noise=det.read_noise,
                            saturation=det.saturation_reference())
    out = []
    for i, (oy, ox) in enumerate(((0, 0), (3, 5))):
        img = np.full((n, n), 5.0)
        img[10 + oy:n - 8:8, 10 + ox:n - 8:8] = 3000.0
        reads, truth = sim.simulate_ramp(det, img.astype(np.float32), nreads=8,
                                         noise=["poisson", "read", "ktc"], rng=10 + i,
                                         cosmic_rays=False)
        res = ro.process(reads, truth["read_times"], maps, mode="utr", channels=8)
        m = ImageModel(data=res.slope, err=res.err, dq=res.dq)
        m.meta.cal_step.readout = "COMPLETE"
        m.meta.instrument.detector = "IMG1"
        m.meta.observation.date, m.meta.observation.time = "2026-12-07", "03:00:00"
        m.meta.filename = f"pinholes_{i}_rate.fits"
        assert not (res.dq & pixel["SATURATED"]).any()
        out.append(m)
    return det, out


def test_build_ipc_measures_an_asymmetric_kernel(pinhole_rates, tmp_path):
    from iris_tasks.datamodels import IpcModel, open_model
    from iris_tasks.masters.common import MasterBuildError
    from iris_tasks.masters.ipc import build_ipc, save_ipc

    det, rates = pinhole_rates
    master = build_ipc(rates)
    k, err = master.model.data, master.model.err
    assert master.model.meta.ipc.nsources >= 150
    z = (k - KASYM) / np.maximum(err, 1e-9)
    assert np.abs(z).max() < 4.0, (k, err)
    assert np.abs(k - KASYM).max() < 1.5e-3
    # the asymmetry is kept: left/right and up/down differ as in the truth
    assert k[1, 0] - k[1, 2] == pytest.approx(KASYM[1, 0] - KASYM[1, 2], abs=1.5e-3)
    assert (k[1, 0] > k[1, 2]) and (k[0, 1] > k[2, 1])
    assert master.model.meta.ipc.alpha_x == pytest.approx((KASYM[1, 0] + KASYM[1, 2]) / 2, abs=1e-3)
    path = save_ipc(master, tmp_path)
    back = open_model(path)
    assert isinstance(back, IpcModel) and back.meta.reftype == "IPC"
    with fits_open(path) as hdul:
        assert hdul[0].header["IPCMETH"] == "POINTS" and hdul[0].header["DETECTOR"] == "IMG1"
    # a frame without point sources: a clear error naming it
    flat = rates[0].copy()
    flat.data[:] = 5.0
    with pytest.raises(MasterBuildError, match="pinholes_0_rate.fits.*sources"):
        build_ipc([flat])


def fits_open(path):
    from astropy.io import fits

    return fits.open(path)


def test_readout_step_deconvolves_with_the_ipc_reference(tmp_path):
    """ipc='reference' takes the kernel of the ipc reference (override or CRDS) and equals
    ipc_deconvolve with it; the legacy ipc_alpha equals ipc='alpha'; without a reference,
    or with both options, a clear error."""
    from test_steps_support import N, detector_references, write_ramp

    from iris_tasks.masters.ipc import ipc_reference
    from iris_tasks.steps import ReadoutStep, ReferenceFileError

    refs = detector_references(tmp_path / "refs")
    over = {f"override_{t}": str(refs[t])
            for t in ("mask", "saturation", "linearity", "readnoise", "gain")}
    rate = np.full((N, N), 20.0)
    rate[30, 30] = 4000.0
    raw = write_ramp(tmp_path / "sci.fits", rate)
    ref = ipc_reference(KASYM, detector="IMG1", useafter="2020-01-01T00:00:00",
                        source="test kernel")
    ipc_path = tmp_path / "test_ipc.fits"
    ref.save(str(ipc_path))
    plain = ReadoutStep.call(str(raw), **over)
    assert plain.meta.cal_step.ipc == "SKIPPED"
    out = ReadoutStep.call(str(raw), ipc="reference", override_ipc=str(ipc_path), **over)
    assert out.meta.cal_step.ipc == "COMPLETE"
    assert out.meta.ref_file.ipc.name.endswith("test_ipc.fits")
    expect = _as_result(np.array(plain.data))
    expect.var_poisson, expect.var_rnoise = (np.array(plain.var_poisson),
                                             np.array(plain.var_rnoise))
    ro.ipc_deconvolve(expect, np.asarray(ref.data, np.float64))
    np.testing.assert_allclose(out.data, expect.slope, rtol=1e-6, atol=1e-6)
    np.testing.assert_allclose(out.var_rnoise, expect.var_rnoise, rtol=1e-6)
    a = ReadoutStep.call(str(raw), ipc="alpha", ipc_alpha=0.015, **over)
    legacy = ReadoutStep.call(str(raw), ipc_alpha=0.015, **over)
    np.testing.assert_array_equal(a.data, legacy.data)
    assert not np.array_equal(a.data, out.data)
    with pytest.raises(ValueError, match="both given"):
        ReadoutStep.call(str(raw), ipc="reference", ipc_alpha=0.01,
                         override_ipc=str(ipc_path), **over)
    bad = ipc_reference(KASYM, detector="IMG1", useafter="2020-01-01T00:00:00", source="x")
    bad.data = (bad.data * 1.2).astype(np.float32)
    bad_path = tmp_path / "bad_ipc.fits"
    bad.save(str(bad_path))
    with pytest.raises(ReferenceFileError, match="bad_ipc.fits.*sum"):
        ReadoutStep.call(str(raw), ipc="reference", override_ipc=str(bad_path), **over)
    other = ipc_reference(KASYM, detector="IMG2", useafter="2020-01-01T00:00:00", source="x")
    other_path = tmp_path / "img2_ipc.fits"
    other.save(str(other_path))
    with pytest.raises(ReferenceFileError, match="DETECTOR=IMG2"):
        ReadoutStep.call(str(raw), ipc="reference", override_ipc=str(other_path), **over)


def test_ipc_reference_through_crds(tmp_path):
    """An ipc reference published into a CRDS context is selected by DETECTOR for
    ipc='reference' (R_IPC names it); a context without one is a clear error, and the
    default (ipc='off') does not look for one."""
    from test_steps_support import detector_references, write_ramp

    from iris_tasks.calib.testing import temporary_cache
    from iris_tasks.masters.ipc import ipc_reference
    from iris_tasks.steps import ReadoutStep, ReferenceFileError

    refs = detector_references(tmp_path / "refs")
    stage1 = [str(refs[t]) for t in ("mask", "saturation", "linearity", "readnoise", "gain")]
    raw = write_ramp(tmp_path / "sci.fits", 20.0)
    ref = ipc_reference(KASYM, detector="IMG1", useafter="2020-01-01T00:00:00",
                        source="test kernel")
    ipc_path = tmp_path / "refs" / "test_ipc.fits"
    ref.save(str(ipc_path))
    with temporary_cache(tmp_path / "cache") as calib:
        calib.publish_references(stage1, "stage-1 references, no ipc")
        plain = ReadoutStep.call(str(raw))
        assert plain.meta.cal_step.ipc == "SKIPPED"
        with pytest.raises(ReferenceFileError, match="no ipc reference"):
            ReadoutStep.call(str(raw), ipc="reference")
        calib.publish_references([str(ipc_path)], "IMG1 IPC kernel")
        out = ReadoutStep.call(str(raw), ipc="reference")
    assert out.meta.ref_file.ipc.name.startswith("crds://tmt_iris_ipc_")
    assert out.meta.cal_step.ipc == "COMPLETE"
    act = (slice(4, -4), slice(4, -4))
    # a flat field is unchanged by a kernel that sums to 1, its read-noise variance is not
    assert np.median(out.data[act]) == pytest.approx(np.median(plain.data[act]), abs=0.05)
    assert np.median(out.var_rnoise[act] / plain.var_rnoise[act]) > 1.1
