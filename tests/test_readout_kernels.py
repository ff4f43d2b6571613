"""readout_cy kernels == their numpy twins (readout_cy.reference), on small random ramps.

The kernels and the twins do the same float operations in the same order, so most
comparisons are exact (``array_equal`` with NaN == NaN); the few that are not say why.
"""

import itertools

import numpy as np
import pytest

import readout_cy as rc
import readout_cy.reference as ref
from iris_tasks.datamodels.dqflags import pixel as DQ
from readout_cy import _kernels

NY = NX = 64
FIELDS = ("slope", "var_poisson", "var_rnoise", "err", "dq", "nused")


def make_ramp(rng, nr=10, ny=NY, nx=NX, nramps=None, jump_rate=0.01, dt=1.5):
    """Random uint16 ramps: bias, flux (some negative), noise, jumps, and bright pixels."""
    t = np.arange(nr) * dt + 0.3
    flux = rng.uniform(-2.0, 400.0, (ny, nx))
    flux[rng.random((ny, nx)) < 0.05] = 4000.0  # saturate late
    base = rng.normal(10000.0, 50.0, (ny, nx))
    shape = (nr, ny, nx) if nramps is None else (nramps, nr, ny, nx)
    sig = base + flux * t[:, None, None] + rng.normal(0.0, 6.0, shape)
    hits = rng.random(shape) < jump_rate
    sig = sig + np.cumsum(hits * rng.uniform(200.0, 3000.0, shape), axis=-3)
    return t, np.clip(sig, 0, 65535).astype(np.uint16)


def options(rng, ny=NY, nx=NX):
    sat = np.full((ny, nx), 30000.0, np.float32)
    sat[0, 0] = np.nan  # no saturation check
    sat[5, 5] = 9000.0  # saturated from read 0
    sat[6, 6] = 10300.0  # saturated early
    coef = np.zeros((3, ny, nx), np.float32)
    coef[1] = 1.0
    coef[2] = rng.uniform(1e-7, 3e-6, (ny, nx))
    coef[:, 3, 3] = np.nan  # no linearity correction
    return dict(
        gain=2.0,
        read_noise=rng.uniform(4.0, 8.0, (ny, nx)).astype(np.float32),
        saturation=sat,
        nonlinearity=coef,
        refpix_channels=4,
    )


def assert_same(a, b, fields=FIELDS):
    for f in fields:
        x, y = getattr(a, f), getattr(b, f)
        assert x.dtype == y.dtype, f
        assert np.array_equal(x, y, equal_nan=True), f"{f}: {np.sum(x != y)} pixels differ"


@pytest.fixture
def rng():
    return np.random.default_rng(20260101)


VARIANTS = [
    {},
    {"weighting": "unweighted"},
    {"mode": "cds"},
    {"mode": "mcds", "fowler_k": 3},
    {"mode": "mcds"},
    {"jump_threshold": None},
    {"refpix": False},
    {"bias": 150.0},
    {"refpix_smooth": None},
    {"nonlinearity": None},
]


@pytest.mark.parametrize("variant", VARIANTS, ids=lambda v: ",".join(f"{k}={v[k]}" for k in v) or "default")
def test_process_ramp_matches_twin(rng, variant):
    t, reads = make_ramp(rng)
    kw = options(rng)
    kw.update(variant)
    got = rc.process_ramp(reads, t, **kw, dqflags=DQ)
    assert_same(got, ref.process_ramp(reads, t, **kw, dqflags=DQ))
    # the test data exercise what they should
    if variant.get("mode", "utr") == "utr" and variant.get("jump_threshold", 4.0):
        assert (got.dq & DQ["JUMP_DET"]).any()
    assert (got.dq & DQ["SATURATED"]).any()
    assert (got.dq & DQ["DO_NOT_USE"]).any()


