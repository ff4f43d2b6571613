"""Telluric correction + flux calibration in the J and H bands (tests/test_telluric.py does Kbb
with noise and the failure cases): the same chain - instrument model and IFS flat from lamp
frames, a standard's cube, build_telluric, iris_ifs2 on the science frame - on noiseless
frames, so the figures are the method's systematic error. In J, also with two standards
bracketing the science's airmass (the deep water bands)."""

from __future__ import annotations

import json

import numpy as np
import pytest
import telluric_night as base

from iris_tasks.ifs import Ifs2Pipeline
from iris_tasks.ifs.telluric import extract_star, find_star, hydrogen_mask
from iris_tasks.ifs.telluric_step import TelluricStep
from iris_tasks.masters.ifs_flat import build_master_ifs_flat
from iris_tasks.masters.ifs_model import build_ifs_model, save_ifs_model
from iris_tasks.masters.telluric import build_telluric, save_telluric
from iris_tasks.simulate.atmosphere import (
    Atmosphere,
    PhysicalSource,
    TelluricStandard,
    transmission,
)
from iris_tasks.simulate.frames import FrameFactory

pytestmark = pytest.mark.slow

# filter: (magnitude band, standard's magnitude - as bright as a 270 s frame takes unsaturated,
# the source's emission line)
BANDS = {"Jbb": ("J", 16.0, 1.2822), "Hbb": ("H", 15.0, 1.6440)}


# J only: a second standard below the science's airmass, so that the two bracket it
LOW_AIRMASS = 1.10


def _score(filt: str, cube, source, qa: dict) -> dict:
    """The source's aperture spectrum against its true continuum, per wavelength bin."""
    _, _, line_um = BANDS[filt]
    wave = np.asarray(cube.wavelength, np.float64)
    data, err, dq = np.asarray(cube.data), np.asarray(cube.err), np.asarray(cube.dq)
    x, y, _ = find_star(data, err, dq)
    spec = extract_star(data, err, dq, x, y, 4.0)
    area = cube.meta.photometry.pixel_area_arcsec2
    ratio = spec.flux * area / source.continuum(wave)
    snr = spec.flux / np.sqrt(spec.variance)
    t = transmission(wave, base.SCI_AIRMASS, 2.0)
    usable = (np.isfinite(ratio) & (snr > 20) & (np.abs(wave - line_um) > 6 * source.line_sigma_um)
              & (wave > wave[0] + 0.004) & (wave < wave[-1] - 0.004))
    hwin = hydrogen_mask(wave)
    scored, lines = usable & ~hwin, usable & hwin
    bands = scored & (t > 0.3) & (t < 0.9)
    err_abs = np.abs(ratio - 1)
    return {"filter": filt, "method": cube.meta.telluric.method,
            "bins": int(scored.sum()), "of": int(wave.size),
            "median_ratio": round(float(np.median(ratio[scored])), 5),
            "within_3pc": round(float(np.mean(err_abs[scored] < 0.03)), 4),
            "max_abs_err": round(float(err_abs[scored].max()), 4),
            "band_bins": int(bands.sum()),
            "band_within_3pc": round(float(np.mean(err_abs[bands] < 0.03)), 4) if bands.any() else None,
            "hline_bins": int(lines.sum()),
            "hline_within_3pc": round(float(np.mean(err_abs[lines] < 0.03)), 4),
            "qa": {k: round(float(v), 4) for k, v in qa.items()
                   if k in ("snr", "line_residual", "lines_fitted", "masked_fraction")}}


