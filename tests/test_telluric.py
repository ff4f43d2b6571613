"""Telluric correction and flux calibration of IFS cubes, end to end on the realistic simulator.

The simulator's atmosphere (the published Maunakea transmission rescaled to each frame's own
airmass, iris_tasks.simulate.atmosphere) dims an A0V standard of known magnitude and a science
source whose spectrum is defined in erg/s/cm^2/A. The pipeline learns everything itself: the
instrument model from lamp flats and arcs (build_ifs_model), the standard's cube through
iris_ifs2, the response from that cube (build_telluric), and the science cube through iris_ifs2
with the telluric step. The simulator's truth only scores the result.

Rate images come from the simulator's illumination (as tests/test_ifs_model.py does: the
detector's QE flat, Poisson + read noise at the ramp-fit level; pixels past full well flagged
SATURATED like a ramp fit whose first group saturated).
"""

from __future__ import annotations

import json
import logging
from pathlib import Path

import numpy as np
import pytest
from telluric_night import (
    FILTER,
    NIGHT,
    SCALE,
    SCI_AIRMASS,
    TEL_AIRMASS,
    _spec,
    _steps,
    write_rate,
)

from iris_tasks.datamodels import CubeModel, TelluricModel
from iris_tasks.ifs import Ifs2Pipeline
from iris_tasks.ifs.telluric import extract_star, find_star, hydrogen_mask
from iris_tasks.ifs.telluric_step import TelluricStep
from iris_tasks.masters import MasterBuildError
from iris_tasks.masters.telluric import build_telluric
from iris_tasks.simulate.atmosphere import (
    PhysicalSource,
    TelluricStandard,
    transmission,
)

pytestmark = [pytest.mark.slow, pytest.mark.xdist_group("telluric")]


def _source_truth(wave: np.ndarray) -> np.ndarray:
    """The science source's continuum above the atmosphere, erg/s/cm^2/A (total)."""
    return PhysicalSource().continuum(wave)


def test_reference_from_the_standard_cube(night):
    run = night["noisy"]
    ref = TelluricModel(str(run["telluric"]))
    meta = ref.meta
    assert meta.reftype == "TELLURIC"
    assert (meta.instrument.detector, meta.instrument.ifsmode, meta.instrument.ifsscale,
            meta.instrument.filter) == ("IFS", "SLICER", SCALE, FILTER)
    assert meta.telluric.airmass == pytest.approx(TEL_AIRMASS)
    assert meta.useafter.startswith(f"{NIGHT}T07:30:00")
    assert (meta.standard.sptype, meta.standard.mag, meta.standard.band) == ("A0V", 14.0, "Ks")
    qa = run["master"].qa
    print("telluric QA", json.dumps({k: round(float(v), 4) for k, v in qa.items()}))
    # the star is found where the simulator put it
    tx, ty = run["infos"]["TEL"]["telluric_xy_spaxels"]
    assert abs(qa["star_x"] - tx) < 0.3 and abs(qa["star_y"] - ty) < 0.3
    assert meta.response_snr > 100
    assert meta.line_residual < 0.02  # Br-gamma's wings left outside its window
    assert 0 < meta.masked_fraction < 0.2
    # the response is atmosphere x instrument: it follows the true transmission
    wave = np.asarray(ref.wavelength)
    t = transmission(wave, TEL_AIRMASS, 2.0)
    good = np.isfinite(ref.data) & ~hydrogen_mask(wave)
    corr = np.corrcoef(np.asarray(ref.data)[good], t[good])[0, 1]
    assert corr > 0.8, corr


@pytest.fixture(scope="module")
def sky_subtracted(night):
    """The science cube of ``which`` run ("noisy"/"noiseless") reduced by iris_ifs2 up to
    sky_sub, once per module (an extraction costs ~30 s at 1024 px): telluric is iris_ifs2's
    last step, so each test applies it, with its own options, to a copy."""
    cubes: dict[str, CubeModel] = {}

    def reduce(which: str) -> CubeModel:
        if which not in cubes:
            run = night[which]
            cubes[which] = Ifs2Pipeline.call(
                str(run["rates"]["SCI"]), sky_files=[str(run["rates"]["SKY"])],
                steps=_steps(night["trace"], night["flat"], skip=True))
        return cubes[which]

    yield reduce
    for cube in cubes.values():
        cube.close()


