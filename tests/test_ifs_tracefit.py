"""Trace geometry and cross-dispersion profile from lamp flats: iris_tasks.ifs.tracefit.

The lamp frames here come from a forward model written for these tests and unlike the
extraction's: the as-built traces depart from the design by a global shift, a smooth
distortion and a rotation (per-slice offsets for the slicer); the cross-dispersion profile is
a Gaussian core plus a wide halo (a Moffat halo for the lenslet, whose profile is measured
without a parametric form; a Gaussian halo for the slicer, whose fit is parametric), pixel
integrated by sub-sampling; every spaxel has its own throughput and the lamp spectrum varies
along the rows. The fit is scored against that truth.
"""

from __future__ import annotations

import math

import numpy as np
import pytest

from iris_tasks.errors import BadInputError
from iris_tasks.ifs.tracefit import FlatInput, fit_traces, legendre_at
from iris_tasks.instrument.ifs_design import nominal_design

SIZE = 256


# -- the test's own forward model ------------------------------------------------------------
def _profile_pixels(u, sigma, halo, halo_width, halo_kind, sub=24):
    """Fraction of a sample's flux in pixels centred ``u`` px from it: Gaussian core +
    halo, integrated over the pixel with ``sub`` sub-samples."""
    s = (np.arange(sub) + 0.5) / sub - 0.5
    v = np.asarray(u, np.float64)[..., None] + s
    core = np.exp(-0.5 * (v / sigma) ** 2) / (math.sqrt(2 * math.pi) * sigma)
    if halo_kind == "moffat":  # beta = 2.5, normalised over the real line
        beta = 2.5
        norm = math.gamma(beta) / (math.sqrt(math.pi) * halo_width * math.gamma(beta - 0.5))
        wing = norm * (1 + (v / halo_width) ** 2) ** -beta
    else:
        wing = np.exp(-0.5 * (v / halo_width) ** 2) / (math.sqrt(2 * math.pi) * halo_width)
    return ((1 - halo) * core + halo * wing).mean(-1)


class AsBuilt:
    """The as-built instrument of one test: true trace x(row) and profile, and its flats."""

    def __init__(self, mode, *, shift=0.7, distortion=0.6, rotation=0.4, slice_offsets=0.3,
                 sigma=None, halo=0.07, halo_width=None, halo_kind=None, seed=1):
        self.design = nominal_design(mode, SIZE, "Kbb")
        self.mode = mode
        rng = np.random.default_rng(seed)
        self.sigma = sigma or (1.05 if mode == "LENSLET" else 0.62)
        self.halo = halo
        self.halo_width = halo_width or (2.0 if mode == "LENSLET" else 1.8)
        self.halo_kind = halo_kind or ("moffat" if mode == "LENSLET" else "gauss")
        ny_s, nx_s, nw = self.design.trace_x.shape
        self.shift = shift
        self.distortion = distortion
        self.rotation = rotation
        self.slice_offset = rng.uniform(-slice_offsets, slice_offsets, ny_s) \
            if mode == "SLICER" else np.zeros(ny_s)
        if mode == "LENSLET":
            self.throughput = rng.uniform(0.9, 1.1, (ny_s, nx_s))
        else:  # a level per slice, vignetting along it
            s = np.linspace(-1, 1, nx_s)[None, :]
            self.throughput = rng.uniform(0.9, 1.1, (ny_s, 1)) * (
                1 + 0.03 * np.cos(0.5 * np.pi * s) + rng.uniform(-0.03, 0.03, (ny_s, 1)) * s)
        ty = self.design.trace_y
        self.first = np.ceil(ty[..., 0]).astype(int)
        self.last = np.floor(ty[..., -1]).astype(int)

    def x_true(self, j, i, rows):
        """True column of spaxel (j, i) at detector ``rows``."""
        tx, ty = self.design.trace_x[j, i], self.design.trace_y[j, i]
        xd = np.interp(rows, ty, tx)
        c = SIZE / 2
        bend = self.distortion * np.sin(np.pi * xd / SIZE) * (1 + 0.3 * ((rows - c) / c) ** 2)
        rot = self.rotation * (rows - c) / c
        return xd + self.shift + bend + rot + self.slice_offset[j]

    def lamp(self, k):
        """Lamp x filter spectrum along the spectrum (k rows from its blue end)."""
        return 100.0 * (1.0 + 0.3 * np.sin(k / 17.0))

    def pixels(self, u):
        return _profile_pixels(u, self.sigma, self.halo, self.halo_width, self.halo_kind)

    def image(self):
        ny_s, nx_s, _ = self.design.trace_x.shape
        img = np.zeros((SIZE, SIZE))
        reach = 12
        for j in range(ny_s):
            for i in range(nx_s):
                rows = np.arange(self.first[j, i], self.last[j, i] + 1)
                x = self.x_true(j, i, rows)
                cols = np.rint(x).astype(int)[:, None] + np.arange(-reach, reach + 1)
                # a function of wavelength: rows from the spectrum's blue end
                lamp = self.lamp(rows - self.design.trace_y[j, i, 0])
                w = self.pixels(cols - x[:, None]) * (lamp * self.throughput[j, i])[:, None]
                ok = (cols >= 0) & (cols < SIZE)
                np.add.at(img, (np.broadcast_to(rows[:, None], cols.shape)[ok], cols[ok]), w[ok])
        return img

    def truth_table(self, half, nphase):
        phase = -0.5 + np.arange(nphase) / (nphase - 1)
        off = (np.arange(2 * half + 1) - half)[:, None] - phase[None, :]
        t = self.pixels(off)
        return t / t.sum(0, keepdims=True)

    def flat(self, noise=0.0, seed=2, name="lamp_rate.fits"):
        img = self.image()
        rng = np.random.default_rng(seed)
        var = np.full(img.shape, max(noise, 1e-3) ** 2) + 0.01 * np.maximum(img, 0) * (noise > 0)
        data = img + rng.normal(0, 1, img.shape) * np.sqrt(var) * (noise > 0)
        return FlatInput(data=data, variance=var, good=np.ones(img.shape, bool), name=name)


