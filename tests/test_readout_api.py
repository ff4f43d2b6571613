"""readout_cy Python face: streaming == batch, threads do not change results, bad input."""

import numpy as np
import pytest
from test_readout_kernels import FIELDS, assert_same, make_ramp, options

import readout_cy as rc
from iris_tasks.datamodels.dqflags import pixel as DQ


@pytest.fixture
def rng():
    return np.random.default_rng(99)


def stream(reads, t, ramps_by_end=False, read_time=None, **kw):
    r4 = reads if reads.ndim == 4 else reads[None]
    ny, nx = r4.shape[-2:]
    if read_time is None:
        acc = rc.RampAccumulator(ny, nx, t, **kw, dqflags=DQ)
    else:
        acc = rc.RampAccumulator(ny, nx, read_time=read_time, **kw, dqflags=DQ)
    for ramp in r4:
        for frame in ramp:
            acc.add_read(frame)
        if read_time is not None:
            acc.end_ramp()
    return acc.finalize()


@pytest.mark.parametrize("variant", [{}, {"weighting": "unweighted"}, {"mode": "cds"},
                                     {"mode": "mcds", "fowler_k": 2}, {"refpix": False},
                                     {"bias": 40.0}])
def test_streaming_equals_batch(rng, variant):
    t, reads = make_ramp(rng)
    kw = options(rng)
    kw.update(variant)
    # streaming corrects each read as it arrives, so it cannot judge reference pixels by
    # their behaviour over the ramp: it equals the batch call without that test ...
    batch = rc.process_ramp(reads, t, **kw, refpix_reject=None, dqflags=DQ)
    assert_same(stream(reads, t, **kw), batch)
    if not variant:
        assert (batch.dq & DQ["JUMP_DET"]).any() and (batch.dq & DQ["SATURATED"]).any()
    if kw.get("refpix", True):
        # ... and, given the pixels the batch call left out as its mask, the batch call with it
        # (these ramps have light in the border: many reference pixels are left out)
        full = rc.process_ramp(reads, t, **kw, dqflags=DQ)
        assert full.refpix.rejected > 0
        mask = np.zeros(reads.shape[-2:], bool)
        mask[full.refpix.excluded] = True
        assert_same(stream(reads, t, refpix_mask=mask, **kw), full)


def test_streaming_multi_ramp_and_read_time(rng):
    t, reads = make_ramp(rng, nramps=3, nr=7, dt=2.0)
    t = np.arange(7) * 2.0  # uniform: same times for the read_time form
    kw = options(rng)
    batch = rc.process_exposure(reads, t, **kw, refpix_reject=None, dqflags=DQ)
    assert_same(stream(reads, t, **kw), batch)
    assert_same(stream(reads, None, read_time=2.0, **kw), batch)


def test_streaming_long_ramp_grows_buffer(rng):
    t = np.arange(20) * 1.0
    _, reads = make_ramp(rng, nr=20, ny=24, nx=24, dt=1.0)
    kw = dict(gain=2.0, read_noise=5.0, saturation=30000.0, refpix_channels=4)
    assert_same(stream(reads, None, read_time=1.0, **kw),
                rc.process_ramp(reads, t, **kw, refpix_reject=None, dqflags=DQ))


def test_streaming_state_and_errors(rng):
    acc = rc.RampAccumulator(16, 16, [0.0, 1.0, 2.0], gain=2.0, read_noise=5.0, saturation=6e4,
                             refpix=False, dqflags=DQ)
    with pytest.raises(ValueError, match="no reads"):
        acc.finalize()
    with pytest.raises(TypeError, match="uint16"):
        acc.add_read(np.zeros((16, 16), np.float32))
    with pytest.raises(ValueError, match="shape"):
        acc.add_read(np.zeros((16, 17), np.uint16))
    for i in range(3):
        acc.add_read(np.full((16, 16), 1000 + 10 * i, np.uint16))
    assert acc.nramps == 1 and acc.nreads == 0
    res = acc.finalize()
    assert np.allclose(res.slope, 10.0)
    with pytest.raises(ValueError, match="exactly one"):
        rc.RampAccumulator(16, 16, gain=2.0, read_noise=5.0, saturation=6e4, dqflags=DQ)
    with pytest.raises(ValueError, match="read_time"):
        rc.RampAccumulator(16, 16, read_time=-1.0, gain=2.0, read_noise=5.0, saturation=6e4,
                           dqflags=DQ)


