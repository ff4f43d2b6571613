"""A whole simulated observing night (raw frames + truth + pre-night references + manifest),
and single frames for feeding a landing area."""

from __future__ import annotations

import dataclasses
import datetime as dt
import json
import logging
import os
import time
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from astropy.io import fits

from ..instrument.standards import filter_band
from ..metadata import (
    DETECTORS,
    IMAGER_DETECTORS,
    RECIPES,
    SITE_UTC_OFFSET_HOURS,
    observing_night,
    readpatt,
)
from .atmosphere import Atmosphere, TelluricStandard
from .detector import DEFAULT_READ_TIME, DetectorModel, ProgressFn
from .frames import FrameFactory, FrameSpec, write_atomic
from .ifs import IfsScene
from .ifs_optics import IfsTruth
from .references import write_reference_files

log = logging.getLogger(__name__)

MANIFEST_VERSION = 1
CAL_START_LOCAL_HOUR = 16.0  # afternoon calibrations
SCI_START_LOCAL_HOUR = 20.0
OVERHEAD_S = 5.0  # between exposures

Reporter = Callable[[str], None]


@dataclass
class NightPlan:
    """How many frames of each kind a simulated night holds (per detector / IFS mode)."""

    n_dark: int = 5
    n_flat: int = 3  # per filter
    n_sky: int = 2
    n_science: int = 2
    n_telluric: int = 1  # IFS
    # The IFS standards' star (LEN-TEL, SLI-TEL; header STDSPTYP, STDTEFF, STDMAG, STDMAGBD):
    # its spectrum (atmosphere.TelluricStandard: the type's blackbody with hydrogen lines, at
    # its magnitude) seen through the simulated atmosphere at the frame's AIRMASS, as the
    # nightly telluric build expects. Ks = 12 (4.6e6 e-/s in Kbb at airmass 1.2): on the
    # default 10 x 1.4 s reads at 1024 px the slicer's response SNR is 54 (nightly QA: >= 30;
    # Ks 13: 30, Ks 15.5: 5), its brightest pixel saturates after ~57 s (slicer 25 mas; the
    # lenslet 4 mas after ~3.5x that), measured 2026-12-07. Realistic IFS optics only; None (and
    # the ideal optics) keeps the scene's generic hot star without a standard's header, which
    # no telluric reference can be built from.
    ifs_standard: TelluricStandard | None = TelluricStandard(mag=12.0)
    # Imager standards (IMG1-TEL, in the science filter, before the sky and science frames):
    # an A0V star of ``imager_standard_mag`` at ``imager_standard_airmass`` (header STDMAG,
    # STDMAGBD, AIRMASS), from which the nightly build measures the filter's zero point
    # (``photom``). 0 by default: the star needs a frame of >= 96 px (its sky annulus reaches
    # 46 px); the demo and ``iris-drs simulate night`` take one.
    n_imager_telluric: int = 0
    imager_standard_mag: float = 17.0
    imager_standard_airmass: float = 1.2
    # Airmass of the night's other on-sky frames: science, sky and (unless
    # ``ifs_standard_airmass``) the IFS standards (header AIRMASS, which the photom and
    # telluric steps read). The imager star field is count rates as detected, with no
    # atmosphere of its own: what is seen at this airmass. The imager standard's count rate
    # goes through the atmosphere at ``imager_standard_airmass``; the photom step brings its
    # zero point from there to this airmass (the same by default: no correction).
    airmass: float = 1.2
    # The IFS standards' airmass (None: ``airmass``). With ``ifs_atmosphere`` the science and
    # the standards each go through the atmosphere at their own airmass, so a difference is
    # what the telluric step's airmass rescaling (or bracketing) then has to undo.
    ifs_standard_airmass: float | None = None
    # The IFS science through the same atmosphere as the IFS standards (since 2026-12-08): the
    # source in physical units (atmosphere.PhysicalSource, erg/s/cm^2/A) times the published
    # Maunakea transmission at the frame's AIRMASS and the standards' water vapour, through
    # the TMT aperture and the same efficiency curve, so a telluric reference built from the
    # night's standard corrects what the science went through. Realistic optics with a
    # declared ``ifs_standard`` only; False (or ``ifs_standard=None``, or the ideal optics)
    # keeps the scene's e-/s source with its fixed absorption bands.
    ifs_atmosphere: bool = True
    n_arc: int = 1  # IFS instrument data product (arc): sets of arc_lamps exposures
    # One arc exposure per entry (header LAMPS): one lamp at a time, as arcs are taken, since
    # at the IFS's dispersion the four lamps' lines blend when lit together.
    arc_lamps: tuple[str, ...] = ("Ar", "Kr", "Ne", "Xe")
    imager_filters: tuple[str, ...] = ("Ks", "H")  # flats
    science_filter: str = "Ks"
    ifs_filter: str = "Kbb"
    ifs_modes: tuple[tuple[str, str], ...] = (("LENSLET", "4"), ("SLICER", "25"))
    pa: float = 0.0  # position angle (deg, +Y east of north) of every frame of the night

    def __post_init__(self) -> None:
        if self.science_filter not in self.imager_filters:
            self.imager_filters = (*self.imager_filters, self.science_filter)