def _reduce_science(night, sky_subtracted, which: str, **telluric) -> CubeModel:
    """The science cube as iris_ifs2 makes it, with ``telluric`` as the telluric step's options
    (default: the night's own reference)."""
    opts = {"telluric_files": [str(night[which]["telluric"])], **telluric}
    return TelluricStep.call(sky_subtracted(which).copy(), **opts)


def _score(night, which: str, cube: CubeModel) -> tuple[dict, dict]:
    """The source's aperture spectrum against its truth: (report, arrays)."""
    run = night[which]
    wave = np.asarray(cube.wavelength, np.float64)
    data, err, dq = np.asarray(cube.data), np.asarray(cube.err), np.asarray(cube.dq)
    x, y, _ = find_star(data, err, dq)
    sx, sy = run["infos"]["SCI"]["source_xy_spaxels"]
    assert abs(x - sx) < 0.3 and abs(y - sy) < 0.3
    area = cube.meta.photometry.pixel_area_arcsec2
    spec = extract_star(data, err, dq, x, y, 4.0)
    flux = spec.flux * area  # erg/s/cm^2/A over the source
    sigma = np.sqrt(spec.variance) * area
    truth = _source_truth(wave)
    ratio = flux / truth
    snr = flux / sigma
    src = PhysicalSource()
    t_sci = transmission(wave, SCI_AIRMASS, 2.0)
    line = np.abs(wave - src.line_um) < 6 * src.line_sigma_um  # the emission line: not continuum
    edge = (wave < wave[0] + 0.004) | (wave > wave[-1] - 0.004)  # the filter's hard edges
    hwin = scored_h = (snr > 20) & ~line & ~edge & np.isfinite(ratio) & hydrogen_mask(wave)
    scored = (snr > 20) & ~line & ~edge & np.isfinite(ratio) & ~hwin
    bands = scored & (t_sci > 0.3) & (t_sci < 0.9)
    err_abs = np.abs(ratio - 1)
    report = {
        "bins": int(scored.sum()), "of": int(wave.size),
        "median_ratio": round(float(np.median(ratio[scored])), 5),
        "within_3pc": round(float(np.mean(err_abs[scored] < 0.03)), 4),
        "p95_abs_err": round(float(np.percentile(err_abs[scored], 95)), 5),
        "max_abs_err": round(float(np.max(err_abs[scored])), 5),
        "band_bins": int(bands.sum()),
        "band_within_3pc": round(float(np.mean(err_abs[bands] < 0.03)), 4),
        "band_max_abs_err": round(float(np.max(err_abs[bands])), 5),
        "hline_bins": int(scored_h.sum()),
        "hline_max_abs_err": round(float(np.max(err_abs[scored_h])), 5),
        "min_transmission_scored": round(float(t_sci[scored].min()), 3),
        "median_snr": round(float(np.median(snr[scored])), 1),
        "pull_rms": round(float(np.std((ratio[scored] - 1) / (sigma[scored] / truth[scored]))), 3),
    }
    return report, {"wave": wave, "ratio": ratio, "scored": scored, "t": t_sci}