@pytest.mark.skipif(rc.max_threads() < 2 and not rc.openmp_enabled(), reason="no OpenMP")
def test_threads_do_not_change_results(rng):
    t, reads = make_ramp(rng, nramps=2)
    kw = options(rng)
    one = rc.process_exposure(reads, t, threads=1, **kw, dqflags=DQ)
    two = rc.process_exposure(reads, t, threads=2, **kw, dqflags=DQ)
    assert_same(one, two)
    four = rc.process_exposure(reads, t, threads=4, **kw, dqflags=DQ)
    assert_same(one, four)
    assert np.array_equal(rc.refpix_correct(reads, channels=4, threads=1),
                          rc.refpix_correct(reads, channels=4, threads=2))


def test_result_types(rng):
    t, reads = make_ramp(rng, nr=4)
    res = rc.process_ramp(reads, t, **options(rng), dqflags=DQ)
    assert isinstance(res, rc.RampResult)
    for f, dt in zip(FIELDS, [np.float32] * 4 + [np.uint32, np.uint16], strict=True):
        a = getattr(res, f)
        assert a.dtype == dt and a.shape == (64, 64)
    border = np.zeros((64, 64), bool)
    border[:4] = border[-4:] = True
    border[:, :4] = border[:, -4:] = True
    assert np.array_equal((res.dq & DQ["REFERENCE_PIXEL"]) != 0, border)


def test_nan_gain_flags_pixel(rng):
    t, reads = make_ramp(rng, nr=4)
    g = np.full((64, 64), 2.0, np.float32)
    g[10, 10] = np.nan
    res = rc.process_ramp(reads, t, gain=g, read_noise=5.0, saturation=6e4, refpix=False,
                          dqflags=DQ)
    assert res.dq[10, 10] & DQ["NO_GAIN_VALUE"] and res.dq[10, 10] & DQ["DO_NOT_USE"]
    assert np.isnan(res.slope[10, 10])
    assert np.isfinite(res.slope[11, 11])


def test_dq_bits_come_from_the_caller(rng):
    """readout_cy defines no DQ bits: permuting the caller's values permutes the output."""
    t, reads = make_ramp(rng)
    kw = options(rng)
    kw["gain"] = np.full(reads.shape[-2:], 2.0, np.float32)
    kw["gain"][9, 9] = np.nan  # NO_GAIN_VALUE | DO_NOT_USE
    mask = np.zeros(reads.shape[-2:], bool)
    mask[:4, 16:32] = mask[-4:, 16:32] = True  # channel 1 without reference: UNRELIABLE_BIAS
    kw["refpix_mask"] = mask  # and BAD_REF_PIXEL on those
    jwst = rc.process_ramp(reads, t, **kw, dqflags=DQ)
    names = [f.upper() for f in rc.DQFlags.__dataclass_fields__]
    other = dict(zip(names, [2**k for k in range(30, 30 - len(names), -1)], strict=True))
    moved = rc.process_ramp(reads, t, **kw, dqflags=rc.DQFlags.from_mapping(other))
    assert_same(jwst, moved, fields=[f for f in FIELDS if f != "dq"])
    for name in names:
        assert ((jwst.dq & DQ[name]) != 0).any(), name
        assert np.array_equal((jwst.dq & DQ[name]) != 0, (moved.dq & other[name]) != 0), name
    assert not (moved.dq & (2 ** (31 - len(names)) - 1)).any()


def test_dqflags_argument_is_checked():
    t = np.arange(3.0)
    reads = np.zeros((3, 8, 8), np.uint16)
    args = dict(gain=2.0, read_noise=5.0, saturation=6e4, refpix=False)
    with pytest.raises(TypeError, match="dqflags"):
        rc.process_ramp(reads, t, **args)
    with pytest.raises(TypeError, match="dqflags must be"):
        rc.process_ramp(reads, t, **args, dqflags=[1, 2, 4])
    with pytest.raises(ValueError, match="REFERENCE_PIXEL"):
        no_ref = {k: v for k, v in DQ.items() if k != "REFERENCE_PIXEL"}
        rc.flag_saturation(reads, 6e4, dqflags=no_ref)
    with pytest.raises(ValueError, match="SATURATED must be a single bit"):
        rc.linearity_correct(reads.astype(np.float32), np.ones((2, 8, 8), np.float32),
                             dqflags={**DQ, "SATURATED": 6})
    with pytest.raises(TypeError, match="JUMP_DET must be an int"):
        rc.DQFlags.from_mapping({**DQ, "JUMP_DET": 4.0})