def ifs_standard_in(star: TelluricStandard, filter_name: str) -> TelluricStandard:
    """``star`` with its magnitude in the band of IFS filter ``filter_name`` (Kbb -> Ks,
    Hbb -> H: the band the telluric build needs, an A0V star's colours being ~0), or as it is
    where the filter has no band."""
    try:
        band = filter_band(filter_name)
    except ValueError:
        return star
    return star if band == star.band else dataclasses.replace(star, band=band)


def night_atmosphere(plan: NightPlan, ifs_optics: str = "realistic") -> Atmosphere | None:
    """The atmosphere the night's IFS science shares with its standards
    (:attr:`NightPlan.ifs_atmosphere`): the default :class:`Atmosphere` (the reference water
    vapour, constant airglow) with the plan's standard, or None where the science keeps the
    scene's e-/s source (ideal optics, no declared standard, or switched off). The IFS
    standards go through the same transmission either way (:meth:`FrameFactory.on_sky`)."""
    if not plan.ifs_atmosphere or ifs_optics != "realistic" or plan.ifs_standard is None:
        return None
    return Atmosphere(standard=plan.ifs_standard)


def night_factory(plan: NightPlan, *, size: int, seed: int, nchan: int = 32,
                  detector_overrides: dict[str, Any] | None = None,
                  ifs_optics: str = "realistic",
                  flexure: dict[str, Any] | None = None) -> FrameFactory:
    """The :class:`FrameFactory` that makes a night of ``plan`` (``simulate_night`` and
    ``simulate_frame`` use it, so a frame simulated alone is the night's frame)."""
    return FrameFactory(size=size, seed=seed, nchan=nchan,
                        detector_overrides=dict(detector_overrides or {}), optics=ifs_optics,
                        atmosphere=night_atmosphere(plan, ifs_optics),
                        **_flexure_settings(flexure))


def default_night() -> str:
    """The current observing night at the site."""
    now = dt.datetime.now(dt.UTC)
    return observing_night(now.strftime("%Y-%m-%d"), now.strftime("%H:%M:%S"))


def _local_to_utc(night: str, local_hour: float) -> dt.datetime:
    base = dt.datetime.fromisoformat(night).replace(tzinfo=dt.UTC)
    return base + dt.timedelta(hours=local_hour - SITE_UTC_OFFSET_HOURS)


