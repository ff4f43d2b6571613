"""One raw IRIS frame: what it looks at (scene by OBSNAME), its header, and writing it.

:class:`FrameFactory` holds the detectors, star fields, IFS traces and scenes of one
simulation (one seed, one array size) and turns a :class:`FrameSpec` into a RampModel plus a
JSON-able truth record. ``simulate_night`` and the single-frame CLI both go through it, so a
frame simulated alone is the same frame the night would contain.
"""

from __future__ import annotations

import dataclasses
import datetime as dt
import logging
import math
import os
import tempfile
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from ..instrument.lines import LAMP_SPECIES
from ..instrument.standards import filter_band
from ..metadata import RECIPES, SITE_UTC_OFFSET_HOURS, observing_night, readpatt
from .atmosphere import (
    IMAGER_BANDPASS,
    REFERENCE_PWV_MM,
    Atmosphere,
    TelluricStandard,
    ifs_components,
    imager_star_rate,
    truth_record,
)
from .detector import DEFAULT_READ_TIME, DetectorModel, ProgressFn, seed_sequence, simulate_ramp
from .ifs import (
    DEFAULT_ARC_LAMPS,
    IfsScene,
    IfsTrace,
    as_built_trace,
    build_as_built_ifs,
    build_realistic_scene,
    build_scene,
    build_trace,
    project_cube,
)
from .ifs_optics import AsBuiltIfs, Flexure, IfsTruth, as_built_truth, flexure_at, render
from .scenes import (
    StarField,
    dither_offset,
    flat_lamp_rate,
    make_star_field,
    sky_rate,
    uniform_rate,
)
from .sky import dithered_pointing, pixel_to_sky, reference_pixel, sky_to_pixel

log = logging.getLogger(__name__)

TARGET_RA, TARGET_DEC = 150.119167, 2.205833  # a high-latitude field (COSMOS-like)
TELLURIC_RA, TELLURIC_DEC = 149.5, 1.8
SKY_OFFSET_ARCSEC = 30.0  # sky frames are taken this far north of the field
MJD_EPOCH = dt.datetime(1858, 11, 17, tzinfo=dt.UTC)
IFS_LAMP_FILL_DN = 20000.0  # peak pixel of an IFS flat at the last read (DN above bias)
IFS_ARC_FILL_DN = 15000.0
DARK_FILTER = "BLANK"
IFS_OPTICS = ("realistic", "ideal")
FLEXURE_T0_LOCAL_HOUR = 16.0  # flexure clock: hours since the afternoon calibrations begin


def frame_name(night: str, detector: str, obsname: str, exp_no: int) -> str:
    """Raw file name: ``<night>_<DETECTOR>_<OBSNAME>_<EXPNO:04d>.fits``."""
    return f"{night}_{detector}_{obsname}_{exp_no:04d}.fits"


def mjd(when: dt.datetime) -> float:
    return (when - MJD_EPOCH).total_seconds() / 86400.0


def exposure_time(sampmode: str, nreads: int, read_time: float, nfowler: int | None) -> float:
    """Effective exposure time of one ramp: the time between the first and last sample
    groups (UTR/CDS: (n - 1) reads; MCDS: n - NFOWLER reads)."""
    if sampmode == "MCDS":
        return (nreads - int(nfowler or 1)) * read_time
    return max(1, nreads - 1) * read_time


def ifs_lamps(kind: str, lamps: str | None) -> str:
    """The LAMPS value of an IFS frame of ``kind`` (validated; default per kind)."""
    if kind == "flat":
        if lamps not in (None, "CONT"):
            raise ValueError(f"IFS flats use the continuum lamp (LAMPS='CONT'), not {lamps!r}")
        return "CONT"
    if kind == "engineering":
        names = [p.strip().capitalize() for p in (lamps or DEFAULT_ARC_LAMPS).split(",") if p.strip()]
        bad = [n for n in names if n not in LAMP_SPECIES]
        if bad or not names:
            raise ValueError(f"arc lamps must be a comma list of {', '.join(LAMP_SPECIES)}, "
                             f"not {lamps!r}")
        return ",".join(sorted(set(names), key=list(LAMP_SPECIES).index))
    if lamps not in (None, "OFF"):
        raise ValueError(f"no lamp is lit in an IFS {kind} frame (LAMPS='OFF'), not {lamps!r}")
    return "OFF"


