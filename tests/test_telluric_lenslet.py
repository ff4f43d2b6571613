"""Telluric correction and flux calibration with the 4 mas lenslet IFS (the issue's 3 %).

At 1024 px the lenslet field is 128 x 4 spaxels (16 mas tall): a standard's PSF (16 mas FWHM,
4 spaxels) does not fit and the telluric tests use the slicer. At 2048 px the field is
128 x 9 spaxels (36 mas), which holds the core of the standard and of the science source, but
not the builder's default aperture (0.1 arcsec = 25 spaxels of radius), which the builder
refuses (more than 10 % of its area beyond the field). With an aperture of 0.016 arcsec
(4 spaxels, the radius the science is scored with) the response carries the same aperture
loss as the science's aperture spectrum, so point-source fluxes measured in that aperture are
right; a surface brightness (an extended source) would be too bright by the light the
standard's aperture misses (the simulated PSF: a Gaussian of 16 mas FWHM, 94 % inside 4
spaxels). This is against the project's own simulator (its atmosphere is the published
Maunakea transmission curve; its optics the simulator's as-built lenslet IFS).

The pipeline learns everything as in tests/test_telluric.py: the instrument model and IFS
pixel flat from lamp flats and arcs (build_ifs_model, build_master_ifs_flat), the standard's
cube through iris_ifs2, the response from it (build_telluric), the science through iris_ifs2
and the telluric step; the simulator's truth only scores.
"""

from __future__ import annotations

import json

import numpy as np
import pytest
from telluric_night import _spec, _steps, learn_instrument, score_source, write_rate

from iris_tasks.ifs import Ifs2Pipeline
from iris_tasks.ifs.telluric_step import TelluricStep
from iris_tasks.masters import MasterBuildError
from iris_tasks.masters.telluric import build_telluric, save_telluric
from iris_tasks.simulate.atmosphere import Atmosphere, TelluricStandard
from iris_tasks.simulate.frames import FrameFactory

pytestmark = pytest.mark.slow  # ~2 min at 2048 px (7 lamp frames, the model, three cubes)

SIZE = 2048  # the smallest detector whose 4 mas lenslet field (9 spaxel rows) holds a PSF
SEED = 11
PWV = 2.0
TEL_AIRMASS, SCI_AIRMASS = 1.30, 1.20
APERTURE = 0.016  # arcsec: 4 spaxels of 4 mas
SCALE = "4"


@pytest.fixture(scope="module")
def lenslet(tmp_path_factory):
    """Instrument model and IFS flat from 3 lamp flats and 4 arcs (with noise); a Ks = 14 A0V
    standard at airmass 1.3 and a science + sky pair at 1.2 half an hour later, 10 x 30 s,
    noiseless (the systematic error alone)."""
    root = tmp_path_factory.mktemp("lenslet")
    factory = FrameFactory(size=SIZE, seed=SEED,
                           detector_overrides={"onef_rms": 0.0, "cr_rate": 0.0},
                           atmosphere=Atmosphere(pwv_mm=PWV, standard=TelluricStandard(mag=14.0)))
    rng = np.random.default_rng(SEED)
    trace, flat = learn_instrument(factory, root, rng, flat_obsname="LEN-SPX",
                                   arc_obsname="LEN-IDP", ifsscale=SCALE)
    rates, infos = {}, {}
    for key, obsname, hour, airmass in (("TEL", "LEN-TEL", 7.5, TEL_AIRMASS),
                                        ("SKY", "LEN-SKY", 7.9, SCI_AIRMASS),
                                        ("SCI", "LEN-SCI", 8.0, SCI_AIRMASS)):
        spec = _spec(obsname, 1, hour, airmass=airmass, read_time=30.0, ifsscale=SCALE)
        rates[key] = root / f"{spec.filename[:-5]}_rate.fits"
        infos[key] = write_rate(factory, spec, rates[key], rng, noise=False)
    steps = _steps(trace, flat, skip=True)
    tel_cube = root / "tel_s3d.fits"
    Ifs2Pipeline.call(str(rates["TEL"]), steps=steps).save(str(tel_cube))
    science = Ifs2Pipeline.call(str(rates["SCI"]), sky_files=[str(rates["SKY"])], steps=steps)
    yield {"root": root, "factory": factory, "infos": infos, "tel_cube": tel_cube,
           "science": science}
    science.close()