def test_multi_ramp_matches_twin(rng):
    t, reads = make_ramp(rng, nramps=3)
    kw = options(rng)
    assert_same(rc.process_exposure(reads, t, **kw, dqflags=DQ),
                ref.process_exposure(reads, t, **kw, dqflags=DQ))


@pytest.mark.parametrize("nr", [1, 2, 3, 4])
def test_short_ramps_match_twin(rng, nr):
    t, reads = make_ramp(rng, nr=nr)
    kw = options(rng)
    got = rc.process_ramp(reads, t, **kw, dqflags=DQ)
    assert_same(got, ref.process_ramp(reads, t, **kw, dqflags=DQ))
    if nr == 1:
        # one read: no slope anywhere
        assert np.isnan(got.slope).all()
        assert (got.dq & DQ["DO_NOT_USE"]).all()
        assert (got.nused == 0).all()
        assert (got.err == 0).all()


def test_subarray_without_refpix(rng):
    t, reads = make_ramp(rng, ny=20, nx=36)
    kw = options(rng, 20, 36)
    kw["refpix"] = False
    got = rc.process_ramp(reads, t, **kw, dqflags=DQ)
    assert_same(got, ref.process_ramp(reads, t, **kw, dqflags=DQ))
    assert not (got.dq & DQ["REFERENCE_PIXEL"]).any()


def test_refpix_correct_matches_twin(rng):
    _, reads = make_ramp(rng, nr=4)
    for ch, sm in [(4, 11), (32, 5), (1, None), (64, 0)]:
        got = rc.refpix_correct(reads, channels=ch, smooth=sm)
        want = ref.refpix_correct(reads, channels=ch, smooth=sm)
        assert got.dtype == np.float32 and got.shape == reads.shape
        assert np.array_equal(got, want)


def test_refpix_removes_channel_offsets_and_row_drift(rng):
    """Offsets per channel and a smooth row drift common to all channels are removed."""
    ny = nx = 64
    nch = 4
    chw = nx // nch
    chan = np.repeat(rng.uniform(500, 2000, nch), chw)[None, :]
    drift = 30.0 * np.sin(np.arange(ny) / 9.0)[:, None]
    scene = rng.uniform(0, 100, (ny, nx))
    scene[:4] = scene[-4:] = 0.0
    scene[:, :4] = scene[:, -4:] = 0.0
    frame = (5000 + chan + drift + scene).round().astype(np.uint16)
    out = rc.refpix_correct(frame[None], channels=nch, smooth=5)[0]
    resid = out - scene
    # what is left is the rounding and the smoothing error of the drift: small
    assert np.abs(resid[4:-4, 4:-4]).max() < 3.0
    assert np.abs(np.median(resid[4:-4, 4:-4])) < 0.5


def test_flag_saturation_matches_twin(rng):
    _, reads = make_ramp(rng, nramps=2)
    sat = options(rng)["saturation"]
    got = rc.flag_saturation(reads, sat, dqflags=DQ)
    want = ref.flag_saturation(reads, sat, dqflags=DQ)
    assert np.array_equal(got.ngood, want.ngood)
    assert np.array_equal(got.dq, want.dq)
    assert got.ngood[0, 5, 5] == 0 and got.dq[5, 5] & DQ["DO_NOT_USE"]
    assert got.dq[0, 0] & DQ["NO_SAT_CHECK"]
    # the definition: leading reads strictly below saturation
    r = reads[0, :, 6, 6].astype(float)
    first = np.argmax(r >= sat[6, 6]) if (r >= sat[6, 6]).any() else len(r)
    assert got.ngood[0, 6, 6] == first


def test_flag_saturation_scalar(rng):
    _, reads = make_ramp(rng)
    got = rc.flag_saturation(reads, 12000, dqflags=DQ)
    want = ref.flag_saturation(reads, 12000, dqflags=DQ)
    assert np.array_equal(got.ngood, want.ngood) and np.array_equal(got.dq, want.dq)