def plan_night(night: str, detectors: Iterable[str] = DETECTORS, nreads: int = 10,
               read_time: float = DEFAULT_READ_TIME, sampmode: str = "UTR", nramps: int = 1,
               plan: NightPlan | None = None, ifs_standards: bool = True) -> list[FrameSpec]:
    """The frames of a night in time order per detector: afternoon darks and flats, then sky
    and science (imager), and for the IFS per mode darks, flats, arc, telluric, sky, science.
    The four imager detectors expose together (same start times). ``ifs_standards``: the IFS
    standards get the plan's star (:attr:`NightPlan.ifs_standard`; False for the ideal
    optics, which cannot show it)."""
    plan = plan or NightPlan()
    specs: list[FrameSpec] = []
    common = {"nreads": nreads, "read_time": read_time, "sampmode": sampmode, "nramps": nramps}

    def sequence(det: str, items: list[tuple[str, str, str | None, int]]) -> None:
        """items: (obsname, filter, ifsscale, dither index[, lamps]) in observing order; an
        imager standard (IMG1-TEL) gets the plan's star and airmass."""
        exp_counter: dict[str, int] = {}
        cal = _local_to_utc(night, CAL_START_LOCAL_HOUR)
        sci = _local_to_utc(night, SCI_START_LOCAL_HOUR)
        for obsname, filt, scale, dither, *lamps in items:
            exp_counter[obsname] = exp_counter.get(obsname, 0) + 1
            is_cal = RECIPES[obsname].kind in ("dark", "flat", "engineering")
            start = cal if is_cal else sci
            on_sky: dict[str, Any] = {}
            if RECIPES[obsname].kind in ("science", "sky", "telluric"):
                on_sky = {"airmass": plan.airmass}
            if obsname == "IMG1-TEL":
                on_sky = {"airmass": plan.imager_standard_airmass,
                          "standard": TelluricStandard(mag=plan.imager_standard_mag,
                                                       band=filter_band(filt))}
            if obsname in ("LEN-TEL", "SLI-TEL"):
                if plan.ifs_standard_airmass is not None:
                    on_sky["airmass"] = plan.ifs_standard_airmass
                if ifs_standards and plan.ifs_standard:
                    on_sky["standard"] = ifs_standard_in(plan.ifs_standard, filt)
            spec = FrameSpec(detector=det, obsname=obsname, exp_no=exp_counter[obsname], start=start,
                             filter=filt, ifsscale=scale, dither_index=dither, pa=plan.pa,
                             lamps=lamps[0] if lamps else None, **on_sky, **common)
            step = dt.timedelta(seconds=round(spec.duration + OVERHEAD_S, 3))
            if is_cal:
                cal += step
            else:
                sci += step
            specs.append(spec)

    for det in detectors:
        if det in IMAGER_DETECTORS:
            items = [("IMG1-DRK", "BLANK", None, 0)] * plan.n_dark
            for filt in plan.imager_filters:
                items += [("IMG1-NFF", filt, None, 0)] * plan.n_flat
            items += [("IMG1-TEL", plan.science_filter, None, 0)] * plan.n_imager_telluric
            items += [("IMG1-SKY", plan.science_filter, None, i) for i in range(plan.n_sky)]
            items += [("IMG1-SCI", plan.science_filter, None, i) for i in range(plan.n_science)]
            sequence(det, items)
        else:
            items = []
            for mode, scale in plan.ifs_modes:
                p = "LEN" if mode == "LENSLET" else "SLI"
                flat = "LEN-SPX" if mode == "LENSLET" else "SLI-NFF"
                items += [(f"{p}-DRK", "BLANK", scale, 0)] * plan.n_dark
                items += [(flat, plan.ifs_filter, scale, 0)] * plan.n_flat
                items += [(f"{p}-IDP", plan.ifs_filter, scale, 0, lamps)
                          for _ in range(plan.n_arc) for lamps in plan.arc_lamps]
                items += [(f"{p}-TEL", plan.ifs_filter, scale, 0)] * plan.n_telluric
                items += [(f"{p}-SKY", plan.ifs_filter, scale, 0)] * plan.n_sky
                items += [(f"{p}-SCI", plan.ifs_filter, scale, 0)] * plan.n_science
            sequence(det, items)
    return specs


# ---------------------------------------------------------------------- truth files
def _json_dump(obj: Any, path: Path) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.part")
    tmp.write_text(json.dumps(obj, indent=1, sort_keys=True) + "\n")
    os.replace(tmp, path)
    return path


def _fits_dump(hdus: list[fits.ImageHDU], header: dict[str, Any], path: Path) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    primary = fits.PrimaryHDU()
    for key, value in header.items():
        primary.header[key] = value
    tmp = path.with_name(f".{path.name}.part")
    fits.HDUList([primary, *hdus]).writeto(tmp, overwrite=True)
    os.replace(tmp, path)
    return path


