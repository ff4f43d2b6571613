"""CrossProfile (iris_tasks.ifs.profile) and the extraction's geometry built from it."""

import numpy as np
import pytest

from iris_tasks.datamodels import IfsTraceModel
from iris_tasks.ifs.extract import build_geometry, extract
from iris_tasks.ifs.profile import FINE_PHASES, CrossProfile
from iris_tasks.instrument import nominal_design

MODES = ("LENSLET", "SLICER")


def _integrated(profile_1d, half, nphase, sub=64):
    """Pixel-integrated, normalised table (nb, nphase) of a 1-D profile f(dx)."""
    phi = np.linspace(-0.5, 0.5, nphase)
    u = (np.arange(sub) + 0.5) / sub - 0.5
    cols = np.arange(-half, half + 1)
    dx = cols[None, :, None] + u[None, None, :] - phi[:, None, None]
    w = profile_1d(dx).mean(axis=2)
    w /= w.sum(axis=1, keepdims=True)
    return w.T


def core_halo(sigma, halo_sigma, halo_frac, half, nphase=257):
    return _integrated(lambda d: (1 - halo_frac) * np.exp(-0.5 * (d / sigma) ** 2) / sigma
                       + halo_frac * np.exp(-0.5 * (d / halo_sigma) ** 2) / halo_sigma,
                       half, nphase)


def zoned_core_halo(size, sigma, half):
    """2 x 3 zones: the core widens across x and the halo grows along y (non-Gaussian)."""
    zy = np.array([0.25, 0.75]) * size
    zx = np.array([0.2, 0.5, 0.8]) * size
    table = np.empty((2, 3, 2 * half + 1, 257))
    for a in range(2):
        for b in range(3):
            table[a, b] = core_halo(sigma * (0.9 + 0.1 * b), 2.5 * sigma, 0.08 + 0.1 * a, half)
    return CrossProfile(table=table, zone_y=zy, zone_x=zx)


# ---------------------------------------------------------------------- the table itself
@pytest.mark.parametrize("sigma", [0.6, 1.0, 1.37])
def test_gaussian_float_path_is_the_fine_gaussian_profile(sigma):
    """build_geometry(sigma) == build_geometry(CrossProfile.gaussian(sigma, FINE_PHASES)), bit
    for bit; the default 257-phase table is within a few 1e-6 of it."""
    d = nominal_design("SLICER", 128)
    rng = np.random.default_rng(3)
    tx = d.trace_x + rng.uniform(-0.5, 0.5, d.trace_x.shape)
    ty = d.trace_y + rng.uniform(-0.5, 0.5, d.trace_y.shape)
    a = build_geometry(tx, ty, sigma, (128, 128))
    prof = CrossProfile.gaussian(sigma, nphase=FINE_PHASES)
    b = build_geometry(tx, ty, prof, (128, 128))
    for key in ("xs", "y0", "fy", "wx", "on_detector"):
        assert np.array_equal(getattr(a, key), getattr(b, key)), key
    assert np.array_equal(a.X0.indices, b.X0.indices)
    assert a.half == prof.half == int(np.ceil(4 * sigma))
    coarse = build_geometry(tx, ty, CrossProfile.gaussian(sigma), (128, 128))
    assert np.max(np.abs(coarse.wx - a.wx)) < 1e-5


def test_gaussian_table_values():
    p = CrossProfile.gaussian(0.6, half=3, nphase=5)
    assert p.table.shape == (1, 1, 7, 5) and p.half == 3 and p.nphase == 5
    np.testing.assert_allclose(p.table.sum(axis=2), 1.0, atol=1e-15)
    # symmetric: phase -phi mirrors phase +phi
    np.testing.assert_allclose(p.table[0, 0, :, 0], p.table[0, 0, ::-1, -1], atol=1e-15)
    np.testing.assert_allclose(p.table[0, 0, :, 2], p.table[0, 0, ::-1, 2], atol=1e-15)
    assert p.sigma_equivalent() == pytest.approx(np.sqrt(0.6**2 + 1 / 12), rel=0.02)


@pytest.mark.parametrize("bad, match", [
    (np.ones((1, 1, 3)), "4-D"),
    (np.full((1, 1, 4, 5), 0.25), "odd"),
    (np.full((1, 1, 3, 1), 1 / 3), "phase"),
    (np.full((1, 1, 3, 5), 0.3), "sum to 1"),
    (np.array([1.2, -0.2, 0.0])[None, None, :, None].repeat(3, axis=3), "negative"),
    (np.full((1, 1, 3, 5), np.nan), "NaN"),
])
def test_bad_tables_are_refused(bad, match):
    with pytest.raises(ValueError, match=match):
        CrossProfile(table=bad, zone_y=[0.0], zone_x=[0.0])


def test_bad_zones_are_refused():
    t = CrossProfile.gaussian(1.0).table
    with pytest.raises(ValueError, match="zone centres"):
        CrossProfile(table=t, zone_y=[0.0, 1.0], zone_x=[0.0])
    t2 = np.repeat(t, 2, axis=0)
    with pytest.raises(ValueError, match="increasing"):
        CrossProfile(table=t2, zone_y=[5.0, 1.0], zone_x=[0.0])


def test_float32_table_is_renormalised():
    t = core_halo(0.8, 2.0, 0.1, 6).astype(np.float32)[None, None]
    p = CrossProfile(table=t, zone_y=[0], zone_x=[0])
    assert p.table.dtype == np.float64
    np.testing.assert_allclose(p.table.sum(axis=2), 1.0, atol=1e-14)


