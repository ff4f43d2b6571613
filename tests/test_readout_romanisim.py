"""readout_cy on ramps no one here wrote: STScI's Roman simulator (romanisim).

romanisim's ``l1.make_l1`` makes H4RG-10 up-the-ramp reads from a total-electrons image with
its own physics: electrons apportioned to the reads by binomial sampling, Gaussian read noise
in DN, integer quantisation, and its own cosmic-ray model (Moyal energy loss along tracks
through the pixel depth; ``romanisim.cr``). None of it shares code or assumptions with the
project's simulator, so these tests check the readout against an independent generator:
unbiased slopes with honest errors on clean ramps, and cosmic-ray hits found and fitted
around. The read pattern is one read per resultant (``[[1], [2], ...]``), read i at
``i * read_time`` after the reset, which is the IRIS UTR sampling.

Arrays are small (64-256 px); romanisim 0.15 (its default IPC in make_l1 is not applied:
the return value of its add_ipc is unused there).
"""

from __future__ import annotations

import logging

import numpy as np
import pytest

import readout_cy as rc
from iris_tasks.datamodels.dqflags import pixel as DQ

_root = logging.getLogger()
_root_state = (list(_root.handlers), _root.level)
galsim = pytest.importorskip("galsim")
l1 = pytest.importorskip("romanisim.l1")
parameters = pytest.importorskip("romanisim.models.parameters")
# romanisim's import calls logging.basicConfig(level=INFO) on the root logger: undone, so
# that the tests run after this module in the same process log as they did before it.
for _handler in [h for h in _root.handlers if h not in _root_state[0]]:
    _root.removeHandler(_handler)
_root.setLevel(_root_state[1])

NREADS = 10
GAIN = 2.0  # e-/DN
READ_NOISE = 6.0  # DN per read
PEDESTAL_E = 2000.0


def _romanisim_reads(rate_e: np.ndarray, *, seed: int, crparam: dict | None = None):
    """(uint16 reads (NREADS, ny, nx), read times, romanisim's cosmic-ray DQ per read) for
    a scene of ``rate_e`` e-/s, exposed until the last read."""
    times = np.arange(1, NREADS + 1) * parameters.read_time
    # make_l1 takes the total electrons a perfect instrument would collect by the last read
    # (integers: the Poisson draw of the scene is the caller's).
    electrons = np.random.default_rng(seed).poisson(rate_e * times[-1]).astype(np.int32)
    reads, dq = l1.make_l1(galsim.Image(electrons), [[i] for i in range(1, NREADS + 1)],
                           read_noise=READ_NOISE, pedestal=PEDESTAL_E, gain=GAIN, seed=seed,
                           crparam=crparam)
    reads = np.asarray(reads)
    assert reads.max() < 65535, "the ramps must stay inside uint16"
    return np.round(reads).astype(np.uint16), times, np.asarray(dq)


def _fit(reads: np.ndarray, times: np.ndarray, **kwargs):
    return rc.process_ramp(reads, times, gain=GAIN, read_noise=READ_NOISE, saturation=65000.0,
                           refpix=False, dqflags=DQ, **kwargs)


@pytest.mark.parametrize("rate_e", [50.0, 2000.0])
def test_slopes_and_errors_on_romanisim_ramps(rate_e):
    """Faint (25 DN/s, read-noise limited over 10 reads) and bright (1000 DN/s, Poisson
    limited) ramps: the mean slope within 4 standard errors of the truth, and the residuals
    normalised by ERR of unit width (the error budget describes romanisim's noise)."""
    shape = (96, 96)
    reads, times, _ = _romanisim_reads(np.full(shape, rate_e), seed=3)
    res = _fit(reads, times, jump_threshold=None)
    assert not (res.dq & DQ["DO_NOT_USE"]).any()
    truth = rate_e / GAIN
    resid = res.slope.astype(np.float64) - truth
    sem = resid.std() / np.sqrt(resid.size)
    assert abs(resid.mean()) < 4 * sem, (resid.mean(), sem)
    pull = resid / res.err
    # the width of a normalised residual over 9216 pixels is known to ~0.7 %
    assert 0.96 < pull.std() < 1.04, pull.std()


def test_romanisim_cosmic_rays_are_found_and_fitted_around():
    """romanisim's cosmic rays at its default rate (8 /cm^2/s) over a 32 s ramp hit ~16 % of
    a 256 px field: the hits clearly above the noise (a jump > 10 x the read noise of a
    difference) are flagged JUMP_DET, clean pixels almost never, and the slopes of hit pixels
    stay unbiased with honest errors (the jump's read difference is left out)."""
    shape = (256, 256)
    rate_e = 100.0
    reads, times, cr_dq = _romanisim_reads(np.full(shape, rate_e), seed=5, crparam={"flux": 8.0})
    hit = (cr_dq != 0).any(axis=0)
    assert 0.05 < hit.mean() < 0.4, hit.mean()
    res = _fit(reads, times)
    flagged = (res.dq & DQ["JUMP_DET"]) != 0
    # the size of each pixel's largest step above its median read difference
    diffs = np.diff(reads.astype(np.float64), axis=0)
    step = diffs.max(axis=0) - np.median(diffs, axis=0)
    clear = hit & (step > 10 * np.sqrt(2) * READ_NOISE)
    assert clear.sum() > 1000
    assert flagged[clear].mean() > 0.99, flagged[clear].mean()
    assert flagged[~hit].mean() < 0.005, flagged[~hit].mean()
    usable = hit & ((res.dq & DQ["DO_NOT_USE"]) == 0)
    pull = (res.slope[usable] - rate_e / GAIN) / res.err[usable]
    assert abs(pull.mean()) < 0.05, pull.mean()
    assert 0.95 < pull.std() < 1.08, pull.std()