def good_kwargs():
    return dict(gain=2.0, read_noise=5.0, saturation=60000.0, refpix=False)


READS = np.zeros((3, 16, 16), np.uint16)
T = [0.0, 1.0, 2.0]


@pytest.mark.parametrize(
    "reads,times,kw,exc,match",
    [
        (READS.astype(np.float32), T, {}, TypeError, "uint16"),
        (READS.astype(np.int32), T, {}, TypeError, "uint16"),
        (list(READS), T, {}, TypeError, "ndarray"),
        (np.zeros((16, 16), np.uint16), T, {}, ValueError, "shape"),
        (np.zeros((0, 16, 16), np.uint16), [], {}, ValueError, "zero reads"),
        (READS, [0.0, 1.0], {}, ValueError, "read_times has 2 entries"),
        (READS, [0.0, 2.0, 1.0], {}, ValueError, "strictly increasing"),
        (READS, [0.0, 1.0, 1.0], {}, ValueError, "strictly increasing"),
        (READS, [0.0, np.nan, 2.0], {}, ValueError, "finite"),
        (READS, T, {"gain": 0.0}, ValueError, "gain must be >"),
        (READS, T, {"gain": -2.0}, ValueError, "gain must be >"),
        (READS, T, {"gain": np.full((16, 16), -1.0)}, ValueError, "gain must be >"),
        (READS, T, {"gain": np.ones((8, 8))}, ValueError, "gain must be a scalar or have shape"),
        (READS, T, {"read_noise": np.ones((16, 15))}, ValueError, "read_noise must be a scalar"),
        (READS, T, {"read_noise": -1.0}, ValueError, "read_noise must be >="),
        (READS, T, {"saturation": np.ones((2, 16, 16))}, ValueError, "saturation"),
        (READS, T, {"saturation": "high"}, TypeError, "saturation must be numeric"),
        (READS, T, {"nonlinearity": np.ones((3, 8, 8), np.float32)}, ValueError, "nonlinearity"),
        (READS, T, {"mode": "fowler"}, ValueError, "mode must be one of"),
        (READS, T, {"weighting": "best"}, ValueError, "weighting must be one of"),
        (READS, T, {"mode": "mcds", "fowler_k": 0}, ValueError, "fowler_k"),
        (READS, T, {"jump_threshold": -3}, ValueError, "jump_threshold"),
        (READS, T, {"threads": 0}, ValueError, "threads"),
        (np.zeros((3, 8, 8), np.uint16), T, {"refpix": True}, ValueError, "reference border"),
        (np.zeros((3, 64, 60), np.uint16), T, {"refpix": True}, ValueError, "divisible"),
    ],
)
def test_bad_input(reads, times, kw, exc, match):
    args = good_kwargs()
    args.update(kw)
    if args.get("refpix") and "refpix_channels" not in args and reads.shape[-1] != 60:
        args["refpix_channels"] = 4
    with pytest.raises(exc, match=match):
        rc.process_ramp(reads, times, **args, dqflags=DQ)


def test_bad_input_kernels():
    with pytest.raises(ValueError, match="ngood"):
        rc.fit_slopes(np.zeros((3, 8, 8), np.float32), T, gain=1.0, read_noise=1.0,
                      ngood=np.full((8, 8), 9), dqflags=DQ)
    with pytest.raises(ValueError, match="jumps"):
        rc.fit_slopes(np.zeros((3, 8, 8), np.float32), T, gain=1.0, read_noise=1.0,
                      jumps=np.zeros((3, 8, 8), bool), dqflags=DQ)
    with pytest.raises(TypeError):
        rc.linearity_correct(np.zeros((8, 8), np.float32), np.zeros((2, 8, 8), np.int32),
                             dqflags=DQ)
    with pytest.raises(ValueError, match="process_exposure"):
        rc.process_exposure(READS, T, **good_kwargs(), dqflags=DQ)


def test_big_endian_input_accepted(rng):
    t, reads = make_ramp(rng, nr=5)
    kw = options(rng)
    assert_same(rc.process_ramp(reads.astype(">u2"), t, **kw, dqflags=DQ),
                rc.process_ramp(reads, t, **kw, dqflags=DQ))
    assert_same(stream(reads.astype(">u2"), t, **kw),
                rc.process_ramp(reads, t, **kw, refpix_reject=None, dqflags=DQ))