@pytest.mark.parametrize("filt", list(BANDS))
def test_science_spectrum_in_j_and_h(filt, tmp_path, monkeypatch):
    band, mag, line_um = BANDS[filt]
    monkeypatch.setattr(base, "FILTER", filt)
    source = PhysicalSource(line_um=line_um)
    factory = FrameFactory(size=base.SIZE, seed=base.SEED,
                           detector_overrides={"onef_rms": 0.0, "cr_rate": 0.0},
                           atmosphere=Atmosphere(pwv_mm=2.0, source=source,
                                                 standard=TelluricStandard(mag=mag, band=band)))
    rng = np.random.default_rng(base.SEED)
    flats, arcs = [], []
    for i in (1, 2, 3):
        spec = base._spec("SLI-NFF", i, 2.0 + 0.05 * i)
        flats.append(tmp_path / f"{spec.filename[:-5]}_rate.fits")
        base.write_rate(factory, spec, flats[-1], rng)
    for n, lamp in enumerate(("Ar", "Kr", "Ne", "Xe"), 1):
        spec = base._spec("SLI-IDP", n, 2.2 + 0.02 * n, lamps=lamp)
        arcs.append(tmp_path / f"{spec.filename[:-5]}_rate.fits")
        base.write_rate(factory, spec, arcs[-1], rng)
    trace = save_ifs_model(build_ifs_model(flats, arcs, subtract_dark=False), tmp_path / "refs")
    flat = tmp_path / "refs" / "ifs_flat.fits"
    build_master_ifs_flat(flats, trace=trace, subtract_dark=False).model.save(str(flat))
    frames = [("TEL", "SLI-TEL", 1, 7.5, base.TEL_AIRMASS), ("SKY", "SLI-SKY", 1, 7.9, base.SCI_AIRMASS),
              ("SCI", "SLI-SCI", 1, 8.0, base.SCI_AIRMASS)]
    if filt == "Jbb":
        frames.append(("TEL2", "SLI-TEL", 2, 8.5, LOW_AIRMASS))
    rates = {}
    for key, obsname, exp_no, hour, airmass in frames:
        spec = base._spec(obsname, exp_no, hour, airmass=airmass, read_time=30.0)
        rates[key] = tmp_path / f"{spec.filename[:-5]}_rate.fits"
        base.write_rate(factory, spec, rates[key], rng, noise=False)
    refs, masters = [], []
    for key in [k for k in ("TEL", "TEL2") if k in rates]:
        tel = tmp_path / f"{key}_s3d.fits"
        Ifs2Pipeline.call(str(rates[key]), steps=base._steps(trace, flat)).save(str(tel))
        masters.append(build_telluric(tel))
        refs.append(save_telluric(masters[-1], tmp_path / f"refs_{key}"))
    # the science cube up to sky_sub once; the telluric step (iris_ifs2's last) applied to copies
    sky_subtracted = Ifs2Pipeline.call(str(rates["SCI"]), sky_files=[str(rates["SKY"])],
                                       steps=base._steps(trace, flat, skip=True))
    cube = TelluricStep.call(sky_subtracted.copy(), telluric_files=[str(refs[0])])
    assert cube.meta.cal_step.telluric == "COMPLETE" and cube.meta.telluric.method == "SCALED"
    report = _score(filt, cube, source, masters[0].qa)
    print("noiseless science vs truth, one standard", json.dumps(report))
    # Measured 2026-12-07 - J: 96.1 % of the bins within 3 %, 92.4 % of the 198 in telluric
    # bands (down to T = 0.10: the deep water lines at 1.33-1.42 um do not rescale as a power
    # of the airmass from 1.3 to 1.2); H: 99.5 %, and 94 % in the hydrogen windows (59 % of
    # the band: the Brackett series fitted as one merged window).
    assert abs(report["median_ratio"] - 1) < 0.01, report
    assert report["within_3pc"] >= (0.93 if filt == "Jbb" else 0.98), report
    if filt != "Jbb":
        assert report["hline_within_3pc"] >= 0.90, report
        return
    assert report["band_within_3pc"] >= 0.88, report
    # J with a second standard at airmass 1.10: the two bracket the science's 1.20 and their
    # responses are interpolated per bin (TELMETH=BRACKET) - what the deep bands need
    both = TelluricStep.call(sky_subtracted.copy(), telluric_files=[str(r) for r in refs])
    assert both.meta.telluric.method == "BRACKET"
    assert both.meta.telluric.weight2 == pytest.approx(0.5)
    bracket = _score(filt, both, source, masters[0].qa)
    print("noiseless science vs truth, two standards bracketing", json.dumps(bracket))
    assert abs(bracket["median_ratio"] - 1) < 0.01, bracket
    # Measured 2026-12-07: 98.9 % of the bins within 3 % (one standard: 96.1 %), 97.0 % of
    # the 198 in telluric bands (92.4 %), worst bin 5.2 % (9.2 %)
    assert bracket["within_3pc"] >= 0.98, bracket
    assert bracket["band_within_3pc"] >= 0.96, bracket
    assert bracket["band_within_3pc"] > report["band_within_3pc"] + 0.03, (bracket, report)
    assert bracket["max_abs_err"] < 0.07, bracket