@pytest.mark.parametrize("ncoef", [1, 2, 4, 5, 7])
def test_linearity_matches_twin(rng, ncoef):
    data = rng.uniform(0, 60000, (3, NY, NX)).astype(np.float32)
    coef = rng.normal(0, 1e-3, (ncoef, NY, NX)).astype(np.float32) / (1e4 ** np.arange(ncoef))[:, None, None].astype(np.float32)
    if ncoef > 1:
        coef[1] += 1.0
    coef[:, 7, 9] = np.nan
    got = rc.linearity_correct(data, coef, dqflags=DQ)
    want = ref.linearity_correct(data, coef, dqflags=DQ)
    # up to 5 coefficients the kernel pads the polynomial with leading zeros (0*x + c == c),
    # which can only flip the sign of an exact zero: compare with ==, not bitwise
    assert np.array_equal(got.data, want.data)
    assert np.array_equal(got.dq, want.dq)
    assert got.dq[7, 9] == DQ["NO_LIN_CORR"] and np.array_equal(got.data[:, 7, 9], data[:, 7, 9])


def test_linearity_horner_value():
    x = np.array([[[1000.0]]], np.float32)
    c = np.array([[[2.0]], [[1.0]], [[1e-5]]], np.float32)
    got = rc.linearity_correct(x, c, dqflags=DQ).data[0, 0, 0]
    assert got == pytest.approx(2.0 + 1000.0 + 1e-5 * 1e6, rel=1e-6)


def test_detect_jumps_matches_twin(rng):
    t, reads = make_ramp(rng, nr=9, jump_rate=0.02)
    data = reads.astype(np.float32)
    ng = ref.flag_saturation(reads, options(rng)["saturation"], dqflags=DQ).ngood
    kw = dict(gain=2.0, read_noise=6.0, threshold=4.0, ngood=ng)
    got = rc.detect_jumps(data, t, **kw, dqflags=DQ)
    want = ref.detect_jumps(data, t, **kw, dqflags=DQ)
    assert np.array_equal(got.jumps, want.jumps)
    assert np.array_equal(got.median_rate, want.median_rate, equal_nan=True)
    assert np.array_equal(got.dq, want.dq)
    assert got.jumps.any()


def test_fit_slopes_matches_twin(rng):
    t, reads = make_ramp(rng, nramps=2)
    data = reads.astype(np.float32)
    ng = ref.flag_saturation(reads, 20000.0, dqflags=DQ).ngood
    for kw in [dict(), dict(weighting="unweighted"), dict(mode="cds"), dict(mode="mcds", fowler_k=2)]:
        jr = rc.detect_jumps(data[0], t, gain=2.0, read_noise=6.0, ngood=ng[0], dqflags=DQ)
        jumps = np.stack([jr.jumps, np.zeros_like(jr.jumps)])
        args = dict(gain=2.0, read_noise=6.0, ngood=ng, jumps=jumps, **kw)
        assert_same(rc.fit_slopes(data, t, **args, dqflags=DQ),
                    ref.fit_slopes(data, t, **args, dqflags=DQ))
        args["median_rate"] = np.stack([jr.median_rate, jr.median_rate])
        assert_same(rc.fit_slopes(data, t, **args, dqflags=DQ),
                    ref.fit_slopes(data, t, **args, dqflags=DQ))


