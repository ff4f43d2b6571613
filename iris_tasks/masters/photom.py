"""Photom reference: an imager standard star's frame (IMG1-TEL ``_cal``) -> ``photom``.

The standard is reduced like any imager frame (``iris_image2``: dark, flat, sky; the
``photom`` step leaves a standard in its count-rate unit) and then, here, its count rate is
measured in a photutils aperture (:func:`iris_tasks.steps.photom.measure_zero_point`) against
its Vega magnitude STDMAG, which must be in the filter's band (STDMAGBD). The result is one
reference per DETECTOR/FILTER and standard: PHOTZP (the Vega magnitude of 1 count/s of the
flat-fielded frame, at the standard's airmass), PHOTZPER, PHOTMJSR (MJy/sr per count/s per
pixel), TELAIRM and PHOTSTAM (the standard's airmass), PHOTEXT (extinction, mag per airmass:
the band's Maunakea value, or the night's own where :func:`night_extinction` fitted it from
standards at several airmasses; PHOTEXTS says which), PHOTZP1 (PHOTZP brought to airmass 1),
USEAFTER = the standard's exposure start, QA_SNR (the star's S/N).

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
from ..instrument.standards import EXTINCTION_SOURCE, extinction_coefficient, filter_band
from ..steps.assign_wcs import IMAGER_PIXEL_SCALE_MAS
from ..steps.photom import (
    ZeroPointError,
    fit_extinction,
    measure_zero_point,
    photmjsr_from_zero_point,
)
from .common import MasterBuildError, save_master

log = logging.getLogger(__name__)

__all__ = ["IMAGER_STANDARD_OBSNAMES", "MasterPhotom", "build_photom", "night_extinction",
           "photom_filename", "save_photom", "set_extinction"]

# A night's own extinction fit replaces the table value only when its standards span at least
# this much airmass and the fitted k is this well determined and physical (mag per airmass).
MIN_AIRMASS_SPAN = 0.3
MAX_K_ERR = 0.02
K_RANGE = (-0.02, 0.5)

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
    phot.standard_airmass = obs.airmass
    set_extinction(ref, extinction_coefficient(band), EXTINCTION_SOURCE)
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


def set_extinction(ref: PhotomModel, k: float, source: str) -> None:
    """Record extinction ``k`` (mag per airmass) and where it comes from in a zero point, and
    PHOTZP1 = PHOTZP + k (TELAIRM - 1) (none without the standard's airmass)."""
    phot = ref.meta.photometry
    phot.extinction, phot.extinction_source = round(float(k), 5), source
    x = ref.meta.telluric.airmass
    phot.zero_point_airmass1 = (round(float(phot.zero_point) + float(k) * (float(x) - 1.0), 5)
                                if x is not None else None)


def night_extinction(masters: list[MasterPhotom]) -> float | None:
    """The night's own extinction from its standards of one DETECTOR/FILTER (zero point against
    airmass, :func:`iris_tasks.steps.photom.fit_extinction`), written into each of them
    (PHOTEXT, PHOTEXTS "night fit ...", PHOTZP1) when they span >= MIN_AIRMASS_SPAN airmass and
    the fit gives k within K_RANGE to MAX_K_ERR; else None, and they keep the table value."""
    usable = [m for m in masters if m.model.meta.telluric.airmass is not None]
    if len(usable) < 2:
        return None
    x = [float(m.model.meta.telluric.airmass) for m in usable]
    if max(x) - min(x) < MIN_AIRMASS_SPAN:
        log.info("extinction: the night's %d standards span airmass %.2f-%.2f (< %.2f): the "
                 "table value stays", len(usable), min(x), max(x), MIN_AIRMASS_SPAN)
        return None
    phot = [m.model.meta.photometry for m in usable]
    fit = fit_extinction([p.zero_point for p in phot], [p.zero_point_err for p in phot], x)
    if not (K_RANGE[0] <= fit.k <= K_RANGE[1] and fit.k_err <= MAX_K_ERR):
        log.warning("extinction: the night's fit k = %.3f +- %.3f mag/airmass from %d standards "
                    "(airmass %.2f-%.2f) is not usable (clouds?); the table value stays",
                    fit.k, fit.k_err, fit.n, *fit.airmass_range)
        return None
    source = (f"night fit: {fit.n} standards, X {fit.airmass_range[0]:.2f}-"
              f"{fit.airmass_range[1]:.2f}, err {fit.k_err:.3f}")
    for m in usable:
        set_extinction(m.model, fit.k, source)
        m.qa["extinction"] = fit.k
    log.info("extinction %s: k = %.4f +- %.4f mag/airmass from %d standards at airmass "
             "%.2f-%.2f", usable[0].model.meta.instrument.filter, fit.k, fit.k_err, fit.n,
             *fit.airmass_range)
    return fit.k


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