def test_weights_interpolate_in_phase_and_between_zones():
    size = 200
    p = zoned_core_halo(size, 0.8, 5)
    t = p.table
    nph = p.nphase
    # exactly on a zone centre (an integer column, phase 0): the table column itself
    centre = (nph - 1) // 2
    first, w = p.weights(np.array([p.zone_x[1]]), np.array([p.zone_y[0]]))
    assert first[0] == 100 - p.half
    np.testing.assert_allclose(w[0], t[0, 1, :, centre], atol=1e-13)
    # one zone: at a phase node its column, half-way between two nodes their mean
    one = CrossProfile(table=t[:1, 1:2], zone_y=[0.0], zone_x=[0.0])
    node = 64
    xs = 100 + (-0.5 + np.array([node, node + 0.5]) / (nph - 1))
    _, w1 = one.weights(xs, np.zeros(2))
    np.testing.assert_allclose(w1[0], t[0, 1, :, node], atol=1e-13)
    np.testing.assert_allclose(w1[1], 0.5 * (t[0, 1, :, node] + t[0, 1, :, node + 1]),
                               atol=1e-13)
    # between zones (bilinear), renormalised; clamped beyond the outer centres
    yq, xq = 0.5 * (p.zone_y[0] + p.zone_y[1]), 118.0  # 3/10 of the way from zone_x 100 to 160
    _, w3 = p.weights(np.array([xq]), np.array([yq]))
    ref = (0.5 * 0.7 * (t[0, 1] + t[1, 1]) + 0.5 * 0.3 * (t[0, 2] + t[1, 2]))[:, centre]
    np.testing.assert_allclose(w3[0], ref / ref.sum(), atol=1e-13)
    assert w3[0].sum() == pytest.approx(1.0, abs=1e-14)
    _, w4 = p.weights(np.array([-50.0, 400.0]), np.array([-100.0, 900.0]))
    np.testing.assert_allclose(w4[0], t[0, 0, :, centre], atol=1e-13)
    np.testing.assert_allclose(w4[1], t[1, 2, :, centre], atol=1e-13)
    # the derivative is the phase slope: compare with a finite difference inside one node
    xs = np.array([100.013, 40.3, 155.21])
    ys = np.array([60.0, 120.0, 149.0])
    f0, dw = p.derivative(xs, ys)
    h = 1e-5
    _, wp = p.weights(xs + h, ys, renormalise=False)
    _, wm = p.weights(xs - h, ys, renormalise=False)
    np.testing.assert_allclose(dw, (wp - wm) / (2 * h), atol=2e-3)


def test_model_round_trip(tmp_path):
    p = zoned_core_halo(256, 0.7, 4)
    m = IfsTraceModel()
    m.meta.psf_sigma = 0.7
    m.meta.model_version = 2
    p.to_model(m)
    path = tmp_path / "trace.fits"
    m.save(path)
    with IfsTraceModel(path) as back:
        q = CrossProfile.from_model(back)
    np.testing.assert_allclose(q.table, p.table, atol=1e-6)
    np.testing.assert_array_equal(q.zone_y, p.zone_y)
    np.testing.assert_array_equal(q.zone_x, p.zone_x)
    # version 1: the Gaussian of PSFSIG with the historical table
    v1 = IfsTraceModel()
    v1.meta.psf_sigma = 0.7
    g = CrossProfile.from_model(v1)
    assert g.nphase == FINE_PHASES and g.half == 3
    v1.meta.psf_sigma = None
    v1.meta.filename = "broken_trace.fits"
    with pytest.raises(ValueError, match="broken_trace.fits"):
        CrossProfile.from_model(v1)
    bad = IfsTraceModel()
    bad.meta.filename = "bad_profile.fits"
    bad.profile = np.full((1, 1, 3, 5), 0.5, np.float32)
    with pytest.raises(ValueError, match="bad_profile.fits.*sum to 1"):
        CrossProfile.from_model(bad)


# ---------------------------------------------------------------------- the solver with it
@pytest.mark.parametrize("mode", MODES)
def test_non_gaussian_profile_is_inverted_exactly(mode):
    """A cube projected with a zone-dependent core+halo table comes back to round-off when
    extracted with that same table (solver mechanics: nothing in the blocks, preconditioner or
    CG assumes a Gaussian or a single profile)."""
    size = 192
    d = nominal_design(mode, size)
    prof = zoned_core_halo(size, d.psf_sigma, int(np.ceil(4 * d.psf_sigma)) + 2)
    geom = build_geometry(d.trace_x, d.trace_y, prof, (size, size))
    assert geom.half == prof.half
    rng = np.random.default_rng(5)
    cube = rng.uniform(0.2, 3.0, geom.cube_shape)
    image = geom.project(cube.ravel())
    var = rng.uniform(0.5, 2.0, geom.shape)
    res = extract(geom, image, var, np.ones(geom.shape, bool), rtol=1e-11, noise_tol=0.0,
                  maxiter=400)
    assert res.converged
    assert np.max(np.abs(res.flux / cube - 1)) < 1e-6
    # the wrong (Gaussian) profile does not invert it
    gauss = build_geometry(d.trace_x, d.trace_y, d.psf_sigma, (size, size))
    res_g = extract(gauss, image, var, np.ones(geom.shape, bool), rtol=1e-8, noise_tol=0.0,
                    maxiter=200)
    assert np.max(np.abs(res_g.flux / cube - 1)) > 1e-3