def test_science_cube_in_physical_units_matches_the_true_spectrum(night, sky_subtracted):
    """The done criterion, on noiseless frames (the systematic error alone): within 3 % in
    continuum bins with S/N > 20 across the band, inside the telluric bands too
    (transmission 30-90 %), with the standard at another airmass than the science.

    Measured 2026-12-07 (1024 px slicer, Kbb): 99 % of the bins within 3 %; the few beyond
    are single bins where the standard's own extraction is off by 3-8 % (no DQ flag: a
    compact star on one or two detector columns), and the hydrogen-line windows, where the
    response is interpolated and misses the atmosphere's structure under Br-gamma (reported
    apart, within 8 %)."""
    cube = _reduce_science(night, sky_subtracted, "noiseless")
    meta = cube.meta
    assert meta.cal_step.telluric == "COMPLETE"
    assert meta.bunit_data == "erg / (s cm2 Angstrom arcsec2)" == meta.bunit_err
    assert meta.ref_file.telluric.name == night["noiseless"]["telluric"].name
    assert meta.telluric.airmass == pytest.approx(TEL_AIRMASS)
    assert meta.telluric.airmass_exponent == pytest.approx(SCI_AIRMASS / TEL_AIRMASS)
    assert meta.telluric.hours == pytest.approx(-0.5, abs=0.01)
    assert meta.photometry.pixel_area_arcsec2 == pytest.approx(0.025**2)
    assert meta.photometry.photflam > 0 and meta.photometry.photmjsr > 0
    report, _ = _score(night, "noiseless", cube)
    print("noiseless science vs truth", json.dumps(report))
    assert report["bins"] > 0.8 * report["of"]
    assert report["band_bins"] > 50 and report["min_transmission_scored"] < 0.45
    assert abs(report["median_ratio"] - 1) < 0.01, report
    assert report["within_3pc"] >= 0.98, report
    assert report["band_within_3pc"] >= 0.97, report
    assert report["max_abs_err"] < 0.10, report
    assert report["hline_max_abs_err"] < 0.08, report
    # without the airmass rescaling the bands are worse (the standard saw more air)
    flat_x, _ = _score(night, "noiseless", _reduce_science(night, sky_subtracted, "noiseless",
                                                           scale_airmass=False))
    print("noiseless, standard's airmass as measured", json.dumps(flat_x))
    assert flat_x["band_max_abs_err"] > report["band_max_abs_err"]


def test_science_cube_errors_describe_the_noise(night, sky_subtracted):
    """With noise: unbiased, and ERR (science + response) describes the scatter to within the
    systematic error measured without noise (pull rms 0.8 there; 1.32 with noise, 2026-12-07)."""
    cube = _reduce_science(night, sky_subtracted, "noisy")
    report, _ = _score(night, "noisy", cube)
    print("noisy science vs truth", json.dumps(report))
    assert abs(report["median_ratio"] - 1) < 0.01, report
    assert 0.7 < report["pull_rms"] < 1.5, report


# -- failure cases: a clear error from the builder, and the science frame still reduces ------
def _tel_cube(night, name: str, spec_kwargs: dict, *, illumination_of: str | None = None) -> Path:
    """A telluric standard's frame written with ``spec_kwargs`` (or the illumination of
    another OBSNAME, keeping the TEL header) and reduced by iris_ifs2."""
    factory, root = night["factory"], night["root"]
    spec = _spec("SLI-TEL", 2, 7.6, airmass=TEL_AIRMASS, **spec_kwargs)
    rate = root / f"{name}_rate.fits"
    illumination = None
    if illumination_of:
        other = factory.on_sky(_spec(illumination_of, 2, 7.6, airmass=TEL_AIRMASS))
        illumination, _ = factory.illumination(other)
    info = write_rate(factory, spec, rate, night["rng"], illumination=illumination)
    cube = Ifs2Pipeline.call(str(rate), steps=_steps(night["trace"], night["flat"]))
    path = root / f"{name}_s3d.fits"
    cube.save(str(path))
    cube.close()
    night.setdefault("tel_info", {})[name] = info
    return path


def test_builder_refuses_a_standard_of_the_wrong_type_or_band(night, tmp_path):
    good = night["noisy"]["tel_cube"]
    with CubeModel(str(good)) as cube:
        cube.meta.standard.sptype = "G2V"  # a solar-type star: not a blackbody with H lines
        cube.meta.standard.teff = None
        cube.save(str(tmp_path / "wrong_type_s3d.fits"))
        cube.meta.standard.sptype = "A0V"
        cube.meta.standard.band = "J"  # its magnitude in another band than the Kbb cube
        cube.save(str(tmp_path / "wrong_band_s3d.fits"))
        cube.meta.standard.band = "Ks"
        cube.meta.observation.obsname = "SLI-SCI"
        cube.save(str(tmp_path / "not_tel_s3d.fits"))
    with pytest.raises(MasterBuildError, match=r"wrong_type_s3d.fits: STDSPTYP: .*G2V"):
        build_telluric(tmp_path / "wrong_type_s3d.fits")
    with pytest.raises(MasterBuildError, match=r"wrong_band_s3d.fits: mismatched filter: .* in J "
                                               r"but the cube is Kbb"):
        build_telluric(tmp_path / "wrong_band_s3d.fits")
    with pytest.raises(MasterBuildError, match="not_tel_s3d.fits: OBSNAME=SLI-SCI is not a "
                                               "telluric standard"):
        build_telluric(tmp_path / "not_tel_s3d.fits")