def test_lenslet_field_holds_the_psf_but_not_the_default_aperture(lenslet, caplog):
    """The 2048 px lenslet cube is 9 spaxel rows: a 0.1 arcsec aperture asked for is refused
    (the response would miss the light the field cuts off); without one the builder takes the
    largest the field holds around the star (the nightly build's case) and says so; a
    0.016 arcsec one fits."""
    cube_shape = lenslet["factory"].ifs_scene("LENSLET", "4", "Kbb").trace.cube_shape
    assert cube_shape[1:] == (9, 128)
    with pytest.raises(MasterBuildError, match="field"):
        build_telluric(lenslet["tel_cube"], aperture_arcsec=0.1)
    with caplog.at_level("WARNING", logger="iris_tasks.masters.telluric"):
        fitted = build_telluric(lenslet["tel_cube"])
    assert "cannot hold the 0.10 arcsec aperture" in caplog.text
    assert 4.0 < fitted.qa["radius"] < 5.7 and fitted.model.meta.aperture_radius == pytest.approx(
        fitted.qa["radius"], abs=1e-3)
    assert fitted.qa["snr"] > 100
    master = build_telluric(lenslet["tel_cube"], aperture_arcsec=APERTURE)
    qa = master.qa
    print("lenslet telluric QA", json.dumps({k: round(float(v), 4) for k, v in qa.items()}))
    tx, ty = lenslet["infos"]["TEL"]["telluric_xy_spaxels"]
    assert abs(qa["star_x"] - tx) < 0.3 and abs(qa["star_y"] - ty) < 0.3
    assert qa["radius"] == pytest.approx(4.0)
    assert qa["snr"] > 100 and qa["line_residual"] < 0.02


def test_lenslet_science_in_physical_units_matches_the_true_spectrum(lenslet):
    """The issue's criterion with the lenslet: continuum bins with S/N > 20 within 3 % of the
    source's true spectrum (erg/s/cm^2/A), inside the telluric bands too (T 0.3-0.9), the
    standard rescaled from airmass 1.3 to the science's 1.2 (TELMETH=SCALED).

    Measured 2026-12-08 (2048 px, noiseless frames, aperture 4 spaxels for both): 178 of 193
    bins scored, all within 3 % (max 1.4 %), median ratio 0.996; 39 bins in telluric bands, all
    within 3 %."""
    master = build_telluric(lenslet["tel_cube"], aperture_arcsec=APERTURE)
    ref = save_telluric(master, lenslet["root"] / "tref")
    cube = TelluricStep.call(lenslet["science"].copy(), telluric_files=[str(ref)])
    assert cube.meta.cal_step.telluric == "COMPLETE" and cube.meta.telluric.method == "SCALED"
    assert cube.meta.telluric.airmass_exponent == pytest.approx(SCI_AIRMASS / TEL_AIRMASS)
    assert cube.meta.photometry.pixel_area_arcsec2 == pytest.approx(0.004**2)
    report = score_source(cube, expect_xy=lenslet["infos"]["SCI"]["source_xy_spaxels"],
                          tolerance=0.5, radius=APERTURE / 0.004, airmass=SCI_AIRMASS, pwv_mm=PWV)
    print("lenslet science vs truth", json.dumps(report))
    assert report["bins"] > 0.8 * report["of"] and report["band_bins"] > 20, report
    assert abs(report["median_ratio"] - 1) < 0.01, report
    assert report["within_3pc"] >= 0.98, report
    assert report["band_within_3pc"] >= 0.95, report
    assert report["max_abs_err"] < 0.05, report
