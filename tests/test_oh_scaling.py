"""Scaled OH sky subtraction (cube_sky_sub scale_oh; iris_tasks.ifs.oh_scaling) on the realistic
slicer: the OH airglow varies between a sky frame and the science frame six minutes later
(groups of lines by tens of per cent, iris_tasks.simulate.atmosphere.Atmosphere.oh_variation);
the instrument model and pixel flat come from tests/test_telluric.py's night (the project's
builders); scored on sky spaxels the fit did not use."""

from __future__ import annotations

import json

import numpy as np
import pytest
from telluric_night import SCI_AIRMASS, SEED, SIZE, _spec, _steps, write_rate

from iris_tasks.ifs import Ifs2Pipeline
from iris_tasks.ifs.cube import outer_spaxels
from iris_tasks.ifs.oh_scaling import line_windows
from iris_tasks.ifs.sky_step import CubeSkySubStep
from iris_tasks.instrument.lines import oh_lines
from iris_tasks.simulate.atmosphere import Atmosphere, TelluricStandard
from iris_tasks.simulate.frames import FrameFactory

pytestmark = [pytest.mark.slow, pytest.mark.xdist_group("telluric")]


def test_scaled_oh_subtraction_cuts_the_residuals_3x(night, tmp_path):
    rng = np.random.default_rng(7)
    rates, infos = {}, {}
    for variation in (0.3, 0.0):  # a varying airglow, and a constant one for the floor
        factory = FrameFactory(size=SIZE, seed=SEED,
                               detector_overrides={"onef_rms": 0.0, "cr_rate": 0.0},
                               atmosphere=Atmosphere(pwv_mm=2.0, oh_variation=variation,
                                                     standard=TelluricStandard(mag=14.0)))
        for key, obsname, hour in (("SKY", "SLI-SKY", 7.9), ("SCI", "SLI-SCI", 8.0)):
            spec = _spec(obsname, 3, hour, airmass=SCI_AIRMASS, read_time=30.0)
            rates[key, variation] = tmp_path / f"{spec.filename[:-5]}_{variation}_rate.fits"
            infos[key, variation] = write_rate(factory, spec, rates[key, variation], rng,
                                               noise=False)
    print("OH factors", json.dumps({k: v["oh_factors"] for (k, var), v in infos.items() if var}))
    # each frame extracted once (iris_ifs2 without sky_sub and telluric), then sky_sub as
    # iris_ifs2 runs it, with and without the OH scaling
    steps = _steps(night["trace"], night["flat"], skip=True)
    steps["sky_sub"] = {"skip": True}
    extracted = {key: Ifs2Pipeline.call(str(path), steps=steps) for key, path in rates.items()}
    cubes = {(variation, scale): CubeSkySubStep.call(extracted["SCI", variation].copy(),
                                                     [extracted["SKY", variation]],
                                                     scale_oh=scale)
             for variation, scale in ((0.3, False), (0.3, True), (0.0, False))}
    infos = {k: v for (k, var), v in infos.items() if var}
    cube = cubes[0.3, True]
    wave = np.asarray(cube.wavelength)
    ny, nx = cube.data.shape[1:]
    # score on sky spaxels the fit did not use: between radius 0.35 and 0.7, away from the source
    ring = outer_spaxels(ny, nx, 0.35) & ~outer_spaxels(ny, nx, 0.7)
    sx, sy = infos["SCI"]["source_xy_spaxels"]
    jj, ii = np.mgrid[0:ny, 0:nx]
    ring &= np.hypot(ii - sx, jj - sy) > 4
    lines = oh_lines(float(wave[0]), float(wave[-1]))
    keep = lines.intensity >= 0.01 * lines.intensity.max()
    in_win = np.zeros(wave.size, bool)
    for a, b in line_windows(wave, lines.wavelength_um[keep], 3):
        in_win[a:b] = True
    rms = {}
    for key, c in cubes.items():
        spectra = np.where(np.isfinite(c.data), c.data, 0.0)[:, ring]
        rms[key] = float(np.sqrt(np.mean(spectra[in_win] ** 2)))
    floor = rms[0.0, False]  # constant airglow: what sky frames leave anyway (flexure, noise-free)
    excess_unscaled = np.sqrt(max(rms[0.3, False] ** 2 - floor**2, 0.0))
    excess_scaled = np.sqrt(max(rms[0.3, True] ** 2 - floor**2, 0.0))
    report = {"rms_unscaled": rms[0.3, False], "rms_scaled": rms[0.3, True],
              "rms_constant_sky": floor, "excess_unscaled": excess_unscaled,
              "excess_scaled": excess_scaled, "spaxels": int(ring.sum()),
              "windows": cube.meta.oh_scaling.windows,
              "OHRESB": cube.meta.oh_scaling.residual_before,
              "OHRESA": cube.meta.oh_scaling.residual_after}
    print("OH residuals", json.dumps(report))
    assert cube.meta.oh_scaling.windows > 20
    # the residual the varying airglow adds is cut at least 3x (measured 2026-12-07: all of it,
    # down to the constant-sky floor; the raw rms 0.068 -> 0.026 with a floor of 0.027)
    assert excess_scaled <= excess_unscaled / 3, report
    assert rms[0.3, True] < rms[0.3, False] / 2, report
    # on the spaxels the fit used, 60x
    assert report["OHRESA"] < report["OHRESB"] / 10, report
    assert cubes[0.3, False].meta.oh_scaling.windows is None  # off by default
