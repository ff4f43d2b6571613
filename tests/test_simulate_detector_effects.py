"""Simulator realism the readout does not assume: the picture-frame effect near the edges and
noise common to all output channels at the pixel rate (their truth kept)."""

import numpy as np
import pytest

from iris_tasks.simulate import detector as sim

N = 64
NCH = 4


def _quiet(**kw):
    """A detector with no white read noise and no 1/f of the old kind: what is left in
    reads - bias is the effect under test (and the rounding to DN)."""
    return sim.DetectorModel.for_detector("IMG1", size=N, seed=1, nchan=NCH, onef_rms=0.0,
                                          read_noise=np.zeros((N, N), np.float32), **kw)


def test_common_noise_is_the_same_in_every_channel_at_the_same_pixel_time():
    det = _quiet(common_noise_rms=3.0)
    reads, truth = sim.simulate_ramp(det, None, nreads=4, noise=["onef"], rng=3,
                                     cosmic_rays=False)
    v = reads[0].astype(np.float64) - det.bias[None]  # (nreads, ny, nx): noise + rounding
    chw = N // NCH
    common, pos = truth["common_noise"], truth["common_noise_position"]
    assert common.shape == (1, 4, N, chw)
    # channel 0 is read left to right, channel 1 right to left: mirrored columns coincide
    np.testing.assert_array_equal(pos[:chw], np.arange(chw))
    np.testing.assert_array_equal(pos[chw:2 * chw], np.arange(chw)[::-1])
    for c in range(NCH):
        cols = slice(c * chw, (c + 1) * chw)
        order = np.argsort(pos[cols])
        got = v[:, :, cols][:, :, order]
        cold = ~det.hot[:, cols][:, order]  # hot pixels' dark charge is signal
        assert np.abs(got - common[0])[:, cold].max() <= 0.6  # rounding to whole DN
    # it varies along the row (pixel rate), and its rms per read is of the order asked
    within_row = common[0].std(axis=2).mean()
    assert within_row > 0.05
    assert 0.5 < common.std() < 6.0
    # channel to channel the same: the correlation of two channels' noise is ~1
    cold = ~(det.hot[:, 0:chw] | det.hot[:, chw:2 * chw][:, ::-1])
    a = v[:, :, 0:chw][:, cold]
    b = v[:, :, chw:2 * chw][:, :, ::-1][:, cold]
    assert np.corrcoef(a.ravel(), b.ravel())[0, 1] > 0.95


def test_picture_frame_follows_its_pattern_and_amplitudes():
    det = _quiet(picture_frame_rms=3.0, picture_frame_drift=0.5, picture_frame_scale=8.0)
    reads, truth = sim.simulate_ramp(det, None, nreads=5, noise=["read"], rng=4,
                                     cosmic_rays=False)
    pf = truth["picture_frame"]
    pattern, amp = pf["pattern"], pf["amplitude"]
    assert pattern[0, 0] == pytest.approx(1.0) and pattern[0, N // 2] == pytest.approx(1.0)
    assert pattern[8, 30] == pytest.approx(np.exp(-1.0), rel=1e-5)
    assert pattern[N // 2, N // 2] < 0.05
    v = reads[0].astype(np.float64) - det.bias[None]
    expect = amp[0][:, None, None] * pattern[None]
    assert np.abs(v - expect)[:, ~det.hot].max() <= 0.6
    # the amplitudes: the drift's ramp plus the jitter, independent between reads
    t = truth["read_times"]
    _, drift_only = sim.simulate_ramp(_quiet(picture_frame_drift=0.5), None, nreads=5,
                                      noise=["read"], rng=4, cosmic_rays=False)
    np.testing.assert_allclose(drift_only["picture_frame"]["amplitude"][0], 0.5 * t, rtol=1e-6)
    jitter = amp[0] - 0.5 * t
    assert 0.3 < jitter.std() < 9.0 and not np.allclose(jitter, jitter[0])
    # without the parameters the frames are those of earlier versions: no truth entries
    plain = _quiet()
    _, t0 = sim.simulate_ramp(plain, None, nreads=3, rng=4, cosmic_rays=False)
    assert "picture_frame" not in t0 and "common_noise" not in t0
