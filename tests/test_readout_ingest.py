"""The batch call's per-read loop, run a piece of the row at a time over all reads
(readout_cy._kernels._ingest_ramp_row: a channel, or 256 columns of a wider one, with the
next row's reads and maps prefetched), equals the numpy twin bit for bit: every linearity
order (the k0 / k4 / k5 loops and the generic one above 5 coefficients), with and without a
bias map, several ramps, channels wider than a piece and rows that end in a partial piece,
1 and 3 threads."""

from __future__ import annotations

import numpy as np
import pytest

import readout_cy as rc
import readout_cy.reference as ref
from iris_tasks.datamodels.dqflags import pixel as DQ

FIELDS = ("slope", "var_poisson", "var_rnoise", "err", "dq", "nused")


def _ramps(rng, nramps, nr, ny, nx):
    t = np.arange(nr) * 1.4 + 0.2
    flux = rng.uniform(-2.0, 300.0, (ny, nx))
    flux[rng.random((ny, nx)) < 0.04] = 5000.0  # saturate mid-ramp
    base = rng.normal(9000.0, 40.0, (ny, nx))
    shape = (nramps, nr, ny, nx)
    sig = base + flux * t[:, None, None] + rng.normal(0.0, 6.0, shape)
    hits = rng.random(shape) < 0.01
    sig = sig + np.cumsum(hits * rng.uniform(300.0, 3000.0, shape), axis=-3)
    return t, np.clip(sig, 0, 65535).astype(np.uint16)


def _coeffs(rng, k, ny, nx):
    if k == 0:
        return None
    c = np.zeros((k, ny, nx), np.float32)
    c[min(1, k - 1)] = 1.0
    for j in range(2, k):
        c[j] = rng.uniform(-1.0, 1.0, (ny, nx)) * 10.0 ** (-6 - 3 * (j - 2))
    c[:, 4, 7] = np.nan  # left uncorrected, NO_LIN_CORR
    return c


@pytest.mark.parametrize("ncoef", [0, 2, 4, 5, 7])
@pytest.mark.parametrize("bias", [False, True])
@pytest.mark.parametrize(("refpix", "channels"), [(True, 2), (True, 8), (False, 1)])
def test_ingest_by_pieces_matches_twin(ncoef, bias, refpix, channels):
    rng = np.random.default_rng(1000 * ncoef + 10 * channels + bias)
    ny, nx, nr = 14, 600, 6  # 600 columns: channels of 300 (256 + 44) and 75, or one of 600
    t, reads = _ramps(rng, 2, nr, ny, nx)
    sat = np.full((ny, nx), 30000.0, np.float32)
    sat[3, 300] = np.nan  # no saturation check
    sat[5, 599] = 9100.0  # saturated early, in the row's last piece
    kw = dict(gain=rng.uniform(1.5, 2.5, (ny, nx)).astype(np.float32),
              read_noise=rng.uniform(4.0, 8.0, (ny, nx)).astype(np.float32),
              saturation=sat, nonlinearity=_coeffs(rng, ncoef, ny, nx), refpix=refpix,
              refpix_channels=channels, dqflags=DQ,
              bias=rng.normal(40.0, 3.0, (ny, nx)).astype(np.float32) if bias else None)
    want = ref.process_exposure(reads, t, **kw)
    for threads in (1, 3):
        got = rc.process_exposure(reads, t, threads=threads, **kw)
        for f in FIELDS:
            a, b = getattr(got, f), getattr(want, f)
            assert a.dtype == b.dtype, f
            assert np.array_equal(a, b, equal_nan=True), f"{f}: {np.sum(a != b)} pixels differ"
    assert (got.dq & DQ["SATURATED"]).any() and (got.dq & DQ["JUMP_DET"]).any()
    assert bool(got.dq[4, 7] & DQ["NO_LIN_CORR"]) == (ncoef > 0)


@pytest.mark.parametrize("nramps", [1, 2])
def test_pixel_dq_is_ored_in_the_row_loop(nramps):
    """pixel_dq (the step's mask-reference DQ) OR'ed as each row's DQ is written = the twin =
    OR'ing it afterwards; every other plane unchanged; bad maps named."""
    rng = np.random.default_rng(7 + nramps)
    ny, nx = 16, 64
    t, reads = _ramps(rng, nramps, 5, ny, nx)
    kw = dict(gain=2.0, read_noise=6.0, saturation=30000.0, refpix_channels=4, dqflags=DQ)
    pdq = np.zeros((ny, nx), np.uint32)
    pdq[rng.random((ny, nx)) < 0.1] = DQ["HOT"]
    pdq[0, :] |= DQ["DEAD"]  # on reference pixels too
    plain = rc.process_exposure(reads, t, **kw)
    want = ref.process_exposure(reads, t, pixel_dq=pdq, **kw)
    for threads, m in ((1, pdq), (3, pdq.astype(np.int64))):  # any integer map
        got = rc.process_exposure(reads, t, pixel_dq=m, threads=threads, **kw)
        assert np.array_equal(got.dq, want.dq)
        assert np.array_equal(got.dq, plain.dq | pdq)
        for f in FIELDS[:4] + ("nused",):
            assert np.array_equal(getattr(got, f), getattr(plain, f), equal_nan=True), f
    with pytest.raises(ValueError, match="pixel_dq must have shape"):
        rc.process_exposure(reads, t, pixel_dq=pdq[:-1], **kw)
    with pytest.raises(TypeError, match="pixel_dq must be an integer"):
        rc.process_exposure(reads, t, pixel_dq=pdq.astype(np.float32), **kw)
