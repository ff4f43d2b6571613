"""The simulated night the telluric tests share (tests/test_telluric.py, tests/test_oh_scaling.py):
the instrument model and IFS pixel flat learned from lamp flats and arcs, a telluric standard
reduced to a cube with its reference, and science + sky frames; built once per test session
(a pytest plugin, so that both modules get the same instance; both run in one xdist group)."""

from __future__ import annotations

import datetime as dt
from pathlib import Path
from typing import Any

import numpy as np
import pytest

# The science stack is imported where it is used: this plugin loads with every test session.

SIZE = 1024  # the slicer needs its 10 slices of a 1024 px detector to be traced (test_ifs_model)
SEED = 11
NIGHT = "2026-11-30"
FILTER = "Kbb"
SCALE = "25"
FULL_WELL_E = 1.0e5
TEL_AIRMASS, SCI_AIRMASS = 1.30, 1.20

def _spec(obsname: str, exp_no: int, hour: float, *, ifsscale: str = SCALE, **kwargs) -> Any:
    from iris_tasks.simulate.frames import FrameSpec

    start = dt.datetime.fromisoformat(f"{NIGHT}T00:00:00+00:00") + dt.timedelta(hours=hour)
    return FrameSpec(detector="IFS", obsname=obsname, exp_no=exp_no, start=start, filter=FILTER,
                     ifsscale=ifsscale, **kwargs)


def learn_instrument(factory: Any, root: Path, rng: np.random.Generator, *, flat_obsname: str,
                     arc_obsname: str, ifsscale: str = SCALE) -> tuple[Path, Path]:
    """The afternoon's calibrations, as the nightly masters learn them: 3 lamp flats and 4 arcs
    (one lamp each, with noise) -> the instrument model (``ifstrace``) and the IFS pixel flat
    modelled with it. Returns their paths (under ``root/refs``)."""
    from iris_tasks.masters.ifs_flat import build_master_ifs_flat
    from iris_tasks.masters.ifs_model import build_ifs_model, save_ifs_model

    flats, arcs = [], []
    for i in (1, 2, 3):
        spec = _spec(flat_obsname, i, 2.0 + 0.05 * i, ifsscale=ifsscale)
        flats.append(root / f"{spec.filename[:-5]}_rate.fits")
        write_rate(factory, spec, flats[-1], rng)
    for n, lamp in enumerate(("Ar", "Kr", "Ne", "Xe"), 1):
        spec = _spec(arc_obsname, n, 2.2 + 0.02 * n, lamps=lamp, ifsscale=ifsscale)
        arcs.append(root / f"{spec.filename[:-5]}_rate.fits")
        write_rate(factory, spec, arcs[-1], rng)
    trace = save_ifs_model(build_ifs_model(flats, arcs, subtract_dark=False), root / "refs")
    flat = root / "refs" / "ifs_flat.fits"
    build_master_ifs_flat(flats, trace=trace, subtract_dark=False).model.save(str(flat))
    return trace, flat


def score_source(cube: Any, *, expect_xy: tuple[float, float], tolerance: float,
                 radius: float, airmass: float, pwv_mm: float = 2.0) -> dict:
    """The simulated source's aperture spectrum in ``cube`` (radius in spaxels, around the
    star found within ``tolerance`` spaxels of ``expect_xy``) against its true continuum
    above the atmosphere (the simulator's :class:`PhysicalSource`: truth only scores), per
    wavelength bin: the continuum bins with S/N > 20 away from the emission line, the filter
    edges and the hydrogen lines the standard's model masks, and among them the bins inside
    telluric bands (transmission 0.3-0.9 at the science's ``airmass``)."""
    from iris_tasks.ifs.telluric import extract_star, find_star, hydrogen_mask
    from iris_tasks.simulate.atmosphere import PhysicalSource, transmission

    wave = np.asarray(cube.wavelength, np.float64)
    data, err, dq = np.asarray(cube.data), np.asarray(cube.err), np.asarray(cube.dq)
    x, y, _ = find_star(data, err, dq)
    assert abs(x - expect_xy[0]) < tolerance and abs(y - expect_xy[1]) < tolerance, (x, y, expect_xy)
    spec = extract_star(data, err, dq, x, y, radius)
    source = PhysicalSource()
    ratio = spec.flux * cube.meta.photometry.pixel_area_arcsec2 / source.continuum(wave)
    snr = spec.flux / np.sqrt(spec.variance)
    t_sci = transmission(wave, airmass, pwv_mm)
    line = np.abs(wave - source.line_um) < 6 * source.line_sigma_um
    edge = (wave < wave[0] + 0.004) | (wave > wave[-1] - 0.004)
    scored = (snr > 20) & ~line & ~edge & np.isfinite(ratio) & ~hydrogen_mask(wave)
    bands = scored & (t_sci > 0.3) & (t_sci < 0.9)
    err_abs = np.abs(ratio - 1)
    return {"bins": int(scored.sum()), "of": int(wave.size),
            "median_ratio": round(float(np.median(ratio[scored])), 5),
            "within_3pc": round(float(np.mean(err_abs[scored] < 0.03)), 4),
            "p95_abs_err": round(float(np.percentile(err_abs[scored], 95)), 5),
            "max_abs_err": round(float(np.max(err_abs[scored])), 5),
            "band_bins": int(bands.sum()),
            "band_within_3pc": round(float(np.mean(err_abs[bands] < 0.03)), 4)}


