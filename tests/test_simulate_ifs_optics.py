"""The simulator's realistic IFS (as-built optics, core + halo PSF, non-linear dispersion,
flexure, published arc and OH lines) and its ideal mode (the extraction's own model)."""

from __future__ import annotations

import ast
import dataclasses
import datetime as dt
from pathlib import Path

import numpy as np
import pytest

from iris_tasks.instrument import arc_lines, nominal_design, oh_lines
from iris_tasks.simulate import FrameFactory, FrameSpec, build_scene, build_trace, project_cube
from iris_tasks.simulate.ifs import build_as_built_ifs, build_realistic_scene
from iris_tasks.simulate.ifs_optics import Flexure, SpectralComponent, flexure_at, render

SCALE = {"LENSLET": "4", "SLICER": "25"}
OBS = {("LENSLET", "flat"): "LEN-SPX", ("SLICER", "flat"): "SLI-NFF",
       ("LENSLET", "arc"): "LEN-IDP", ("SLICER", "arc"): "SLI-IDP",
       ("LENSLET", "science"): "LEN-SCI", ("SLICER", "science"): "SLI-SCI"}
# local 16:00 at the site (UTC-10) of 2026-12-07 = 02:00 UTC on 2026-12-08
CAL_START = dt.datetime(2026, 12, 8, 2, 0, tzinfo=dt.UTC)


def _no_halo(optics):
    return dataclasses.replace(optics, psf=dataclasses.replace(optics.psf, halo_fraction=0.0))


def _air(vacuum_um: float) -> float:
    """Vacuum -> air wavelength (Morton 2000, the IAU standard used by NIST)."""
    s2 = (1.0 / vacuum_um) ** 2
    n = 1.0 + 8.34254e-5 + 2.406147e-2 / (130.0 - s2) + 1.5998e-4 / (38.9 - s2)
    return vacuum_um / n


# ---------------------------------------------------------------------- line lists
def test_line_lists_load_with_sources_in_vacuum():
    for band in ((0.928, 1.121), (1.180, 1.416), (1.473, 1.803), (1.965, 2.381)):
        lines = arc_lines(["Ar", "Kr", "Ne", "Xe"], *band)
        assert len(lines) > 40
        assert np.all(np.diff(lines.wavelength_um) >= 0)
        assert set(lines.species) == {"ArI", "KrI", "NeI", "XeI"}
        assert np.all(lines.intensity > 0)
        assert len(oh_lines(*band)) > 300
    ar = arc_lines("Ar", 0.9, 2.5)
    assert "NIST Atomic Spectra Database" in ar.source and "PypeIt" in ar.source
    assert "Rousselot" in oh_lines(2.0, 2.1).source and "A&A 354, 1134" in oh_lines(2.0, 2.1).source
    # Ar I 9122.9674 A (air, NIST): the file carries its vacuum wavelength
    near = ar.wavelength_um[np.argmin(np.abs(ar.wavelength_um - 0.91255))]
    assert abs(_air(near) - 0.91229674) < 2e-7
    # lamp subsets and the LAMPS string form
    assert len(arc_lines("Ar,Ne", 2.0, 2.4)) == len(arc_lines(["Ar"], 2.0, 2.4)) + len(
        arc_lines(["Ne"], 2.0, 2.4))
    assert len(arc_lines(["Kr"], 2.0, 2.4).between(2.1, 2.2)) <= len(arc_lines(["Kr"], 2.0, 2.4))
    with pytest.raises(ValueError, match="unknown arc lamp"):
        arc_lines(["Hg"], 2.0, 2.4)