def _score(sol, truth):
    """rms and max |x_fit - x_true| over the measured rows of every traced spaxel."""
    ny_s, nx_s, _ = truth.design.trace_x.shape
    errs = []
    for j in range(ny_s):
        for i in range(nx_s):
            lo, hi = sol.row_range[j, i]
            rows = np.arange(int(lo), int(hi) + 1, dtype=float)
            t = 2 * (rows - sol.y_limits[0]) / (sol.y_limits[1] - sol.y_limits[0]) - 1
            xf = legendre_at(sol.x_coeffs[j, i][None, None], t[None, None])[0, 0]
            errs.append(xf - truth.x_true(j, i, rows))
    e = np.concatenate(errs)
    return float(np.sqrt(np.mean(e**2))), float(np.abs(e).max())


# -- lenslet ----------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def lenslet():
    truth = AsBuilt("LENSLET")
    return truth, fit_traces([truth.flat()], truth.design)


def test_lenslet_traces_match_the_truth(lenslet):
    truth, sol = lenslet
    rms, worst = _score(sol, truth)
    print("lenslet trace rms", rms, "max", worst, sol.qa)
    assert rms <= 0.01
    assert sol.qa["traced_fraction"] == 1.0


def test_lenslet_profile_matches_the_truth(lenslet):
    truth, sol = lenslet
    table = sol.profile.table
    nb, nphase = table.shape[2:]
    ref = truth.truth_table((nb - 1) // 2, nphase)
    err = np.abs(table - ref[None, None]).max() / ref.max()
    print("lenslet profile max error / peak", err, "residual", sol.qa["profile_residual"])
    assert err <= 0.01
    assert sol.qa["profile_residual"] <= 0.01


# -- slicer -----------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def slicer():
    truth = AsBuilt("SLICER")
    # this test's distortion bends a slice by ~0.04 px across its 59 spaxels (0.6 px over
    # the 256 columns): the curvature across slices is needed here
    return truth, fit_traces([truth.flat()], truth.design, slice_curvature=True)


def test_slicer_traces_match_the_truth(slicer):
    truth, sol = slicer
    rms, worst = _score(sol, truth)
    print("slicer trace rms", rms, "max", worst, sol.qa)
    assert rms <= 0.01
    assert sol.qa["traced_fraction"] == 1.0


def test_slicer_profile_matches_the_truth(slicer):
    truth, sol = slicer
    table = sol.profile.table
    nb, nphase = table.shape[2:]
    ref = truth.truth_table((nb - 1) // 2, nphase)
    err = np.abs(table - ref[None, None]).max() / ref.max()
    print("slicer profile max error / peak", err, "residual", sol.qa["profile_residual"])
    assert err <= 0.01
    assert sol.qa["profile_residual"] <= 0.01


@pytest.mark.parametrize("mode", ["LENSLET", "SLICER"])
def test_throughput_is_recovered(mode, lenslet, slicer):
    truth, sol = lenslet if mode == "LENSLET" else slicer
    ref = truth.throughput / np.median(truth.throughput)
    assert np.median(sol.throughput) == pytest.approx(1.0)
    assert np.abs(sol.throughput - ref).max() < 0.01


# -- refusals ---------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def lamp_frames():
    out = {}
    for mode in ("LENSLET", "SLICER"):
        truth = AsBuilt(mode)
        out[mode] = (truth, truth.flat(noise=0.05))
    return out


@pytest.mark.parametrize("mode", ["LENSLET", "SLICER"])
def test_lamp_off_is_refused(mode, lamp_frames):
    truth, flat = lamp_frames[mode]
    rng = np.random.default_rng(5)
    dark = FlatInput(data=rng.normal(0, 0.05, flat.data.shape), variance=flat.variance * 0 +
                     0.0025, good=flat.good, name="off_rate.fits")
    with pytest.raises(BadInputError, match="off_rate.fits.*off or too faint"):
        fit_traces([dark], truth.design)


@pytest.mark.parametrize("mode", ["LENSLET", "SLICER"])
def test_saturated_lamp_is_refused(mode, lamp_frames):
    truth, flat = lamp_frames[mode]
    sat = flat.data > 0.3 * flat.data.max()
    hot = FlatInput(data=flat.data, variance=flat.variance, good=flat.good & ~sat,
                    saturated=sat, name="hot_rate.fits")
    with pytest.raises(BadInputError, match="hot_rate.fits.*saturated"):
        fit_traces([hot], truth.design)


@pytest.mark.parametrize("mode", ["LENSLET", "SLICER"])
def test_other_mode_is_refused(mode, lamp_frames):
    truth, flat = lamp_frames[mode]
    other = nominal_design("SLICER" if mode == "LENSLET" else "LENSLET", SIZE, "Kbb")
    wrong = FlatInput(data=flat.data, variance=flat.variance, good=flat.good,
                      name="wrong_rate.fits")
    with pytest.raises(BadInputError, match="wrong_rate.fits.*does not match"):
        fit_traces([wrong], other)


def test_pattern_shifted_beyond_the_search_is_refused():
    truth = AsBuilt("SLICER", shift=3.5, distortion=0.0, rotation=0.0, slice_offsets=0.0)
    flat = truth.flat(noise=0.05, name="moved_rate.fits")
    with pytest.raises(BadInputError, match="moved_rate.fits.*search window"):
        fit_traces([flat], truth.design)


def test_no_flat_is_refused():
    with pytest.raises(BadInputError, match="no lamp flat"):
        fit_traces([], nominal_design("LENSLET", SIZE, "Kbb"))


# -- the realistic simulator's lamp flats ----------------------------------------------------
def _sim_flats(mode, size, n=2, seed=11):
    """LEN-SPX / SLI-NFF rate images of the simulator's as-built IFS (flexure per exposure),
    with Poisson and read noise at the ramp-fit level. The rates are those of a frame the
    flat_field step has corrected (illumination / the median gain): the detector's pixel
    response (3 % rms) and its 2 % channel gain steps, left in, move the fitted traces by
    ~0.01 px (slicer), which is the flat's business, not the trace fit's."""
    import datetime as dt

    from iris_tasks.simulate.frames import FrameFactory, FrameSpec
    from iris_tasks.simulate.ifs_optics import Flexure

    scale = {"LENSLET": "4", "SLICER": "25"}[mode]
    factory = FrameFactory(size=size, seed=seed,
                           detector_overrides={"onef_rms": 0.0, "cr_rate": 0.0})
    det = factory.detector("IFS")
    gain = float(np.median(det.gain))
    rng = np.random.default_rng(seed)
    flats, flexures = [], []
    for k in range(n):
        spec = FrameSpec(detector="IFS", obsname={"LENSLET": "LEN-SPX", "SLICER": "SLI-NFF"}[mode],
                         exp_no=k + 1, start=dt.datetime(2026, 11, 30, 2, 5 * k,
                                                         tzinfo=dt.UTC),
                         filter="Kbb", ifsscale=scale)
        illumination, info = factory.illumination(spec)
        rate = np.asarray(illumination, np.float64) / gain
        t = (spec.nreads - 1) * spec.read_time
        var = (np.maximum(rate, 0) * 6 / 5 / (gain * t)
               + 12 * np.asarray(det.read_noise, np.float64) ** 2
               / (spec.nreads * (spec.nreads**2 - 1) * spec.read_time**2))
        data = rate + rng.normal(size=rate.shape) * np.sqrt(var)
        flats.append(FlatInput(data=data, variance=var, good=det.active & ~det.dead,
                               name=f"{spec.filename[:-5]}_rate.fits"))
        f = info["flexure"]
        flexures.append(Flexure(f["dx_px"], f["dy_px"], f["rot_deg"]))
    truth = factory.ifs_truth(mode, scale, "Kbb")
    # the traces the flats show: the as-built ones moved by the flats' mean flexure
    tx = np.mean([f.apply(truth.trace_x, truth.trace_y, size)[0] for f in flexures], axis=0)
    ty = np.mean([f.apply(truth.trace_x, truth.trace_y, size)[1] for f in flexures], axis=0)
    return flats, truth, tx, ty, nominal_design(mode, size, "Kbb", scale)


def _sim_score(sol, tx, ty):
    """x_fit - x_true at the true rows of the design wavelengths, where the trace was
    measured, away from the band's outermost 3 % (the filter edges)."""
    nw = tx.shape[-1]
    inner = np.zeros(nw, bool)
    inner[int(0.03 * nw): nw - int(0.03 * nw)] = True
    on = (ty >= sol.row_range[..., :1]) & (ty <= sol.row_range[..., 1:]) & inner
    return (sol.x_at(ty) - tx)[on]


@pytest.mark.slow
def test_simulated_slicer_flats_match_the_as_built_truth():
    flats, truth, tx, ty, design = _sim_flats("SLICER", 512)
    sol = fit_traces(flats, design)
    d = _sim_score(sol, tx, ty)
    rms = float(np.sqrt(np.mean(d**2)))
    params = np.array(sol.qa["profile_params"]).reshape(-1, 3)
    print("simulated slicer: x rms", rms, "median", np.median(d), sol.qa)
    assert rms <= 0.01
    assert sol.qa["profile_residual"] <= 0.01
    # the core's width (the truth's spans 0.49-0.72 px with wavelength and field) and halo
    assert np.median(params[:, 0]) == pytest.approx(np.median(truth.psf_sigma_x), rel=0.05)
    assert np.median(params[:, 1]) == pytest.approx(truth.halo_fraction, abs=0.01)


@pytest.mark.slow
def test_simulated_lenslet_flats_match_the_as_built_truth():
    # 1024 px: a 7-column pitch. At 512 px (6 columns) the 4 px halo of every spectrum
    # spreads over its neighbours' cores and the traces come out to ~0.02 px rms; the
    # 4096 px detector has a 31-column pitch.
    flats, truth, tx, ty, design = _sim_flats("LENSLET", 1024, n=1)
    sol = fit_traces(flats, design)
    d = _sim_score(sol, tx, ty)
    rms = float(np.sqrt(np.mean(d**2)))
    print("simulated lenslet: x rms", rms, "median", np.median(d), sol.qa)
    assert rms <= 0.01
    assert sol.qa["profile_residual"] <= 0.01
    assert sol.qa["traced_fraction"] == 1.0


@pytest.mark.parametrize("mode", ["LENSLET", "SLICER"])
def test_noisy_flats_still_meet_the_goal(mode):
    truth = AsBuilt(mode)
    flats = [truth.flat(noise=0.05, seed=10 + k) for k in range(2)]
    kw = {"slice_curvature": True} if mode == "SLICER" else {}
    sol = fit_traces(flats, truth.design, **kw)
    rms, _ = _score(sol, truth)
    table = sol.profile.table
    ref = truth.truth_table((table.shape[2] - 1) // 2, table.shape[3])
    print(mode, "noisy: trace rms", rms, "table", np.abs(table - ref).max() / ref.max(), sol.qa)
    assert rms <= 0.01
    assert np.abs(table - ref[None, None]).max() / ref.max() <= 0.02
    assert sol.qa["profile_residual"] <= sol.qa["profile_residual_noise"] + 0.005