def write_detector_truth(det: DetectorModel, filters: Sequence[str], truth_dir: Path) -> dict[str, str]:
    """truth/<DET>_detector.fits (maps) + truth/<DET>_detector.json (scalars)."""
    hdus = [
        fits.ImageHDU(det.bias, name="BIAS"),
        fits.ImageHDU(det.gain, name="GAIN"),
        fits.ImageHDU(det.read_noise, name="READNOISE"),
        fits.ImageHDU(det.dark_current, name="DARK"),
        fits.ImageHDU(det.hot.astype(np.uint8), name="HOT"),
        fits.ImageHDU(det.dead.astype(np.uint8), name="DEAD"),
        fits.ImageHDU(det.low_qe.astype(np.uint8), name="LOW_QE"),
        fits.ImageHDU(det.nonlin_a, name="NONLIN_A"),
        fits.ImageHDU(det.saturation, name="SATURATION"),
        fits.ImageHDU(det.pixel_response, name="RESPONSE"),
        fits.ImageHDU(det.channel_bias, name="CHAN_BIAS"),
    ]
    for filt in filters:
        hdus.append(fits.ImageHDU(det.flat(filt), name=f"FLAT_{filt.upper()}"))
        hdus.append(fits.ImageHDU(det.flat_dn(filt), name=f"DNFLAT_{filt.upper()}"))
    header = {"DETECTOR": det.name, "DET_ID": det.det_id, "SEED": det.seed, "NCHAN": det.nchan,
              "REFPIX": det.refpix, "GAIN": det.gain_nominal, "KTC": det.ktc_noise,
              "ONEF_RMS": det.onef_rms, "ONEF_CMN": det.onef_common, "SATMARG": det.sat_margin,
              "CR_RATE": det.cr_rate, "PITCH_UM": det.pixel_pitch_um}
    fits_path = _fits_dump(hdus, header, truth_dir / f"{det.name}_detector.fits")
    scalars = det.scalars()
    scalars["flats"] = {f: f"FLAT_{f.upper()}" for f in filters}
    scalars["dn_flats"] = {f: f"DNFLAT_{f.upper()}" for f in filters}
    scalars["units"] = {"BIAS": "DN", "GAIN": "e-/DN", "READNOISE": "DN per read", "DARK": "e-/s",
                        "NONLIN_A": "1/DN (measured = true * (1 - a * true), DN above bias)",
                        "SATURATION": "DN incl. bias (plateau)", "RESPONSE": "relative QE",
                        "CHAN_BIAS": "DN offset per output channel",
                        "FLAT_<FILTER>": "QE flat (mean 1 over good pixels), applied to the light",
                        "DNFLAT_<FILTER>": "FLAT / GAIN, median 1 over good pixels: the flat "
                                           "in DN/s, as in the FLAT references"}
    json_path = _json_dump(scalars, truth_dir / f"{det.name}_detector.json")
    return {"maps": str(fits_path), "scalars": str(json_path)}


def write_ifs_truth(scene: IfsScene, truth_dir: Path,
                    instrument: IfsTruth | None = None) -> dict[str, str]:
    """truth/IFS_<MODE>_<scale>_<filter>_scene.fits + .json: cubes, spectra and the trace
    (the as-built one, at zero flexure, for realistic optics), and with ``instrument``
    (:meth:`FrameFactory.ifs_truth`) the dispersion, PSF and LSF the pipeline should measure:
    HDUs DLDY (micron per row, per spaxel and design wavelength), LSF_WAVE, PSF_SIGX, PSF_SIGY
    (core sigma, px), LSF_SIG (micron)."""
    tr = scene.trace
    stem = f"IFS_{tr.mode}_{tr.scale}_{tr.filter}_scene"
    source_cube = (scene.source_spectrum[:, None, None] * scene.source_profile[None]).astype(np.float32)
    hdus = [
        fits.ImageHDU(scene.wavelength, name="WAVELENGTH"),
        fits.ImageHDU(source_cube, name="SOURCE"),
        fits.ImageHDU(scene.transmission.astype(np.float32), name="TRANSMISSION"),
        fits.ImageHDU(scene.sky.astype(np.float32), name="SKY"),
        fits.ImageHDU(scene.telluric_spectrum.astype(np.float32), name="TELLURIC"),
        fits.ImageHDU(scene.lamp.astype(np.float32), name="LAMP"),
        fits.ImageHDU(scene.arc.astype(np.float32), name="ARC"),
        fits.ImageHDU(tr.trace_x, name="TRACE_X"),
        fits.ImageHDU(tr.trace_y, name="TRACE_Y"),
        fits.ImageHDU(tr.throughput, name="THRUPUT"),
    ]
    header = {"IFSMODE": tr.mode, "IFSSCALE": tr.scale, "FILTER": tr.filter,
              "PSFSIG": tr.psf_sigma, "BUNIT": "e-/s per spaxel per wavelength bin",
              "OPTICS": "realistic" if scene.realistic else "ideal"}
    if instrument is not None:
        hdus += [fits.ImageHDU(instrument.dispersion_um_per_row.astype(np.float32), name="DLDY"),
                 fits.ImageHDU(instrument.lsf_wave, name="LSF_WAVE"),
                 fits.ImageHDU(instrument.psf_sigma_x.astype(np.float32), name="PSF_SIGX"),
                 fits.ImageHDU(instrument.psf_sigma_y.astype(np.float32), name="PSF_SIGY"),
                 fits.ImageHDU(instrument.lsf_sigma_um.astype(np.float32), name="LSF_SIG")]
        header.update(HALOFRAC=instrument.halo_fraction, HALOSIG=instrument.halo_sigma_px)
    fits_path = _fits_dump(hdus, header, truth_dir / f"{stem}.fits")
    info = {
        "ifsmode": tr.mode, "ifsscale": tr.scale, "filter": tr.filter,
        "cube_shape_nwave_ny_nx": list(tr.cube_shape), "psf_sigma_px": tr.psf_sigma,
        "source_xy_spaxels": list(scene.source_xy), "source_line": list(scene.line),
        "source_continuum_e_per_s": scene.continuum_e_per_s,
        "telluric_xy_spaxels": list(scene.telluric_xy),
        "arc_wavelengths_um": [float(w) for w in scene.arc_wavelengths],
        "optics": "realistic" if scene.realistic else "ideal",
        "instrument": None if instrument is None else instrument.to_json(),
        "units": "cubes and spectra in e-/s per spaxel (SKY, LAMP, ARC) or in total (SOURCE per "
                 "spaxel, TELLURIC in total) per wavelength bin, before spaxel throughput and flat; "
                 "science = SOURCE * TRANSMISSION + SKY (a night without the IFS atmosphere; "
                 "with it, manifest ifs_atmosphere, the science source is the frame truth's "
                 "scene.atmosphere.source_physical through its transmission); LAMP and ARC are "
                 "shapes scaled per frame",
    }
    json_path = _json_dump(info, truth_dir / f"{stem}.json")
    return {"maps": str(fits_path), "info": str(json_path)}