def test_builder_refuses_a_field_without_a_star(night):
    empty = _tel_cube(night, "tel_empty", {}, illumination_of="SLI-SKY")
    with pytest.raises(MasterBuildError, match=r"tel_empty_s3d.fits: no star"):
        build_telluric(empty)


def test_builder_refuses_a_saturated_star(night):
    bright = _tel_cube(night, "tel_bright", {"standard": TelluricStandard(mag=6.0)})
    assert night["tel_info"]["tel_bright"]["n_saturated"] > 100
    with pytest.raises(MasterBuildError, match=r"tel_bright_s3d.fits: .*core voxels.*: saturated "
                                               r"or on bad pixels"):
        build_telluric(bright)


def test_science_still_reduces_without_an_applicable_standard(night, sky_subtracted, tmp_path,
                                                               caplog):
    """A standard of another filter (and none from CRDS): telluric SKIPPED with a warning
    naming the configuration, the cube stays in e-/s; nothing else changes."""
    ref = TelluricModel(str(night["noisy"]["telluric"]))
    ref.meta.instrument.filter = "Hbb"
    other = tmp_path / "hbb_telluric.fits"
    ref.save(str(other))
    caplog.set_level(logging.WARNING)
    cube = _reduce_science(night, sky_subtracted, "noisy", telluric_files=[str(other)])
    assert cube.meta.cal_step.telluric == "SKIPPED"
    assert cube.meta.cal_step.sky_sub == "COMPLETE"
    assert cube.meta.bunit_data == "electron/s"
    assert "no telluric standard applies" in caplog.text and "FILTER=Hbb (cube Kbb)" in caplog.text
    assert np.isfinite(cube.data).mean() > 0.9
    # the step alone with neither files nor CRDS references: the same, in its own words
    caplog.clear()
    again = TelluricStep.call(cube)
    assert again.meta.cal_step.telluric == "SKIPPED"
    assert "no telluric standard applies" in caplog.text


def test_cube_opens_with_its_spectral_axis_and_flux_unit(night, sky_subtracted, tmp_path):
    from astropy import units as u
    from astropy.io import fits
    from astropy.wcs import WCS

    cube = _reduce_science(night, sky_subtracted, "noisy")
    path = tmp_path / "sci_s3d.fits"
    cube.save(str(path))
    with fits.open(path) as hdul:
        sci = hdul["SCI"]
        unit = u.Unit(sci.header["BUNIT"])
        assert unit.is_equivalent(u.erg / u.s / u.cm**2 / u.AA / u.arcsec**2)
        wcs = WCS(sci.header)
        assert wcs.has_spectral and wcs.spectral.wcs.ctype[0] == "WAVE"
        spectral = wcs.spectral.pixel_to_world(np.arange(3))
        assert spectral.unit.is_equivalent(u.um)
        wave = np.asarray(cube.wavelength)
        assert np.allclose(spectral.to_value(u.um), wave[:3], rtol=0, atol=1e-3 * (wave[1] - wave[0]))
        assert hdul[0].header["S_TELLUR"] == "COMPLETE" and "PHOTMJSR" in hdul[0].header
    import specutils  # a test dependency: a reader no one here wrote

    # ERR is a 1-sigma error (JWST convention); specutils 2.4 cannot infer the type from the
    # HDU name ERR (KeyError 'err' in its loader), so it is named.
    spectrum = specutils.Spectrum.read(str(path), format="wcs1d-fits", hdu="SCI",
                                       uncertainty_hdu="ERR", uncertainty_type="std")
    assert spectrum.flux.unit.is_equivalent(unit)
    assert spectrum.spectral_axis.unit.is_equivalent(u.um)
    assert spectrum.spectral_axis.size == wave.size and spectrum.flux.size == np.asarray(cube.data).size
    np.testing.assert_allclose(spectrum.spectral_axis.to_value(u.um), wave, rtol=0,
                               atol=1e-3 * (wave[1] - wave[0]))
    assert spectrum.uncertainty.unit.is_equivalent(unit)
