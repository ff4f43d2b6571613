"""One raw IRIS frame: what it looks at (scene by OBSNAME), its header, and writing it.

:class:`FrameFactory` holds the detectors, star fields, IFS traces and scenes of one
simulation (one seed, one array size) and turns a :class:`FrameSpec` into a RampModel plus a
JSON-able truth record. ``simulate_night`` and the single-frame CLI both go through it, so a
frame simulated alone is the same frame the night would contain.
"""

from __future__ import annotations

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

from ..metadata import RECIPES, observing_night, readpatt
from .detector import DEFAULT_READ_TIME, DetectorModel, ProgressFn, seed_sequence, simulate_ramp
from .ifs import IfsScene, IfsTrace, build_scene, build_trace, project_cube
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

    def __post_init__(self) -> None:
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
    """Builds frames of one simulation (seed, size): detectors and scenes are made once."""

    size: int = 1024
    seed: int = 0
    nchan: int = 32
    detector_overrides: dict[str, Any] = field(default_factory=dict)
    _detectors: dict[str, DetectorModel] = field(default_factory=dict, repr=False)
    _stars: dict[str, StarField] = field(default_factory=dict, repr=False)
    _traces: dict[tuple, IfsTrace] = field(default_factory=dict, repr=False)
    _scenes: dict[tuple, IfsScene] = field(default_factory=dict, repr=False)
    _projected: dict[tuple, np.ndarray] = field(default_factory=dict, repr=False)

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

    def trace(self, mode: str, scale: str, filter_name: str) -> IfsTrace:
        key = (mode, scale, filter_name)
        if key not in self._traces:
            self._traces[key] = build_trace(mode, self.size, filter_name, scale, self.seed)
        return self._traces[key]

    def ifs_scene(self, mode: str, scale: str, filter_name: str) -> IfsScene:
        key = (mode, scale, filter_name)
        if key not in self._scenes:
            self._scenes[key] = build_scene(self.trace(mode, scale, filter_name), self.seed)
        return self._scenes[key]

    def _ifs_image(self, spec: FrameSpec, kind: str) -> np.ndarray:
        """Projected IFS illumination for a frame kind (cached: projection is the slow part)."""
        mode = spec.recipe.ifsmode
        key = (mode, spec.ifsscale, spec.filter, kind)
        if key not in self._projected:
            scene = self.ifs_scene(mode, spec.ifsscale, spec.filter)
            self._projected[key] = project_cube(scene.trace, scene.cube(kind), (self.size, self.size))
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
                              "pointing": pointing, "stars": seen.to_json()}
            if kind == "telluric":
                c = (self.size - 1) / 2.0
                ra, dec = pixel_to_sky(c, c, ra0, dec0, spec.pa, crpix)
                star = StarField(x=[c], y=[c], flux=[2.0e4], filter=spec.filter,
                                 ra=np.atleast_1d(ra), dec=np.atleast_1d(dec))
                rate = star.render(shape) + np.float32(sky)
                return rate, {"kind": "telluric", "sky_e_per_s": sky, "pointing": pointing,
                              "stars": star.to_json()}
            raise ValueError(f"no imager scene for {spec.obsname}")
        # IFS
        mode = recipe.ifsmode
        scene = self.ifs_scene(mode, spec.ifsscale, spec.filter)
        ifs_kind = {"engineering": "arc"}.get(kind, kind)
        info: dict[str, Any] = {"kind": kind, "ifs_cube_kind": ifs_kind, "ifsmode": mode,
                                "ifsscale": spec.ifsscale, "filter": spec.filter}
        image = self._ifs_image(spec, ifs_kind)
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

    # ------------------------------------------------------------------ one frame
    def make(self, spec: FrameSpec, progress: ProgressFn | None = None, *,
             noise: bool | Iterable[str] = True, cosmic_rays: bool = True):
        """Simulate ``spec``: returns (RampModel, truth dict).

        ``noise`` and ``cosmic_rays`` are passed to :func:`simulate_ramp` (``noise=False,
        cosmic_rays=False`` gives the expected frame, for tests).
        """
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
            "seed": self.seed, "size": self.size,
            "scene": scene_info,
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
