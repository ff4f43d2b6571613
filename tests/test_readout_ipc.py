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