# ---------------------------------------------------------------------- the night
def simulate_night(out_dir: str | os.PathLike, size: int = 1024, nreads: int = 10,
                   detectors: Iterable[str] = DETECTORS, seed: int = 0, night: str | None = None,
                   *, read_time: float = DEFAULT_READ_TIME, sampmode: str = "UTR", nramps: int = 1,
                   plan: NightPlan | None = None, references: bool = True,
                   useafter: str | None = None, nchan: int = 32,
                   detector_overrides: dict[str, Any] | None = None,
                   report: Reporter | None = None,
                   progress: ProgressFn | None = None, ifs_optics: str = "realistic",
                   flexure: dict[str, Any] | None = None) -> dict[str, Any]:
    """Write a whole simulated night under ``out_dir`` and return its manifest.

    ``ifs_optics`` ("realistic" or "ideal", see :class:`FrameFactory`) selects the IFS model;
    only "ideal" writes truth-derived ifstrace references. ``flexure`` holds FrameFactory
    flexure settings (``flexure``, ``flexure_rms``, ``flexure_drift``, ``flexure_jumps``).

    Layout: ``raw/<night>_<DET>_<OBSNAME>_<EXPNO>.fits``, ``references/`` (pre-night set,
    unless ``references=False``), ``truth/`` and ``manifest.json`` (paths relative to out_dir).
    ``report`` receives one progress line per frame (the CLI prints them on stderr);
    ``progress(fraction, text)`` is called per chunk of rows inside each frame.
    """
    t0 = time.perf_counter()
    out = Path(out_dir)
    night = night or default_night()
    dt.date.fromisoformat(night)  # fail early on a malformed night
    detectors = list(detectors)
    unknown = [d for d in detectors if d not in DETECTORS]
    if unknown:
        raise ValueError(f"unknown detectors {unknown}; expected some of {', '.join(DETECTORS)}")
    plan = plan or NightPlan()
    factory = night_factory(plan, size=size, seed=seed, nchan=nchan,
                            detector_overrides=detector_overrides, ifs_optics=ifs_optics,
                            flexure=flexure)
    specs = plan_night(night, detectors, nreads, read_time, sampmode, nramps, plan,
                       ifs_standards=ifs_optics == "realistic")
    patt = readpatt(sampmode, specs[0].nreads if specs else nreads)
    raw_dir, truth_dir, ref_dir = out / "raw", out / "truth", out / "references"
    rel = lambda p: str(Path(p).relative_to(out))  # noqa: E731

    manifest: dict[str, Any] = {
        "manifest_version": MANIFEST_VERSION, "night": night, "seed": seed, "size": size,
        "nreads": specs[0].nreads if specs else nreads, "nramps": nramps, "read_time_s": read_time,
        "sampmode": sampmode, "readpatt": patt, "nchan": nchan, "ifs_optics": ifs_optics,
        # the IFS science through the standards' atmosphere (physical units; the frame truth's
        # scene.atmosphere) rather than the scene's e-/s source (truth/IFS_*_scene SOURCE)
        "ifs_atmosphere": factory.atmosphere is not None,
        "detectors": {}, "ifs": {},
        "files": [], "references": [],
    }
    for name in detectors:
        det = factory.detector(name)
        filters = list(plan.imager_filters) if name in IMAGER_DETECTORS else [plan.ifs_filter]
        paths = write_detector_truth(det, filters, truth_dir)
        entry: dict[str, Any] = {"det_id": det.det_id, "truth_maps": rel(paths["maps"]),
                                 "truth_scalars": rel(paths["scalars"])}
        if name in IMAGER_DETECTORS:
            stars = factory.stars(name, plan.science_filter, plan.pa)
            entry["stars"] = rel(_json_dump(stars.to_json(), truth_dir / f"{name}_stars.json"))
        else:
            for mode, scale in plan.ifs_modes:
                scene = factory.ifs_scene(mode, scale, plan.ifs_filter)
                p = write_ifs_truth(scene, truth_dir,
                                    factory.ifs_truth(mode, scale, plan.ifs_filter))
                manifest["ifs"][mode] = {"ifsscale": scale, "filter": plan.ifs_filter,
                                         "truth_maps": rel(p["maps"]), "truth_info": rel(p["info"])}
        manifest["detectors"][name] = entry

    if references:
        ifs_configs = [(m, s, plan.ifs_filter) for m, s in plan.ifs_modes]
        refs = write_reference_files(ref_dir, detectors, size, seed, useafter or f"{night}T00:00:00",
                                     readpatts=(patt,), imager_filters=plan.imager_filters,
                                     ifs_configs=ifs_configs, factory=factory, nchan=nchan)
        for path in refs:
            header = fits.getheader(path)
            manifest["references"].append({
                "path": rel(path), "reftype": header["REFTYPE"].lower(),
                "detector": header["DETECTOR"], "filter": header.get("FILTER"),
                "ifsmode": header.get("IFSMODE"), "readpatt": header.get("READPATT")})

    nframes = len(specs)
    for n, spec in enumerate(specs, 1):
        tf = time.perf_counter()
        model, truth = factory.make(spec, progress=progress)
        path = write_atomic(model, raw_dir / spec.filename)
        model.close()
        truth_path = _json_dump(truth, truth_dir / "frames" / (Path(spec.filename).stem + ".json"))
        det_entry = manifest["detectors"][spec.detector]
        pointers = {"frame": rel(truth_path), "detector": det_entry["truth_maps"]}
        if spec.recipe.kind == "science" and spec.recipe.mode == "imager":
            pointers["stars"] = det_entry["stars"]
        if spec.recipe.mode != "imager":
            pointers["ifs_scene"] = manifest["ifs"][spec.recipe.ifsmode]["truth_maps"]
        manifest["files"].append({
            "path": rel(path), "detector": spec.detector, "obsname": spec.obsname,
            "obstype": spec.recipe.obstype, "kind": spec.recipe.kind, "exp_no": spec.exp_no,
            "filter": spec.filter, "ifsmode": spec.recipe.ifsmode, "ifsscale": spec.ifsscale,
            "readpatt": readpatt(spec.sampmode, spec.nreads),
            "date_obs": truth["date_obs"], "time_obs": truth["time_obs"], "truth": pointers})
        if report is not None:
            report(f"simulate: [{n}/{nframes}] {spec.filename} ({time.perf_counter() - tf:.1f} s)")
        log.info("[%d/%d] wrote %s", n, nframes, path)
    _json_dump(manifest, out / "manifest.json")
    log.info("night %s: %d frames, %d references in %.1f s", night, nframes,
             len(manifest["references"]), time.perf_counter() - t0)
    return manifest