@dataclass
class FrameSpec:
    """Everything that defines one raw frame."""

    detector: str
    obsname: str
    exp_no: int
    start: dt.datetime  # UTC, exposure start
    filter: str = "Ks"
    nreads: int = 10
    nramps: int = 1
    read_time: float = DEFAULT_READ_TIME
    sampmode: str = "UTR"
    nfowler: int | None = None
    ifsscale: str | None = None
    dither_index: int = 0
    pa: float = 0.0  # position angle of detector +Y, degrees east of north (header PA)
    # IFS calibration lamps (header LAMPS): "CONT" for flats, arc lamps such as "Ar,Kr,Ne,Xe"
    # for the IDP (arc) frames, "OFF" for the other IFS frames; None = the default per kind
    lamps: str | None = None
    # On-sky conditions (header AIRMASS; water vapour is truth only) and, for telluric
    # frames, the standard star (header STDSPTYP/STDTEFF/STDMAG/STDMAGBD); used when the
    # factory simulates the atmosphere (FrameFactory.atmosphere), None = its defaults.
    airmass: float | None = None
    pwv_mm: float | None = None
    standard: TelluricStandard | None = None

    def __post_init__(self) -> None:
        if self.airmass is not None and not (math.isfinite(self.airmass) and self.airmass >= 1.0):
            raise ValueError(f"airmass must be >= 1, not {self.airmass}")
        if not math.isfinite(self.pa):
            raise ValueError(f"PA must be finite, not {self.pa}")
        if self.obsname not in RECIPES:
            raise ValueError(f"unknown OBSNAME {self.obsname!r}; expected one of {', '.join(RECIPES)}")
        recipe = RECIPES[self.obsname]
        if self.detector not in recipe.detectors:
            raise ValueError(f"detector {self.detector} cannot take {self.obsname} "
                             f"(expected {', '.join(recipe.detectors)})")
        if self.start.tzinfo is None:
            self.start = self.start.replace(tzinfo=dt.UTC)
        if self.sampmode == "CDS":
            self.nreads = 2
        if self.sampmode == "MCDS" and self.nfowler is None:
            self.nfowler = max(1, self.nreads // 2)
        if self.sampmode not in ("CDS", "MCDS", "UTR"):
            raise ValueError(f"unknown SAMPMODE {self.sampmode!r}")
        if self.sampmode == "UTR" and self.nreads < 2:
            raise ValueError("UTR needs at least 2 reads")
        if recipe.mode != "imager" and self.ifsscale is None:
            self.ifsscale = "4" if recipe.mode == "lenslet" else "25"
        if recipe.kind == "dark":
            self.filter = DARK_FILTER
        if recipe.mode != "imager":
            self.lamps = ifs_lamps(recipe.kind, self.lamps)
        elif self.lamps is not None:
            raise ValueError(f"LAMPS is for IFS frames, not {self.obsname}")

    @property
    def recipe(self):
        return RECIPES[self.obsname]

    @property
    def night(self) -> str:
        return observing_night(self.start.strftime("%Y-%m-%d"), self.start.strftime("%H:%M:%S"))

    @property
    def filename(self) -> str:
        return frame_name(self.night, self.detector, self.obsname, self.exp_no)

    @property
    def duration(self) -> float:
        return self.nramps * self.nreads * self.read_time


@dataclass
class FrameFactory:
    """Builds frames of one simulation (seed, size): detectors and scenes are made once.

    ``optics`` selects the IFS model: "realistic" (default; the as-built instrument of
    :mod:`iris_tasks.simulate.ifs_optics`, with flexure per exposure unless ``flexure`` is
    False) or "ideal" (the design with the extraction's own Gaussian model, no flexure; for
    unit tests of solver mechanics). ``flexure_rms`` (px), ``flexure_drift`` (px/hour) and
    ``flexure_jumps`` (per night) shape the flexure (:func:`~.ifs_optics.flexure_at`).
    """

    size: int = 1024
    seed: int = 0
    nchan: int = 32
    detector_overrides: dict[str, Any] = field(default_factory=dict)
    optics: str = "realistic"
    flexure: bool = True
    flexure_rms: float = 0.1
    flexure_drift: float = 0.04
    flexure_jumps: float = 1.0
    # Physical units and the atmosphere for IFS science and telluric frames (realistic optics):
    # None keeps the older e-/s scene with its fixed absorption bands.
    atmosphere: Atmosphere | None = None
    _as_built: dict[tuple, AsBuiltIfs] = field(default_factory=dict, repr=False)
    _detectors: dict[str, DetectorModel] = field(default_factory=dict, repr=False)
    _stars: dict[str, StarField] = field(default_factory=dict, repr=False)
    _traces: dict[tuple, IfsTrace] = field(default_factory=dict, repr=False)
    _scenes: dict[tuple, IfsScene] = field(default_factory=dict, repr=False)
    _projected: dict[tuple, np.ndarray] = field(default_factory=dict, repr=False)

    def __post_init__(self) -> None:
        if self.optics not in IFS_OPTICS:
            raise ValueError(f"optics must be one of {', '.join(IFS_OPTICS)}, not {self.optics!r}")
        for name in ("flexure_rms", "flexure_drift", "flexure_jumps"):
            value = float(getattr(self, name))
            if not math.isfinite(value) or value < 0:
                raise ValueError(f"{name} must be finite and >= 0, not {value}")

    def detector(self, name: str) -> DetectorModel:
        if name not in self._detectors:
            self._detectors[name] = DetectorModel.for_detector(
                name, self.size, self.seed, nchan=self.nchan, **self.detector_overrides)
        return self._detectors[name]

    def stars(self, detector: str, filter_name: str = "Ks", pa: float = 0.0) -> StarField:
        """The star field seen by an imager detector (each detector sees its own patch).

        The stars are drawn in detector pixels (independent of PA, so PA = 0 keeps the same
        draw) and put on the sky with the nominal (undithered) pointing of the science field
        at position angle ``pa``: ``x``/``y`` are the zero-dither pixel positions and
        ``ra``/``dec`` the true sky positions, which every dither of the field then sees.
        """
        if detector not in self._stars:
            rng = np.random.default_rng(seed_sequence(self.seed, "stars", detector, self.size))
            self._stars[detector] = make_star_field(self.size, rng, filter_name=filter_name)
        base = self._stars[detector]
        crpix = reference_pixel((self.size, self.size), 1, 1)
        ra, dec = pixel_to_sky(base.x, base.y, TARGET_RA, TARGET_DEC, pa, crpix)
        placed = base.at(base.x, base.y)
        placed.ra, placed.dec = np.atleast_1d(ra), np.atleast_1d(dec)
        return placed

    def as_built(self, mode: str, scale: str, filter_name: str) -> AsBuiltIfs:
        """The realistic (as-built) IFS of a configuration (zero flexure)."""
        key = (mode, scale, filter_name)
        if key not in self._as_built:
            self._as_built[key] = build_as_built_ifs(mode, self.size, filter_name, scale, self.seed)
        return self._as_built[key]

    def trace(self, mode: str, scale: str, filter_name: str) -> IfsTrace:
        """Where the spectra land (zero flexure): the design (ideal) or the as-built geometry
        (realistic; truth, for scoring only)."""
        key = (mode, scale, filter_name)
        if key not in self._traces:
            if self.optics == "ideal":
                self._traces[key] = build_trace(mode, self.size, filter_name, scale, self.seed)
            else:
                self._traces[key] = as_built_trace(self.as_built(mode, scale, filter_name))
        return self._traces[key]

    def ifs_scene(self, mode: str, scale: str, filter_name: str) -> IfsScene:
        key = (mode, scale, filter_name)
        if key not in self._scenes:
            if self.optics == "ideal":
                self._scenes[key] = build_scene(self.trace(mode, scale, filter_name), self.seed)
            else:
                self._scenes[key] = build_realistic_scene(self.as_built(mode, scale, filter_name),
                                                          self.seed)
        return self._scenes[key]

    def ifs_truth(self, mode: str, scale: str, filter_name: str) -> IfsTruth:
        """The instrument the pipeline should measure (zero flexure), for scoring only."""
        if self.optics == "realistic":
            return as_built_truth(self.as_built(mode, scale, filter_name))
        tr = self.trace(mode, scale, filter_name)
        nw = tr.wavelength.size
        lsf_wave = np.linspace(tr.wavelength[0], tr.wavelength[-1], 16)
        ny_s, nx_s = tr.throughput.shape
        full = np.full((ny_s, nx_s, lsf_wave.size), np.nan)
        disp = float(tr.wavelength[1] - tr.wavelength[0]) if nw > 1 else np.nan
        return IfsTruth(optics="ideal", mode=tr.mode, scale=tr.scale, filter=tr.filter,
                        wavelength=np.array(tr.wavelength), trace_x=tr.trace_x.astype(np.float64),
                        trace_y=tr.trace_y.astype(np.float64),
                        dispersion_um_per_row=np.full(tr.trace_x.shape, disp), lsf_wave=lsf_wave,
                        psf_sigma_x=np.full_like(full, tr.psf_sigma), psf_sigma_y=full,
                        lsf_sigma_um=full, halo_fraction=0.0, halo_sigma_px=0.0,
                        throughput=tr.throughput.astype(np.float64),
                        parameters={"model": "design geometry, Gaussian PSFSIG in x, linear "
                                             "interpolation between rows in y (no LSF)"})

    def frame_flexure(self, spec: FrameSpec) -> Flexure:
        """The flexure of an IFS exposure (zero for ideal optics or ``flexure=False``), at the
        middle of the exposure, on the clock of its night's afternoon calibrations."""
        if self.optics == "ideal" or not self.flexure or spec.recipe.mode == "imager":
            return Flexure()
        t0 = (dt.datetime.fromisoformat(spec.night).replace(tzinfo=dt.UTC)
              + dt.timedelta(hours=FLEXURE_T0_LOCAL_HOUR - SITE_UTC_OFFSET_HOURS))
        hours = ((spec.start - t0).total_seconds() + 0.5 * spec.duration) / 3600.0
        return flexure_at(self.seed, spec.night, hours, rms_px=self.flexure_rms,
                          drift_px_per_hour=self.flexure_drift,
                          jumps_per_night=self.flexure_jumps,
                          exposure_key=f"{spec.obsname}-{spec.exp_no}")

    def _ifs_image(self, spec: FrameSpec, kind: str,
                   flexure: Flexure | None = None) -> np.ndarray:
        """Projected IFS illumination for a frame kind (cached: projection is the slow part)."""
        mode = spec.recipe.ifsmode
        flexure = flexure or Flexure()
        key = (mode, spec.ifsscale, spec.filter, kind, spec.lamps, flexure.key())
        if key not in self._projected:
            scene = self.ifs_scene(mode, spec.ifsscale, spec.filter)
            shape = (self.size, self.size)
            if self.optics == "ideal":
                image = project_cube(scene.trace, scene.cube(kind), shape)
            else:
                lamps = spec.lamps if kind == "arc" else None
                image = render(scene.optics, scene.components(kind, lamps=lamps), shape, flexure)
            if len(self._projected) >= 8:  # one night's frames each have their own flexure
                self._projected.pop(next(iter(self._projected)))
            self._projected[key] = image
        return self._projected[key]

    # ------------------------------------------------------------------ scene per frame
    def illumination(self, spec: FrameSpec) -> tuple[np.ndarray | None, dict]:
        """(e-/s per pixel before the flat, truth description) for ``spec``."""
        recipe = spec.recipe
        kind = recipe.kind
        det = self.detector(spec.detector)
        shape = det.shape
        if kind == "dark":
            return None, {"kind": "dark"}
        if recipe.mode == "imager":
            sky = sky_rate(spec.filter)
            if kind == "flat":
                level = flat_lamp_rate(spec.nreads, spec.read_time, gain=det.gain_nominal)
                return uniform_rate(shape, level), {"kind": "flat", "lamp_e_per_s": level}
            if kind == "sky":
                dx, dy = dither_offset(self.size, spec.dither_index)
                return uniform_rate(shape, sky), {"kind": "sky", "sky_e_per_s": sky,
                                                  "dither_px": [dx, dy]}
            ra0, dec0, _ = frame_pointing(spec, shape)
            crpix = reference_pixel(shape, 1, 1)
            pointing = {"ra_deg": ra0, "dec_deg": dec0, "pa_deg": spec.pa,
                        "crpix": list(crpix)}
            if kind == "science":
                dx, dy = dither_offset(self.size, spec.dither_index)
                field_ = self.stars(spec.detector, spec.filter, spec.pa)
                # Exact positions from the true RA/DEC through this frame's pointing (equal to
                # the zero-dither positions + (dx, dy) up to the TAN projection's curvature).
                x, y = sky_to_pixel(field_.ra, field_.dec, ra0, dec0, spec.pa, crpix)
                seen = field_.at(x, y)
                rate = seen.render(shape) + np.float32(sky)
                return rate, {"kind": "science", "sky_e_per_s": sky, "dither_px": [dx, dy],
                              "pointing": pointing, "stars": seen.to_json(),
                              **star_magnitudes(seen.flux, spec)}
            if kind == "telluric":
                c = (self.size - 1) / 2.0
                ra, dec = pixel_to_sky(c, c, ra0, dec0, spec.pa, crpix)
                extra: dict[str, Any] = {}
                flux = 2.0e4
                if self.atmosphere is not None or spec.standard is not None:
                    # the standard's magnitude through the filter and the frame's atmosphere
                    # (without the factory's atmosphere: airmass 1 unless given, its water)
                    spec = self.on_sky(spec)
                    spec = dataclasses.replace(
                        spec, airmass=1.0 if spec.airmass is None else spec.airmass,
                        pwv_mm=REFERENCE_PWV_MM if spec.pwv_mm is None else spec.pwv_mm)
                    flux = imager_star_rate(spec.standard, spec.filter, spec.airmass,
                                            spec.pwv_mm)
                    extra["atmosphere"] = {
                        "airmass": spec.airmass, "pwv_mm": spec.pwv_mm,
                        "standard": {**dataclasses.asdict(spec.standard),
                                     "teff_used": spec.standard.temperature},
                        "star_e_per_s": flux,
                        # magnitude giving 1 e-/s through this filter at this airmass
                        "zero_point_mag": spec.standard.mag + 2.5 * math.log10(flux)}
                star = StarField(x=[c], y=[c], flux=[flux], filter=spec.filter,
                                 ra=np.atleast_1d(ra), dec=np.atleast_1d(dec))
                rate = star.render(shape) + np.float32(sky)
                return rate, {"kind": "telluric", "sky_e_per_s": sky, "pointing": pointing,
                              "stars": star.to_json(), **extra}
            raise ValueError(f"no imager scene for {spec.obsname}")
        # IFS
        mode = recipe.ifsmode
        scene = self.ifs_scene(mode, spec.ifsscale, spec.filter)
        ifs_kind = {"engineering": "arc"}.get(kind, kind)
        flexure = self.frame_flexure(spec)
        info: dict[str, Any] = {"kind": kind, "ifs_cube_kind": ifs_kind, "ifsmode": mode,
                                "ifsscale": spec.ifsscale, "filter": spec.filter,
                                "ifs_optics": self.optics, "lamps": spec.lamps,
                                "flexure": flexure.to_json(self.size)}
        if (self.atmosphere is not None and self.optics == "realistic"
                and (ifs_kind in ("science", "telluric")
                     or (ifs_kind == "sky" and self.atmosphere.oh_variation))):
            return self._ifs_through_atmosphere(spec, scene, ifs_kind, flexure, info)
        if ifs_kind == "telluric" and spec.standard is not None:
            # a declared standard star (header STDSPTYP...): its spectrum through the
            # atmosphere at the frame's airmass, also without the factory's atmosphere
            if self.optics != "realistic":
                raise ValueError(f"{spec.filename}: an IFS standard star ({spec.standard.sptype}) "
                                 "needs the realistic optics; the ideal optics have only the "
                                 "scene's generic hot star (give no standard)")
            return self._ifs_through_atmosphere(spec, scene, ifs_kind, flexure, info)
        image = self._ifs_image(spec, ifs_kind, flexure)
        if ifs_kind in ("flat", "arc"):
            fill = IFS_LAMP_FILL_DN if ifs_kind == "flat" else IFS_ARC_FILL_DN
            level = fill * det.gain_nominal / (spec.nreads * spec.read_time) / max(float(image.max()), 1e-30)
            info["lamp_level"] = level
            return image * np.float32(level), info
        if ifs_kind == "science":
            info.update(source_xy_spaxels=list(scene.source_xy), line=list(scene.line),
                        continuum_e_per_s=scene.continuum_e_per_s)
        if ifs_kind == "telluric":
            info["telluric_xy_spaxels"] = list(scene.telluric_xy)
        return image, info

    def on_sky(self, spec: FrameSpec) -> FrameSpec:
        """``spec`` with the atmosphere's defaults filled in (airmass 1, the factory's water
        vapour and standard star) when the factory simulates the atmosphere, and for an imager
        standard with a star (whose count rate goes through the atmosphere also without the
        factory's: airmass 1, the reference water vapour) and likewise for an IFS standard
        given its star (:meth:`_ifs_through_atmosphere`), so that the header's AIRMASS is
        always the airmass the atmosphere was applied at."""
        if spec.recipe.kind not in ("science", "sky", "telluric"):
            return spec
        changes: dict[str, Any] = {}
        if self.atmosphere is None:
            if spec.recipe.kind == "telluric" and spec.standard is not None:
                if spec.airmass is None:
                    changes["airmass"] = 1.0
                if spec.pwv_mm is None:
                    changes["pwv_mm"] = REFERENCE_PWV_MM
            return dataclasses.replace(spec, **changes) if changes else spec
        if spec.airmass is None:
            changes["airmass"] = 1.0
        # the imager's star field and sky are count rates as detected, not put through the
        # atmosphere: no water vapour in their truth (the same frame with or without the
        # IFS's atmosphere, simulate_night's ifs_atmosphere)
        through = spec.recipe.mode != "imager" or spec.recipe.kind == "telluric"
        if spec.pwv_mm is None and through:
            changes["pwv_mm"] = self.atmosphere.pwv_mm
        if spec.recipe.kind == "telluric" and spec.standard is None:
            changes["standard"] = self.atmosphere.standard
        return dataclasses.replace(spec, **changes) if changes else spec

    def _ifs_through_atmosphere(self, spec: FrameSpec, scene: IfsScene, kind: str,
                                flexure: Flexure, info: dict) -> tuple[np.ndarray, dict]:
        """A science or telluric IFS frame in physical units through the atmosphere at the
        frame's own airmass (not cached: every frame has its own conditions). Without the
        factory's atmosphere (an IFS standard given its star), the default one: no OH
        variation, the water vapour of ``spec`` (:meth:`on_sky`: the reference's unless given)."""
        spec = self.on_sky(spec)
        atmosphere = self.atmosphere or Atmosphere()
        base = scene.components(kind)
        edges = scene.spectra.band_edges
        source = atmosphere.source
        if kind == "sky":
            spatial, sky = None, base
        else:
            spatial, sky = base[0].spatial, base[1:]
        if atmosphere.oh_variation:
            # the airglow at the middle of this exposure (the OH lines are the last component)
            hours = (spec.start.timestamp() + 0.5 * spec.duration) / 3600.0
            lines = sky[-1]
            factors = atmosphere.oh_factors(lines.line_um, hours, self.seed)
            sky = [*sky[:-1], dataclasses.replace(lines, line_flux=lines.line_flux * factors)]
            info["oh_factors"] = {"hours": hours, "median": float(np.median(factors)),
                                  "min": float(factors.min()), "max": float(factors.max())}
        if kind == "sky":
            image = render(scene.optics, sky, (self.size, self.size), flexure)
            return image, info
        comps = ifs_components(kind, spatial, edges, sky, airmass=spec.airmass,
                               pwv_mm=spec.pwv_mm, standard=spec.standard, source=source)
        image = render(scene.optics, comps, (self.size, self.size), flexure)
        info["atmosphere"] = truth_record(kind, edges, airmass=spec.airmass, pwv_mm=spec.pwv_mm,
                                          standard=spec.standard, source=source)
        if kind == "science":
            info["source_xy_spaxels"] = list(scene.source_xy)
        else:
            info["telluric_xy_spaxels"] = list(scene.telluric_xy)
        return image, info

    # ------------------------------------------------------------------ one frame
    def make(self, spec: FrameSpec, progress: ProgressFn | None = None, *,
             noise: bool | Iterable[str] = True, cosmic_rays: bool = True):
        """Simulate ``spec``: returns (RampModel, truth dict).

        ``noise`` and ``cosmic_rays`` are passed to :func:`simulate_ramp` (``noise=False,
        cosmic_rays=False`` gives the expected frame, for tests).
        """
        spec = self.on_sky(spec)
        det = self.detector(spec.detector)
        rate, scene_info = self.illumination(spec)
        flat = det.flat(spec.filter) if rate is not None else None
        rng = np.random.default_rng(seed_sequence(self.seed, "frame", spec.detector, spec.obsname,
                                                  spec.exp_no, self.size))
        reads, sim_truth = simulate_ramp(det, rate, spec.nreads, spec.read_time, spec.nramps, rng,
                                         cosmic_rays, flat=flat, noise=noise, progress=progress)
        model = ramp_model(reads, spec, det)
        cr = sim_truth["cosmic_rays"]
        truth = {
            "file": spec.filename, "detector": spec.detector, "det_id": det.det_id,
            "obsname": spec.obsname, "obstype": spec.recipe.obstype, "kind": spec.recipe.kind,
            "exp_no": spec.exp_no, "filter": spec.filter, "ifsmode": spec.recipe.ifsmode,
            "ifsscale": spec.ifsscale, "sampmode": spec.sampmode, "nreads": spec.nreads,
            "nramps": spec.nramps, "read_time_s": spec.read_time, "pa_deg": spec.pa,
            "date_obs": model.meta.observation.date, "time_obs": model.meta.observation.time,
            # header AIRMASS (None off the sky); pwv_mm where the atmosphere was simulated
            "airmass": spec.airmass, "pwv_mm": spec.pwv_mm,
            "seed": self.seed, "size": self.size,
            "scene": scene_info,
            "flexure": scene_info.get("flexure"),
            "lamps": spec.lamps,
            "flat_applied": None if flat is None else f"FLAT_{spec.filter.upper()}",
            "dark_current_applied": True,
            "n_pixels_normal_approx": sim_truth["n_normal_approx"],
            "cosmic_rays": {
                "rate_per_cm2_s": det.cr_rate, "n_events": int(cr["x"].size),
                "columns": ["ramp", "read", "y", "x", "time_s", "electrons"],
                "rows": [[int(r), int(k), int(y), int(x), round(float(t), 4), round(float(e), 2)]
                         for r, k, y, x, t, e in zip(cr["ramp"], cr["read"], cr["y"], cr["x"],
                                                     cr["time_s"], cr["electrons"], strict=True)],
            },
        }
        return model, truth


def star_magnitudes(flux_e_per_s: np.ndarray, spec: FrameSpec) -> dict[str, Any]:
    """Truth (scoring only) for an imager science frame's stars: each star's Vega magnitude
    in the filter's band, were it A0V-coloured (the imager standards' type), such that the
    simulator's bandpass and atmosphere at this frame's AIRMASS (the reference water vapour
    unless given) give its count rate. The star field is defined by its detected rates, so
    these magnitudes belong to this frame's airmass. Empty without an airmass or a bandpass
    for the filter."""
    if spec.airmass is None or spec.filter not in IMAGER_BANDPASS:
        return {}
    try:
        band = filter_band(spec.filter)
    except ValueError:
        return {}
    pwv = REFERENCE_PWV_MM if spec.pwv_mm is None else spec.pwv_mm
    zero_point = 2.5 * math.log10(imager_star_rate(TelluricStandard(mag=0.0, band=band),
                                                   spec.filter, spec.airmass, pwv))
    mags = zero_point - 2.5 * np.log10(np.asarray(flux_e_per_s, np.float64))
    return {"vega_mag": {"band": band, "airmass": spec.airmass, "pwv_mm": pwv,
                         "zero_point_mag": zero_point,  # the magnitude giving 1 e-/s
                         "mag": [round(float(m), 6) for m in mags],
                         "meaning": "A0V-coloured stars: the Vega magnitude whose light "
                                    "through the simulator's bandpass and atmosphere at "
                                    "this airmass gives each star's e-/s"}}


def ramp_model(reads: np.ndarray, spec: FrameSpec, det: DetectorModel):
    """A RampModel with the full IRIS raw header for ``spec``."""
    from ..datamodels import RampModel

    recipe = spec.recipe
    model = RampModel(data=reads)
    meta = model.meta
    meta.night = spec.night
    ins = meta.instrument
    ins.name = "IRIS"
    ins.detector = spec.detector
    ins.det_id = det.det_id
    ins.filter = spec.filter
    ins.ifsmode = recipe.ifsmode
    ins.ifsscale = spec.ifsscale if recipe.mode != "imager" else "N/A"
    if spec.lamps is not None:
        ins.lamps = spec.lamps
    obs = meta.observation
    obs.obstype = recipe.obstype
    obs.obsname = spec.obsname
    obs.obs_id = f"{spec.night}-{spec.detector}-{spec.obsname}-{spec.exp_no:04d}"
    obs.exp_no = int(spec.exp_no)
    obs.ramp_no = 0
    obs.date = spec.start.strftime("%Y-%m-%d")
    obs.time = spec.start.strftime("%H:%M:%S.%f")[:-3]
    obs.mjd = round(mjd(spec.start), 8)
    ra, dec, target = frame_pointing(spec, det.shape)
    obs.target = target
    if spec.airmass is not None:
        obs.airmass = float(spec.airmass)
    if spec.standard is not None and recipe.kind == "telluric":
        std = meta.standard
        std.sptype = spec.standard.sptype
        std.teff = spec.standard.temperature
        std.mag = float(spec.standard.mag)
        std.band = spec.standard.band
    meta.pointing.ra = ra
    meta.pointing.dec = dec
    meta.pointing.pa = float(spec.pa)
    exp = meta.exposure
    exp.sampmode = spec.sampmode
    exp.readpatt = readpatt(spec.sampmode, spec.nreads)
    exp.nreads = int(spec.nreads)
    exp.nramps = int(spec.nramps)
    if spec.sampmode == "MCDS":
        exp.nfowler = int(spec.nfowler)
    exp.read_time = float(spec.read_time)
    exp.exposure_time = float(exposure_time(spec.sampmode, spec.nreads, spec.read_time, spec.nfowler))
    exp.gain = det.gain_nominal
    sub = meta.subarray
    # The simulated array is a whole (possibly scaled-down) detector with its reference border,
    # not a window of a 4096x4096 one: it is FULL and starts at (1, 1).
    sub.name = "FULL"
    sub.xstart = 1
    sub.ystart = 1
    sub.xsize = int(reads.shape[3])
    sub.ysize = int(reads.shape[2])
    return model


def frame_pointing(spec: FrameSpec, shape: tuple[int, int]) -> tuple[float, float, str]:
    """(RA, DEC, TARGNAME) of a frame: the sky position at the reduction's reference pixel.

    At zero dither the science field's pointing is (TARGET_RA, TARGET_DEC). A dither moves the
    stars by (+dx, +dy) detector pixels, whatever the PA, so the pointing moves the other way
    along the rotated axes (computed exactly through the TAN projection, see sky.py). Values
    are not rounded: 1e-7 deg is already 0.09 pixel.
    """
    kind = spec.recipe.kind
    if kind == "telluric":
        return TELLURIC_RA, TELLURIC_DEC, "SIM-A0V-STANDARD"
    ra, dec = TARGET_RA, TARGET_DEC
    target = {"dark": "DARK", "flat": "DOMEFLAT", "engineering": "ARC"}.get(kind, "SIMFIELD")
    if kind in ("science", "sky") and spec.recipe.mode == "imager":
        dx, dy = dither_offset(shape[1], spec.dither_index)
        ra, dec = dithered_pointing(ra, dec, spec.pa, reference_pixel(shape, 1, 1), dx, dy)
    if kind == "sky":
        dec += SKY_OFFSET_ARCSEC / 3600.0
        target = "SIMFIELD-SKY"
    return float(ra % 360.0), float(dec), target


def write_atomic(model, path: str | os.PathLike) -> Path:
    """Save ``model`` to ``path`` so the file appears complete or not at all.

    It is written to a hidden temporary file in the same directory and renamed into place,
    so a watcher on a landing area never sees a partial frame; FILENAME is the final name.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    model.meta.filename = path.name
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".part", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as fh:
            # A file object (not a name) keeps on_save from replacing FILENAME with the
            # temporary name.
            model.to_fits(fh, overwrite=True)
        # mkstemp creates 0600; give the file the permissions a plain open() would have, so
        # services running as other users can read the landing area.
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(tmp, 0o666 & ~umask)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return path