# ---------------------------------------------------------------------- ideal mode
@pytest.mark.parametrize("mode", ["LENSLET", "SLICER"])
def test_ideal_mode_is_the_old_model(mode):
    size = 128
    factory = FrameFactory(size=size, seed=2, optics="ideal")
    trace = build_trace(mode, size, "Kbb", SCALE[mode], 2)
    design = nominal_design(mode, size, "Kbb", SCALE[mode])
    assert np.array_equal(trace.trace_x, design.trace_x.astype(np.float32))
    assert np.array_equal(trace.trace_y, design.trace_y.astype(np.float32))
    spec = FrameSpec("IFS", OBS[(mode, "science")], 1, CAL_START + dt.timedelta(hours=5),
                     filter="Kbb", nreads=3)
    image, info = factory.illumination(spec)
    expected = project_cube(trace, build_scene(trace, 2).cube("science"), (size, size))
    assert np.array_equal(image, expected)
    assert info["flexure"] == {"dx_px": 0.0, "dy_px": 0.0, "rot_deg": 0.0,
                               "rotation_centre_xy_px": [63.5, 63.5]}
    truth = factory.ifs_truth(mode, SCALE[mode], "Kbb")
    assert truth.optics == "ideal" and np.array_equal(truth.trace_y, trace.trace_y)


