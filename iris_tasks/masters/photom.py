"""Photom reference: an imager standard star's frame (IMG1-TEL ``_cal``) -> ``photom``.

The standard is reduced like any imager frame (``iris_image2``: dark, flat, sky; the
``photom`` step leaves a standard in its count-rate unit) and then, here, its count rate is
measured in a photutils aperture (:func:`iris_tasks.steps.photom.measure_zero_point`) against
its Vega magnitude STDMAG, which must be in the filter's band (STDMAGBD). The result is one
reference per DETECTOR/FILTER and standard: PHOTZP (the Vega magnitude of 1 count/s of the
flat-fielded frame), PHOTZPER, PHOTMJSR (MJy/sr per count/s per pixel), TELAIRM (the
standard's airmass; no extinction correction is applied), USEAFTER = the standard's exposure
start, QA_SNR (the star's S/N).

A frame that cannot give a zero point (not IMG1-TEL, not flat-fielded, already calibrated,
STDMAG missing or in another band, no star, a saturated star) raises
:class:`~iris_tasks.masters.common.MasterBuildError` naming the file and the reason.
"""

from __future__ import annotations

import logging
import math
import os
from dataclasses import dataclass, field
from pathlib import Path

from ..datamodels import ImageModel, PhotomModel
from ..instrument.standards import filter_band
from ..steps.assign_wcs import IMAGER_PIXEL_SCALE_MAS
from ..steps.photom import ZeroPointError, measure_zero_point, photmjsr_from_zero_point
from .common import MasterBuildError, save_master

log = logging.getLogger(__name__)

__all__ = ["IMAGER_STANDARD_OBSNAMES", "MasterPhotom", "build_photom", "photom_filename",
           "save_photom"]

IMAGER_STANDARD_OBSNAMES = ("IMG1-TEL",)


@dataclass
class MasterPhotom:
    """A built photom reference and its QA numbers."""

    model: PhotomModel
    frame: str
    qa: dict[str, float] = field(default_factory=dict)


def build_photom(frame: str | os.PathLike | ImageModel, *, radius: float = 30.0,
                 min_snr: float = 50.0, author: str = "iris_tasks.masters") -> MasterPhotom:
    """The ``photom`` reference from a standard star's flat-fielded frame (path or model).

    ``radius`` (pixels) must take the whole PSF (no aperture correction); a star below
    ``min_snr`` is "no star".
    """
    owned = not isinstance(frame, ImageModel)
    model = ImageModel(os.fspath(frame)) if owned else frame
    label = os.path.basename(str(frame if owned else (model.meta.filename or "standard frame")))
    try:
        return _build(model, label, radius, min_snr, author)
    finally:
        if owned:
            model.close()


def _build(frame: ImageModel, label: str, radius: float, min_snr: float,
           author: str) -> MasterPhotom:
    obsname = str(frame.meta.observation.obsname or "")
    if obsname not in IMAGER_STANDARD_OBSNAMES:
        raise MasterBuildError(f"{label}: OBSNAME={obsname or 'missing'} is not an imager "
                               f"standard ({', '.join(IMAGER_STANDARD_OBSNAMES)})")
    steps = frame.meta.cal_step
    if steps.flat_field != "COMPLETE":
        raise MasterBuildError(f"{label}: not flat-fielded (S_FLAT={steps.flat_field}); the zero "
                               "point must be measured on a frame calibrated like the science "
                               "(reduce it with iris_image2)")
    if steps.photom == "COMPLETE":
        raise MasterBuildError(f"{label}: already flux-calibrated (S_PHOTOM=COMPLETE)")
    std, filt = frame.meta.standard, str(frame.meta.instrument.filter or "")
    try:
        band = filter_band(filt)
    except ValueError as exc:
        raise MasterBuildError(f"{label}: {exc}") from None
    if std.mag is None or not math.isfinite(float(std.mag)):
        raise MasterBuildError(f"{label}: the standard's magnitude (STDMAG) is missing")
    if not std.band:
        raise MasterBuildError(f"{label}: the band of the standard's magnitude (STDMAGBD) is "
                               "missing")
    try:
        given = filter_band(std.band)
    except ValueError:
        given = str(std.band)
    if given != band:
        raise MasterBuildError(f"{label}: mismatched filter: the standard's magnitude is in "
                               f"{std.band} but the frame is {filt} (needs a {band} magnitude)")
    try:
        zp = measure_zero_point(frame.data, frame.err, frame.dq, float(std.mag), radius=radius,
                                min_snr=min_snr)
    except ZeroPointError as exc:
        raise MasterBuildError(f"{label}: {exc}") from None
    pixel_arcsec = IMAGER_PIXEL_SCALE_MAS / 1000.0

    ref = PhotomModel()
    meta, src = ref.meta, frame.meta
    meta.instrument.name = "IRIS"
    for key in ("detector", "det_id", "filter"):
        setattr(meta.instrument, key, getattr(src.instrument, key))
    obs = src.observation
    for key in ("obsname", "obs_id", "date", "time", "mjd", "target", "airmass"):
        setattr(meta.observation, key, getattr(obs, key))
    meta.standard.mag, meta.standard.band = float(std.mag), band
    meta.standard.sptype = std.sptype
    meta.telluric.airmass = obs.airmass
    phot = meta.photometry
    phot.zero_point, phot.zero_point_err = round(zp.zp, 5), round(zp.zp_err, 5)
    # from PHOTZP as written: the conversion the photom step applies from this reference
    phot.photmjsr = photmjsr_from_zero_point(phot.zero_point, band, pixel_arcsec)
    phot.pixel_area_arcsec2 = pixel_arcsec**2
    phot.standard = label
    meta.star_snr = round(zp.snr, 2)
    meta.star_x, meta.star_y = round(zp.x, 3), round(zp.y, 3)
    meta.star_rate = zp.rate
    meta.aperture_radius = zp.radius
    meta.night = src.night
    meta.reftype = "PHOTOM"
    meta.useafter = f"{obs.date}T{str(obs.time or '00:00:00')[:8]}"
    meta.pedigree = f"INFLIGHT {obs.date} {obs.date}"
    meta.author = author
    meta.description = (f"Imager zero point {src.instrument.detector} {filt} from standard "
                        f"{obs.target or ''} {band}={float(std.mag):g} at airmass {obs.airmass}")
    meta.provenance.parents = label
    if obs.airmass is None:
        log.warning("%s: no AIRMASS in the header: the zero point's airmass is unknown", label)
    log.info("%s: zero point %.4f +- %.4f mag (%s %s=%.2f, airmass %s, S/N %.0f)", label,
             zp.zp, zp.zp_err, filt, band, float(std.mag), obs.airmass, zp.snr)
    qa = {"zero_point": zp.zp, "zp_err": zp.zp_err, "star_snr": zp.snr, "star_x": zp.x,
          "star_y": zp.y}
    return MasterPhotom(model=ref, frame=label, qa=qa)


def photom_filename(master: MasterPhotom) -> str:
    """``iris_<detector>_<filter>_<standard's start>_photom.fits`` (the exposure start, not
    USEAFTER, which the nightly build may move to the night's start)."""
    m = master.model.meta
    start = f"{m.observation.date}T{str(m.observation.time or '00:00:00')[:8]}" \
        if m.observation.date else m.useafter
    when = str(start or "unknown").replace("-", "").replace(":", "")
    return f"iris_{m.instrument.detector}_{m.instrument.filter}_{when}_photom.fits".lower()


def save_photom(master: MasterPhotom, out_dir: str | os.PathLike) -> Path:
    return save_master(master.model, out_dir, photom_filename(master))