def test_fused_equals_composition_of_kernels(rng):
    """process_ramp == refpix -> bias -> linearity -> jumps -> fit, kernel by kernel."""
    t, reads = make_ramp(rng)
    kw = options(rng)
    got = rc.process_ramp(reads, t, bias=120.0, **kw, dqflags=DQ)
    x = rc.refpix_correct(reads, channels=4, smooth=11, read_times=t) - np.float32(120.0)
    lin = rc.linearity_correct(x, kw["nonlinearity"], dqflags=DQ)
    sat = rc.flag_saturation(reads, kw["saturation"], dqflags=DQ)
    jr = rc.detect_jumps(lin.data, t, gain=2.0, read_noise=kw["read_noise"], ngood=sat.ngood,
                         dqflags=DQ)
    rvar = rc.refpix_variance(kw["read_noise"], reads.shape[-2:], channels=4, smooth=11,
                              excluded=got.refpix.excluded)
    fit = rc.fit_slopes(lin.data, t, gain=2.0, read_noise=kw["read_noise"], ngood=sat.ngood,
                        jumps=jr.jumps, median_rate=jr.median_rate, refpix_var=rvar, dqflags=DQ)
    for f in ("slope", "var_poisson", "var_rnoise", "err", "nused"):
        assert np.array_equal(getattr(got, f), getattr(fit, f), equal_nan=True), f
    core = DQ["SATURATED"] | DQ["JUMP_DET"] | DQ["DO_NOT_USE"]
    assert np.array_equal(got.dq & core, (fit.dq | sat.dq) & core)
    assert np.array_equal(got.dq & DQ["NO_LIN_CORR"], lin.dq)


@pytest.mark.parametrize("n", [1, 2, 3, 5, 8, 9, 13, 16, 33])
def test_sorting_network_sorts(n):
    pairs = rc.sorting_network(n)
    rng = np.random.default_rng(n)
    cases = [rng.permutation(n) for _ in range(50)]
    cases += [np.array(c) for c in itertools.islice(itertools.product([0, 1], repeat=n), 300)]
    for v in cases:
        v = v.astype(float).copy()
        for a, b in pairs:
            if v[b] < v[a]:
                v[a], v[b] = v[b], v[a]
        assert np.all(np.diff(v) >= 0)


def test_coefficients_match_twin():
    t = np.array([0.0, 1.1, 2.0, 3.3, 4.1, 5.0, 6.2])
    for a, b in [(0, 6), (1, 4), (2, 3)]:
        for pw in ref.POWERS:
            C, R, P = _kernels.coefficients(t, a, b, pw)
            C2, R2, P2 = ref.utr_coefficients(t, a, b, pw)
            assert np.array_equal(C, C2) and R == R2 and P == P2
    for ns, kk in [(7, 3), (5, 2), (2, 1)]:
        C, R, P = _kernels.mcds_coefficients(t, ns, kk)
        C2, R2, P2 = ref.mcds_coefficients(t, ns, kk)
        assert np.array_equal(C, C2) and R == R2 and P == P2


def test_unweighted_coefficients_are_least_squares():
    """sum_k C_k d_k equals numpy's least-squares slope; R is its variance / rn^2."""
    t = np.array([0.0, 1.0, 2.5, 3.0, 4.5])
    y = np.array([3.0, 5.5, 9.0, 9.5, 14.0])
    C, R, _ = _kernels.coefficients(t, 0, 4, 0.0)
    assert np.dot(C, np.diff(y)) == pytest.approx(np.polyfit(t, y, 1)[0], rel=1e-12)
    assert R == pytest.approx(1.0 / np.sum((t - t.mean()) ** 2), rel=1e-12)


