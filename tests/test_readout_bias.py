"""Empty-pixel rates of simulated frames: no content-dependent offset, small common-mode noise.

A 256 px LEN-SCI frame once came out of the readout at -0.06 DN/s in its unilluminated
pixels (raw CDS of the same pixels ~0), -14 % of the lenslet field's flux in the cube. That
offset is not caused by the frame's content: the same noise with or without the spectra gives
the same empty-pixel rate. It is the read-to-read noise of the reference-pixel correction,
common to the whole frame because the side-column correction is tied to the first and last
channel offsets alone (2 x 64 reference pixels per read at 256 px, 32 channels). Tying it to
the mean of all channel offsets instead cuts that frame-mean noise ~4x (white noise) and does
not make it worse with the simulator's 1/f noise; the change belongs to readout_cy.
"""

import datetime as dt

import numpy as np
import pytest

import readout_cy as rc
from iris_tasks.datamodels.dqflags import pixel as DQ
from iris_tasks.simulate.detector import DetectorModel, simulate_ramp
from iris_tasks.simulate.frames import FrameFactory, FrameSpec

START = dt.datetime(2026, 11, 24, 6, 0, tzinfo=dt.UTC)


def _maps(det):
    coeffs, _ = det.linearity_coefficients()
    return dict(gain=det.gain, read_noise=det.read_noise,
                saturation=det.saturation_reference(), nonlinearity=coeffs)


def test_empty_pixel_rate_does_not_depend_on_the_ifs_spectra():
    """Same detector noise with and without the LEN-SCI spectra: same empty-pixel rate."""
    # ideal IFS optics: the realistic PSF halo puts ~0.01 e-/s into every "empty" pixel
    factory = FrameFactory(size=128, seed=0, detector_overrides={"onef_rms": 0.0, "cr_rate": 0.0},
                           optics="ideal")
    det = factory.detector("IFS")

    def spec(obsname):
        return FrameSpec(detector="IFS", obsname=obsname, exp_no=1, start=START, filter="Kbb",
                         nreads=10)

    sci, dark = spec("LEN-SCI"), spec("LEN-DRK")
    expected_sci, _ = factory.make(sci, noise=False, cosmic_rays=False)
    expected_dark, _ = factory.make(dark, noise=False, cosmic_rays=False)
    spectra = np.asarray(expected_sci.data, np.int32) - np.asarray(expected_dark.data, np.int32)
    noisy_dark, _ = factory.make(dark)
    without = np.asarray(noisy_dark.data)
    with_spectra = np.clip(without.astype(np.int32) + spectra, 0, 65535).astype(np.uint16)
    times = expected_sci.read_times()
    light, _ = factory.illumination(sci)
    empty = det.active & (light * det.flat("Kbb") < 0.05) & ~det.hot & ~det.dead
    assert empty.mean() > 0.5

    a = rc.process_ramp(without, times, **_maps(det), threads=1, dqflags=DQ).slope
    b = rc.process_ramp(with_spectra, times, **_maps(det), threads=1, dqflags=DQ).slope
    assert abs(np.mean((b - a)[empty])) < 0.003  # DN/s; the reported offset was -0.057
    lit = light * det.flat("Kbb") / det.gain
    bright = (lit > 5.0) & np.isfinite(a) & np.isfinite(b)  # the spectra themselves
    assert bright.sum() > 100
    assert np.median((b - a)[bright] / lit[bright]) == pytest.approx(1.0, abs=0.01)


def test_reference_correction_keeps_frame_mean_slope_noise_small():
    """White read noise only, 128 px with 32 channels (the IFS e2e tests' detector): the
    frame-mean slope error over darks stays near what the channel offsets alone allow.

    Measured (24 ramps): 0.055 DN/s rms with the first/last-channel tie, 0.018 with the tie
    to all channel offsets; the pixels' own white noise alone gives 0.003.
    """
    det = DetectorModel.for_detector("IFS", 128, seed=0, onef_rms=0.0)
    errors = []
    for seed in range(24):
        reads, truth = simulate_ramp(det, None, nreads=10, rng=seed, cosmic_rays=False,
                                     noise=["read"])
        res = rc.process_ramp(reads, truth["read_times"], **_maps(det), threads=1, dqflags=DQ)
        true = truth["rate_e_per_s"] / det.gain
        errors.append(np.mean((res.slope - true)[det.active]))
    errors = np.array(errors)
    assert abs(errors.mean()) < 4 * errors.std(ddof=1) / np.sqrt(errors.size)  # unbiased
    assert np.sqrt(np.mean(errors**2)) < 0.03