def write_rate(factory: Any, spec: Any, path: Path, rng: np.random.Generator,
               *, illumination: np.ndarray | None = None, noise: bool = True) -> dict:
    """A ``_rate`` image of ``spec`` (DN/s with VAR_POISSON/VAR_RNOISE of a UTR fit); pixels
    that pass FULL_WELL_E within the exposure are SATURATED | DO_NOT_USE. ``illumination``
    replaces the scene (e-/s per pixel) while keeping ``spec``'s header; ``noise=False``
    gives the expected rate (with the same variances)."""
    from iris_tasks.datamodels import ImageModel
    from iris_tasks.datamodels.dqflags import pixel
    from iris_tasks.simulate.frames import ramp_model
    from iris_tasks.simulate.references import mask_dq

    spec = factory.on_sky(spec)
    det = factory.detector(spec.detector)
    info: dict = {}
    if illumination is None:
        illumination, info = factory.illumination(spec)
    electrons = np.asarray(illumination, np.float64) * det.flat(spec.filter)
    gain = np.asarray(det.gain, np.float64)
    n, dt_read = spec.nreads, spec.read_time
    t = (n - 1) * dt_read
    saturated = electrons * t > FULL_WELL_E
    rate = electrons / gain
    var_p = np.maximum(rate, 0.0) * 6.0 / 5.0 / (gain * t)
    var_r = 12.0 * np.asarray(det.read_noise, np.float64) ** 2 / (n * (n * n - 1) * dt_read**2)
    data = rate + (rng.normal(size=rate.shape) * np.sqrt(var_p + var_r) if noise else 0.0)
    dq = mask_dq(det)
    dq[~det.active] |= np.uint32(pixel["REFERENCE_PIXEL"])
    dq[saturated] |= np.uint32(pixel["SATURATED"] | pixel["DO_NOT_USE"])
    ramp = ramp_model(np.zeros((1, 2, *rate.shape), np.uint16), spec, det)
    model = ImageModel(data=data.astype(np.float32), err=np.sqrt(var_p + var_r).astype(np.float32),
                       dq=dq.astype(np.uint32), var_poisson=var_p.astype(np.float32),
                       var_rnoise=var_r.astype(np.float32))
    model.update(ramp)
    model.meta.exposure.gain = float(np.median(gain[det.active]))
    model.save(str(path))
    ramp.close()
    info["n_saturated"] = int(saturated.sum())
    return info


def _steps(trace: Path, flat: Path, **telluric) -> dict:
    skip = {"skip": True}
    return {"dq_init": skip, "dark_sub": skip, "flat_field": {"override_flat": str(flat)},
            "destripe": skip,
            "flexure": {"override_ifstrace": str(trace)},
            "extract_cube": {"override_ifstrace": str(trace), "gain_source": "header"},
            "telluric": telluric}


@pytest.fixture(scope="session")
def night(tmp_path_factory):
    """The instrument model (from flats and arcs) and the IFS pixel flat (from the same lamp
    flats, modelled with it), a standard at airmass 1.3 reduced to a cube and its telluric
    reference, and a science + sky pair at airmass 1.2 half an hour later; the standard,
    science and sky frames with noise and, to measure the systematic error alone, without."""
    from iris_tasks.ifs import Ifs2Pipeline
    from iris_tasks.masters.telluric import build_telluric, save_telluric
    from iris_tasks.simulate.atmosphere import Atmosphere, TelluricStandard
    from iris_tasks.simulate.frames import FrameFactory

    root = tmp_path_factory.mktemp("telluric")
    rng = np.random.default_rng(SEED)
    factory = FrameFactory(size=SIZE, seed=SEED, detector_overrides={"onef_rms": 0.0, "cr_rate": 0.0},
                           atmosphere=Atmosphere(pwv_mm=2.0, standard=TelluricStandard(mag=14.0)))
    trace, flat = learn_instrument(factory, root, rng, flat_obsname="SLI-NFF",
                                   arc_obsname="SLI-IDP")
    out = {"root": root, "factory": factory, "trace": trace, "flat": flat, "rng": rng}
    for noisy in (True, False):
        tag = "" if noisy else "_noiseless"
        rates, infos = {}, {}
        for key, obsname, hour, airmass, read_time in (
                # the standard as long as the science: a 13 s frame's sky is too faint for the
                # flexure step's x fit (FLEXDX 0 applied, 0.13 px off: +-3 % wiggles along the
                # spectrum against the science, measured 2026-12-07)
                ("TEL", "SLI-TEL", 7.5, TEL_AIRMASS, 30.0),
                ("SKY", "SLI-SKY", 7.9, SCI_AIRMASS, 30.0),
                ("SCI", "SLI-SCI", 8.0, SCI_AIRMASS, 30.0)):
            spec = _spec(obsname, 1, hour, airmass=airmass, read_time=read_time)
            rates[key] = root / f"{spec.filename[:-5]}{tag}_rate.fits"
            infos[key] = write_rate(factory, spec, rates[key], rng, noise=noisy)
        tel_path = root / f"tel{tag}_s3d.fits"
        Ifs2Pipeline.call(str(rates["TEL"]), steps=_steps(trace, flat)).save(str(tel_path))
        master = build_telluric(tel_path)
        ref = save_telluric(master, root / f"refs{tag}")
        out["noisy" if noisy else "noiseless"] = {"rates": rates, "infos": infos,
                                                  "tel_cube": tel_path, "telluric": ref,
                                                  "master": master}
    return out