@pytest.mark.parametrize("n", [3, 4, 5, 8, 9, 10, 17, 30])
def test_median_selection_network(n):
    """The pruned network puts the true middle value(s) at the middle position(s)."""
    pairs = rc.sorting_network(n, median_only=True)
    assert len(pairs) <= len(rc.sorting_network(n))
    rng = np.random.default_rng(n)
    for _ in range(300):
        v = rng.normal(size=n)
        v[rng.random(n) < 0.2] = 0.0  # ties
        w = v.copy()
        for a, b in pairs:
            if w[b] < w[a]:
                w[a], w[b] = w[b], w[a]
        s = np.sort(v)
        assert w[n // 2] == s[n // 2] and w[(n - 1) // 2] == s[(n - 1) // 2]


def test_uneven_read_times_match_twin(rng):
    """Unequal intervals take the general jump-test path (equal ones a hoisted one)."""
    t, reads = make_ramp(rng)
    t = t + np.array([0.0, 0.2, 0.2, 0.9, 1.0, 1.0, 1.6, 1.7, 2.5, 2.6])
    kw = options(rng)
    assert_same(rc.process_ramp(reads, t, **kw, dqflags=DQ),
                ref.process_ramp(reads, t, **kw, dqflags=DQ))
    data = reads.astype(np.float32)
    got = rc.detect_jumps(data, t, gain=2.0, read_noise=6.0, dqflags=DQ)
    want = ref.detect_jumps(data, t, gain=2.0, read_noise=6.0, dqflags=DQ)
    assert np.array_equal(got.jumps, want.jumps) and got.jumps.any()
    assert np.array_equal(got.median_rate, want.median_rate, equal_nan=True)


@pytest.mark.parametrize("bias", [None, 35.0])
def test_four_term_linearity_matches_twin(rng, bias):
    """4 coefficients without bias has its own fused loop; with bias the general one."""
    t, reads = make_ramp(rng)
    kw = options(rng)
    coef = np.zeros((4,) + reads.shape[-2:], np.float32)
    coef[1] = 1.0
    coef[2] = rng.uniform(1e-7, 3e-6, reads.shape[-2:])
    coef[3] = rng.uniform(-1e-11, 1e-11, reads.shape[-2:])
    coef[:, 3, 3] = np.nan
    kw["nonlinearity"] = coef
    assert_same(rc.process_ramp(reads, t, bias=bias, **kw, dqflags=DQ),
                ref.process_ramp(reads, t, bias=bias, **kw, dqflags=DQ))


@pytest.mark.parametrize("nr", [4, 7, 10, 17, 18, 21])
@pytest.mark.parametrize("weighting", ["optimal", "unweighted"])
def test_fused_row_block_path_matches_twin(rng, nr, weighting):
    """The fused jump test + fit (AVX2 builds: 8 pixels per vector, 3..16 differences; more
    take the generic row code) on a row length that leaves a partial last vector, with
    saturated, jumped and NaN-gain pixels."""
    ny, nx = 24, 61
    t, reads = make_ramp(rng, nr=nr, ny=ny, nx=nx, jump_rate=0.03)
    kw = options(rng, ny, nx)
    kw.update(refpix_channels=1, weighting=weighting)
    gain = np.full((ny, nx), 2.0, np.float32)
    gain[2, 60] = np.nan  # in the partial last vector
    kw["gain"] = gain
    got = rc.process_ramp(reads, t, **kw, dqflags=DQ)
    assert_same(got, ref.process_ramp(reads, t, **kw, dqflags=DQ))
    assert (got.dq[:, 56:] & DQ["JUMP_DET"]).any()
    assert (got.dq[:, 56:] & DQ["SATURATED"]).any()


def test_map_stats_matches_numpy(rng):
    """One-pass NaN flag / NaN-ignoring min and max used to validate the maps."""
    for n in (1, 7, 8, 9, 262144, 262151, 600000):
        for kind in ("plain", "nan", "allnan", "inf", "negzero"):
            a = rng.normal(size=n).astype(np.float32)
            if kind == "nan":
                a[rng.integers(0, n, 3)] = np.nan
            elif kind == "allnan":
                a[:] = np.nan
            elif kind == "inf":
                a[rng.integers(0, n)] = -np.inf
            elif kind == "negzero":
                a[:] = -0.0
            for threads in (1, 2):
                anynan, lo, hi = _kernels.map_stats(a, threads)
                assert anynan == bool(np.isnan(a).any())
                assert np.array_equal([lo, hi], [np.fmin.reduce(a), np.fmax.reduce(a)], equal_nan=True)
    assert _kernels.map_stats(np.zeros(0, np.float32), 2)[0] is False