def simulate_frame(out: str | os.PathLike, obsname: str, detector: str, *, size: int = 1024,
                   nreads: int = 10, nramps: int = 1, read_time: float = DEFAULT_READ_TIME,
                   sampmode: str = "UTR", seed: int = 0, exp_no: int = 1,
                   filter_name: str | None = None, ifsscale: str | None = None,
                   start: dt.datetime | None = None, night: str | None = None,
                   dither_index: int | None = None, truth_path: str | os.PathLike | None = None,
                   nchan: int = 32, pa: float = 0.0,
                   progress: ProgressFn | None = None, ifs_optics: str = "realistic",
                   flexure: dict[str, Any] | None = None,
                   lamps: str | None = None,
                   airmass: float | None = None) -> tuple[Path, dict]:
    """Simulate one raw frame (the same frame ``simulate_night`` would make for the same seed,
    size and exposure) and write it atomically.

    ``airmass`` (header AIRMASS of an on-sky frame) defaults to the default night's
    (:class:`NightPlan`); an IFS standard (realistic optics) gets its star.

    ``out`` is a file path, or a directory in which the standard name is used. The start time
    defaults to now (UTC), or to the evening of ``night`` when it is given.
    """
    recipe = RECIPES.get(obsname)
    if recipe is None:
        raise ValueError(f"unknown OBSNAME {obsname!r}; expected one of {', '.join(RECIPES)}")
    if start is None:
        if night:
            hour = CAL_START_LOCAL_HOUR if recipe.kind in ("dark", "flat", "engineering") else SCI_START_LOCAL_HOUR
            start = _local_to_utc(night, hour) + dt.timedelta(minutes=exp_no)
        else:
            start = dt.datetime.now(dt.UTC)
    if filter_name is None:
        filter_name = "Ks" if recipe.mode == "imager" else "Kbb"
    plan = NightPlan()  # the default night's airmass and IFS standard
    if airmass is None and recipe.kind in ("science", "sky", "telluric"):
        airmass = plan.imager_standard_airmass if obsname == "IMG1-TEL" else plan.airmass
        if obsname in ("LEN-TEL", "SLI-TEL") and plan.ifs_standard_airmass is not None:
            airmass = plan.ifs_standard_airmass
    standard = (ifs_standard_in(plan.ifs_standard, filter_name)
                if obsname in ("LEN-TEL", "SLI-TEL") and ifs_optics == "realistic"
                and plan.ifs_standard else None)
    spec = FrameSpec(detector=detector, obsname=obsname, exp_no=exp_no, start=start,
                     filter=filter_name, nreads=nreads, nramps=nramps, read_time=read_time,
                     sampmode=sampmode, ifsscale=ifsscale, pa=pa, lamps=lamps, airmass=airmass,
                     standard=standard,
                     dither_index=(exp_no - 1) if dither_index is None else dither_index)
    factory = night_factory(plan, size=size, seed=seed, nchan=nchan, ifs_optics=ifs_optics,
                            flexure=flexure)
    model, truth = factory.make(spec, progress=progress)
    text = os.fspath(out)
    as_dir = Path(text).is_dir() or text.endswith(("/", os.sep))  # Path() drops a trailing "/"
    path = write_atomic(model, Path(text) / spec.filename if as_dir else Path(text))
    model.close()
    truth["file"] = path.name
    if truth_path is not None:
        _json_dump(truth, Path(truth_path))
    return path, truth


def _flexure_settings(flexure: dict[str, Any] | None) -> dict[str, Any]:
    """FrameFactory keyword arguments from a flexure settings dict (validated names)."""
    allowed = {"flexure", "flexure_rms", "flexure_drift", "flexure_jumps"}
    settings = dict(flexure or {})
    unknown = set(settings) - allowed
    if unknown:
        raise ValueError(f"unknown flexure settings {sorted(unknown)}; expected {sorted(allowed)}")
    return settings


def manifest_files(manifest: dict[str, Any], obsname: str | None = None) -> list[dict[str, Any]]:
    """Entries of ``manifest`` (optionally only one OBSNAME)."""
    return [f for f in manifest["files"] if obsname is None or f["obsname"] == obsname]


__all__ = ["NightPlan", "manifest_files", "night_atmosphere", "night_factory", "plan_night",
           "simulate_frame", "simulate_night", "write_detector_truth", "write_ifs_truth"]