# ---------------------------------------------------------------------- as-built geometry
@pytest.mark.parametrize("mode", ["LENSLET", "SLICER"])
def test_as_built_departs_from_the_design_smoothly(mode):
    optics = build_as_built_ifs(mode, 256, "Kbb", SCALE[mode], 0)
    design = optics.design
    dx = optics.trace_x - design.trace_x
    dy = optics.trace_y - design.trace_y
    assert 0.2 < np.abs(dx).max() < 2.0 and 0.2 < np.abs(dy).max() < 5.0
    # the dispersion is not linear: a straight line through y(k) leaves a residual
    k = np.arange(design.trace_y.shape[-1], dtype=np.float64)
    resid = []
    for j, i in ((0, 0), (design.trace_y.shape[0] // 2, design.trace_y.shape[1] // 2)):
        fit = np.polyval(np.polyfit(k, optics.trace_y[j, i], 1), k)
        resid.append(np.ptp(optics.trace_y[j, i] - fit))
    assert min(resid) > (0.3 if mode == "LENSLET" else 1.5)
    assert np.all(np.diff(optics.trace_y, axis=-1) > 0.5)
    if mode == "SLICER":
        # spaxels of one slice stay about one column apart (pitch 0.99-1.01)
        step = np.diff(optics.trace_x[..., k.size // 2], axis=1)
        assert np.all(np.abs(step - 1.0) < 0.02)
        assert np.std(optics.perturbation["slice_dx_px"]) > 0.1
    # PSF core grows with wavelength and varies across the field
    truth = FrameFactory(size=256, seed=0).ifs_truth(mode, SCALE[mode], "Kbb")
    psf = optics.psf
    at = (100.0, 120.0)
    assert psf.sigma_y(2.3, *at) / psf.sigma_y(2.0, *at) == pytest.approx(2.3 / 2.0, rel=1e-9)
    ratio = truth.psf_sigma_y[..., -1] / truth.psf_sigma_y[..., 0]
    lam_ratio = truth.lsf_wave[-1] / truth.lsf_wave[0]
    # (the field term can add up to 1.1 / 0.9 along a slicer spectrum that spans the detector)
    assert np.all(ratio > lam_ratio * 0.9 / 1.1 - 1e-9) and np.all(ratio < lam_ratio * 1.1 / 0.9)
    field = truth.psf_sigma_x / truth.lsf_wave  # the wavelength term taken out
    assert 0.04 < np.ptp(field) / np.mean(field) < 0.25
    assert truth.halo_fraction > 0.04 and truth.halo_sigma_px >= 3.0


# ---------------------------------------------------------------------- rendering
@pytest.mark.parametrize("mode", ["LENSLET", "SLICER"])
@pytest.mark.parametrize("kind", ["flat", "arc", "science", "sky"])
def test_render_conserves_flux(mode, kind):
    optics = build_as_built_ifs(mode, 128, "Kbb", SCALE[mode], 1)
    scene = build_realistic_scene(optics, 1)
    expected = float((scene.cube(kind) * optics.throughput[None]).sum())
    image = render(_no_halo(optics), scene.components(kind), (128, 128),
                   Flexure(0.3, -0.2, 0.01))
    assert image.sum() == pytest.approx(expected, rel=2e-5)
    with_halo = render(optics, scene.components(kind), (128, 128))
    # the halo only loses what it spreads beyond the detector edge
    assert expected * 0.995 < with_halo.sum() <= expected * (1 + 2e-5)


def _line_image(optics, j, i, wave_um, flexure=None):
    spatial = np.zeros(optics.throughput.shape)
    spatial[j, i] = 1.0
    comp = SpectralComponent(spatial, line_um=np.array([wave_um]), line_flux=np.array([1000.0]),
                             line_sigma_um=np.zeros(1))
    return render(optics, [comp], (optics.design.size,) * 2, flexure).astype(np.float64)


def _centroid(image, x, y, hx=3, hy=5):
    xi, yi = int(round(x)), int(round(y))
    cut = image[yi - hy:yi + hy + 1, xi - hx:xi + hx + 1]
    ys, xs = np.mgrid[yi - hy:yi + hy + 1, xi - hx:xi + hx + 1]
    total = cut.sum()
    cx, cy = (cut * xs).sum() / total, (cut * ys).sum() / total
    var_y = (cut * (ys - cy) ** 2).sum() / total
    return cx, cy, var_y


@pytest.mark.parametrize("mode", ["LENSLET", "SLICER"])
def test_an_arc_line_lands_where_the_truth_says(mode):
    size = 256
    factory = FrameFactory(size=size, seed=5)
    optics = _no_halo(factory.as_built(mode, SCALE[mode], "Kbb"))
    truth = factory.ifs_truth(mode, SCALE[mode], "Kbb")
    ny_s, nx_s, nw = truth.trace_y.shape
    misses = []
    for j, i, frac in ((ny_s // 2, nx_s // 2, 0.31), (0, 1, 0.77), (ny_s - 1, nx_s - 2, 0.12)):
        wave = truth.wavelength[0] + frac * (truth.wavelength[-1] - truth.wavelength[0])
        x_true = np.interp(wave, truth.wavelength, truth.trace_x[j, i])
        y_true = np.interp(wave, truth.wavelength, truth.trace_y[j, i])
        cx, cy, var_y = _centroid(_line_image(optics, j, i, wave), x_true, y_true)
        assert abs(cx - x_true) < 0.01 and abs(cy - y_true) < 0.01
        # the line's width along y is the LSF core of the truth (plus pixel integration)
        k = np.interp(wave, truth.lsf_wave, np.arange(truth.lsf_wave.size))
        sig = np.interp(k, np.arange(truth.lsf_wave.size), truth.psf_sigma_y[j, i])
        assert np.sqrt(var_y - 1.0 / 12.0) == pytest.approx(sig, rel=0.02)
        # and in micron: the truth's LSF sigma is that width times the local dispersion
        dldy = np.interp(wave, truth.wavelength, truth.dispersion_um_per_row[j, i])
        lsf = np.interp(wave, truth.lsf_wave, truth.lsf_sigma_um[j, i])
        assert lsf == pytest.approx(sig * dldy, rel=0.01)
        # the design would have put it elsewhere: the pipeline has something to measure
        y_design = np.interp(wave, truth.wavelength, nominal_design(mode, size, "Kbb").trace_y[j, i])
        misses.append(abs(y_design - y_true))
    assert max(misses) > 0.2


def test_arc_frames_carry_the_lamp_lines_and_header():
    factory = FrameFactory(size=128, seed=3)
    spec = FrameSpec("IFS", "SLI-IDP", 1, CAL_START + dt.timedelta(minutes=30), filter="Kbb",
                     nreads=3, lamps="Xe,Ar")
    assert spec.lamps == "Ar,Xe"
    model, truth = factory.make(spec, noise=False, cosmic_rays=False)
    assert model.meta.instrument.lamps == "Ar,Xe" and truth["lamps"] == "Ar,Xe"
    assert set(truth["flexure"]) >= {"dx_px", "dy_px", "rot_deg"}
    flat = FrameSpec("IFS", "LEN-SPX", 1, CAL_START, filter="Kbb", nreads=3)
    sci = FrameSpec("IFS", "LEN-SCI", 1, CAL_START + dt.timedelta(hours=5), filter="Kbb", nreads=3)
    assert flat.lamps == "CONT" and sci.lamps == "OFF"
    with pytest.raises(ValueError, match="arc lamps"):
        FrameSpec("IFS", "SLI-IDP", 1, CAL_START, filter="Kbb", lamps="Hg")
    # an Ar-only arc has only the Ar lines: rows of a central slicer spaxel peak at them
    optics = factory.as_built("SLICER", "25", "Kbb")
    scene = factory.ifs_scene("SLICER", "25", "Kbb")
    comps = scene.components("arc", lamps="Ar")
    assert set(arc_lines("Ar", *scene.spectra.band_edges).species) == {"ArI"}
    assert comps[0].line_um.size == len(arc_lines("Ar", *scene.spectra.band_edges))
    sky = scene.components("sky")
    assert sum(c.line_um.size for c in sky) > 50  # Rousselot OH lines, not a fake comb
    assert optics.design.mode == "SLICER"


# ---------------------------------------------------------------------- flexure
def test_flexure_is_recorded_and_applied():
    size = 128
    factory = FrameFactory(size=size, seed=4, flexure_rms=0.2, flexure_drift=0.06)
    early = FrameSpec("IFS", "LEN-SPX", 1, CAL_START + dt.timedelta(minutes=10), filter="Kbb",
                      nreads=3)
    late = FrameSpec("IFS", "LEN-SCI", 1, CAL_START + dt.timedelta(hours=9), filter="Kbb",
                     nreads=3)
    f0, f1 = factory.frame_flexure(early), factory.frame_flexure(late)
    assert f0 != f1 and max(abs(f1.dx_px - f0.dx_px), abs(f1.dy_px - f0.dy_px)) > 0.1
    # the truth JSON records it, and the image is the as-built rendered with that flexure
    image0, info0 = factory.illumination(early)
    assert info0["flexure"]["dx_px"] == pytest.approx(f0.dx_px, abs=1e-6)
    scene = factory.ifs_scene("LENSLET", "4", "Kbb")
    optics = factory.as_built("LENSLET", "4", "Kbb")
    level = info0["lamp_level"]
    again = render(optics, scene.components("flat", lamp_level=level), (size, size), f0)
    assert np.allclose(image0, again, rtol=1e-6, atol=1e-6 * float(again.max()))
    # a flat moved by f1 instead of f0: the spectra's x centroids move by the truth's offset
    # (one lenslet lit at a time, so that a wide centroid window sees no neighbour)
    ny_s, nx_s, nw = optics.trace_x.shape
    flat = scene.components("flat")[0]
    moved, expected = [], []
    for j, i in ((0, 1), (ny_s // 2, nx_s // 2), (ny_s - 1, nx_s - 2)):
        lit = np.zeros((ny_s, nx_s))
        lit[j, i] = 1.0
        one = dataclasses.replace(flat, spatial=lit)
        base = render(_no_halo(optics), [one], (size, size), f0)
        shifted = render(_no_halo(optics), [one], (size, size), f1)
        # where each flexed spectrum crosses one detector row (the spectra are tilted, so a
        # shift in y moves them in x too)
        xs0, ys0 = f0.apply(optics.trace_x[j, i], optics.trace_y[j, i], size)
        xs1, ys1 = f1.apply(optics.trace_x[j, i], optics.trace_y[j, i], size)
        row = int(round(float(ys0[nw // 2])))
        xa, xb = np.interp(row, ys0, xs0), np.interp(row, ys1, xs1)
        cols = np.arange(int(round(float(xa))) - 8, int(round(float(xa))) + 9)
        ca = (base[row, cols] * cols).sum() / base[row, cols].sum()
        cb = (shifted[row, cols] * cols).sum() / shifted[row, cols].sum()
        assert ca == pytest.approx(xa, abs=0.01) and cb == pytest.approx(xb, abs=0.01)
        moved.append(cb - ca)
        expected.append(float(xb - xa))
    assert np.allclose(moved, expected, atol=0.01) and np.mean(np.abs(expected)) > 0.1
    # an arc line moves along y by the truth's dy
    truth = factory.ifs_truth("LENSLET", "4", "Kbb")
    j, i = ny_s // 2, nx_s // 2
    wave = truth.wavelength[nw // 2]
    ya = _centroid(_line_image(_no_halo(optics), j, i, wave, f0), *f0.apply(
        np.interp(wave, truth.wavelength, truth.trace_x[j, i]),
        np.interp(wave, truth.wavelength, truth.trace_y[j, i]), size))[1]
    yb = _centroid(_line_image(_no_halo(optics), j, i, wave, f1), *f1.apply(
        np.interp(wave, truth.wavelength, truth.trace_x[j, i]),
        np.interp(wave, truth.wavelength, truth.trace_y[j, i]), size))[1]
    x_t = np.interp(wave, truth.wavelength, truth.trace_x[j, i])
    y_t = np.interp(wave, truth.wavelength, truth.trace_y[j, i])
    dy_true = float(f1.apply(np.array(x_t), np.array(y_t), size)[1]
                    - f0.apply(np.array(x_t), np.array(y_t), size)[1])
    assert yb - ya == pytest.approx(dy_true, abs=0.01)


def test_flexure_settings_and_switch():
    spec = FrameSpec("IFS", "LEN-SCI", 2, CAL_START + dt.timedelta(hours=6), filter="Kbb", nreads=3)
    assert FrameFactory(size=64, flexure=False).frame_flexure(spec).is_zero
    assert FrameFactory(size=64, optics="ideal").frame_flexure(spec).is_zero
    calm = flexure_at(0, "2026-12-07", 6.0, rms_px=0.0, drift_px_per_hour=0.0, jumps_per_night=0.0)
    assert abs(calm.dx_px) < 0.05 and abs(calm.dy_px) < 0.05  # the 0.01 px jitter only
    with pytest.raises(ValueError, match="optics"):
        FrameFactory(optics="perfect")
    with pytest.raises(ValueError, match="flexure_rms"):
        FrameFactory(flexure_rms=-1.0)


def test_exposure_before_the_nights_clock_starts():
    # "iris-drs simulate frame" without --night starts the exposure now, which is before the
    # night's afternoon calibrations for part of every day: its flexure must still be drawn.
    early = CAL_START - dt.timedelta(hours=3)
    spec = FrameSpec("IFS", "LEN-SCI", 1, early, filter="Kbb", nreads=3)
    flexure = FrameFactory(size=64, seed=3).frame_flexure(spec)
    assert flexure == FrameFactory(size=64, seed=3).frame_flexure(spec)
    assert flexure != flexure_at(3, spec.night, 3.0, exposure_key="LEN-SCI-1")


def test_deterministic_from_the_seed():
    spec = FrameSpec("IFS", "SLI-SCI", 1, CAL_START + dt.timedelta(hours=4), filter="Kbb", nreads=3)
    a, ia = FrameFactory(size=96, seed=9).illumination(spec)
    b, ib = FrameFactory(size=96, seed=9).illumination(spec)
    c, ic = FrameFactory(size=96, seed=10).illumination(spec)
    assert np.array_equal(a, b) and ia["flexure"] == ib["flexure"]
    assert not np.array_equal(a, c) and ia["flexure"] != ic["flexure"]


def test_truth_files_hold_the_instrument(tmp_path):
    from astropy.io import fits

    from iris_tasks.simulate.night import write_ifs_truth

    factory = FrameFactory(size=96, seed=1)
    scene = factory.ifs_scene("SLICER", "25", "Kbb")
    paths = write_ifs_truth(scene, tmp_path, factory.ifs_truth("SLICER", "25", "Kbb"))
    with fits.open(paths["maps"]) as hdul:
        for name in ("TRACE_X", "TRACE_Y", "DLDY", "LSF_WAVE", "PSF_SIGX", "PSF_SIGY", "LSF_SIG"):
            assert name in hdul
        assert hdul[0].header["OPTICS"] == "realistic" and hdul[0].header["HALOFRAC"] > 0


# ---------------------------------------------------------------------- isolation
def test_simulator_imports_no_reduction_code():
    """The simulator may use datamodels, metadata and instrument, nothing of the reduction."""
    root = Path(__file__).resolve().parents[1] / "iris_tasks"
    allowed = {"datamodels", "metadata", "instrument", "simulate"}
    for path in sorted((root / "simulate").glob("*.py")):
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.ImportFrom):
                if node.level == 1:
                    continue  # iris_tasks.simulate itself
                if node.level >= 2:
                    first = (node.module or "").split(".")[0]
                    names = [first] if first else [a.name for a in node.names]
                elif (node.module or "").startswith("iris_tasks"):
                    names = [(node.module.split(".") + [""])[1]]
                else:
                    continue
                assert set(names) <= allowed, (path.name, node.module, names)
            elif isinstance(node, ast.Import):
                for alias in node.names:
                    if alias.name.startswith("iris_tasks."):
                        assert alias.name.split(".")[1] in allowed, (path.name, alias.name)


# ---------------------------------------------------------------------- night and CLI
def test_realistic_night_writes_truth_and_no_truth_trace(tmp_path):
    import json

    from iris_tasks.simulate import NightPlan, simulate_night

    plan = NightPlan(n_dark=1, n_flat=1, n_sky=1, n_science=1, n_telluric=0, n_arc=1,
                     ifs_modes=(("SLICER", "25"),), arc_lamps=("Ar,Kr,Ne,Xe",))
    manifest = simulate_night(tmp_path, size=64, nreads=2, detectors=["IFS"], seed=3,
                              night="2026-12-07", plan=plan, flexure={"flexure_drift": 0.1})
    assert manifest["ifs_optics"] == "realistic"
    assert not [r for r in manifest["references"] if r["reftype"] == "ifstrace"]
    offsets = {}
    for entry in manifest["files"]:
        truth = json.loads((tmp_path / entry["truth"]["frame"]).read_text())
        if entry["kind"] == "dark":
            continue
        offsets[entry["obsname"]] = truth["flexure"]
        assert truth["lamps"] == {"flat": "CONT", "engineering": "Ar,Kr,Ne,Xe"}.get(
            entry["kind"], "OFF")
    # the science frame, hours after the afternoon flat, has moved more than the flat had
    assert offsets["SLI-SCI"] != offsets["SLI-NFF"]
    info = json.loads((tmp_path / manifest["ifs"]["SLICER"]["truth_info"]).read_text())
    assert info["optics"] == "realistic" and "distortion_cx" in info["instrument"]["parameters"]


def test_cli_frame_with_lamps_and_flexure_options(monkeypatch, tmp_path):
    import json

    from iris_tasks import cli
    from iris_tasks import datamodels as dm

    if "iris_tasks.simulate.cli" not in cli.COMMAND_MODULES:
        monkeypatch.setattr(cli, "COMMAND_MODULES", (*cli.COMMAND_MODULES, "iris_tasks.simulate.cli"))
    out = tmp_path / "arc.fits"
    assert cli.main(["simulate", "frame", "--obsname", "LEN-IDP", "--detector", "IFS", "--out",
                     str(out), "--size", "64", "--reads", "2", "--lamps", "Ne,Ar",
                     "--night", "2026-12-07", "--flexure-rms", "0.3", "--truth",
                     str(tmp_path / "t.json")]) == 0
    with dm.open_model(out) as model:
        assert model.meta.instrument.lamps == "Ar,Ne"
    truth = json.loads((tmp_path / "t.json").read_text())
    assert truth["scene"]["ifs_optics"] == "realistic" and truth["flexure"]["dx_px"] != 0.0
    assert cli.main(["simulate", "frame", "--obsname", "LEN-SCI", "--detector", "IFS", "--out",
                     str(tmp_path / "sci.fits"), "--size", "64", "--reads", "2", "--no-flexure",
                     "--night", "2026-12-07", "--truth", str(tmp_path / "s.json")]) == 0
    assert json.loads((tmp_path / "s.json").read_text())["flexure"]["dx_px"] == 0.0
