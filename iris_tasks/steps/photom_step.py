"""PhotomStep (``photom``): an imager ``_cal`` frame in MJy/sr from a standard star (S_PHOTOM).

The zero point (PHOTZP, the Vega magnitude of 1 count/s of the flat-fielded frame) comes, in
this order, from ``zero_point``; from the IMG1-TEL frame (flat-fielded like the science,
``_cal``) of the science frame's DETECTOR and FILTER nearest in time among
``standard_files``, measured with photutils apertures
(:func:`iris_tasks.steps.photom.measure_zero_point`) against the standard's header magnitude
STDMAG in band STDMAGBD; else from the ``photom`` reference (``override_photom`` or CRDS: the
night's latest standard of this DETECTOR/FILTER before the exposure, built by
:func:`iris_tasks.masters.photom.build_photom`). SCI and ERR are multiplied by PHOTMJSR
(MJy/sr per count/s per pixel, the JWST keyword), the variances by its square; PHOTZP,
PHOTSTD, PIXAR_A2, BUNIT = MJy/sr and R_PHOTOM are recorded.

Extinction: the standard's zero point is brought from its airmass (PHOTSTAM/TELAIRM) to the
frame's (AIRMASS): ZP = ZP_std - k (AIRMASS - PHOTSTAM), k the reference's PHOTEXT (the
night's fit or the band's Maunakea value), else ``extinction``, else the table
(:func:`iris_tasks.instrument.standards.extinction_coefficient`). Recorded: PHOTZP (at the
frame's airmass), PHOTZP1, PHOTEXT, PHOTEXTS, PHOTSTAM, PHOTXCOR (the correction, mag).
Without either airmass, or with ``correct_extinction`` off, the zero point is applied as
measured (PHOTXCOR = 0, a warning). A ``zero_point`` given is taken as the frame's own.

Without a zero point (no standard, no reference in CRDS, a context older than the ``photom``
type, a standard that gives none: no star, saturated, magnitude in another band), the step is
SKIPPED with a warning naming the file and the frame keeps its unit - the frame still reduces.
A standard's own frame (IMG1-TEL) is left as it is, so the nightly build measures it in its
count-rate unit; ``iris_image2`` runs the step last, after ``assign_wcs`` (JWST's order).
"""

from __future__ import annotations

import logging
import os
from typing import ClassVar

import numpy as np

from ..datamodels import ImageModel, PhotomModel
from ..instrument.standards import EXTINCTION_SOURCE, extinction_coefficient, filter_band
from ..metadata import parse_obs_datetime
from .assign_wcs import IMAGER_PIXEL_SCALE_MAS
from .base import IrisStep
from .photom import measure_zero_point, photmjsr_from_zero_point, zero_point_at_airmass

log = logging.getLogger(__name__)

__all__ = ["PhotomStep"]

IMAGER_STANDARD_OBSNAMES = ("IMG1-TEL",)  # = iris_tasks.masters.photom.IMAGER_STANDARD_OBSNAMES


def _when(model: ImageModel):
    obs = model.meta.observation
    return parse_obs_datetime(obs.date, obs.time or "00:00:00") if obs.date else None


class PhotomStep(IrisStep):
    """Flux calibration of an imager frame from a photometric standard."""

    class_alias = "photom"
    cal_step = "photom"
    reference_file_types: ClassVar[list[str]] = ["photom"]

    spec = """
    standard_files = force_list(default=None)  # IMG1-TEL _cal frames; the one of this DETECTOR/FILTER nearest in time gives the zero point
    zero_point = float(default=None)  # or the zero point itself (Vega magnitude of 1 count/s)
    radius = float(default=30.0)  # aperture radius (pixels) for the standard: the whole PSF
    correct_extinction = boolean(default=True)  # bring the standard's zero point to the frame's airmass
    extinction = float(default=None)  # mag per airmass; default: the reference's PHOTEXT, else the band's Maunakea value
    """  # noqa: E501

    def process(self, step_input):
        model = self.prepare_input(step_input)
        if not isinstance(model, ImageModel):
            raise TypeError(f"{self.name}: expected an ImageModel (_cal), got {type(model).__name__}")
        name = model.meta.filename or "frame"
        if str(model.meta.observation.obsname or "") in IMAGER_STANDARD_OBSNAMES:
            log.info("%s: %s is a photometric standard: left in its unit for the zero point",
                     self.name, name)
            return self._skip(model)
        if model.meta.cal_step.photom == "COMPLETE":
            log.warning("%s: %s is already flux-calibrated; left as it is", self.name, name)
            return self._skip(model)
        filt = str(model.meta.instrument.filter or "")
        band = filter_band(filt)
        zp, source = self.zero_point, "given"
        at: tuple[float | None, float | None, str | None] = (None, None, None)
        if zp is None and not self.standard_files:
            zp, source, at = self._reference_zero_point(model)
            if zp is None:
                log.warning("%s: %s: no photom reference applies to DETECTOR=%s FILTER=%s (%s); "
                            "the frame keeps its unit (%s)", self.name, name,
                            model.meta.instrument.detector, filt, source,
                            model.meta.bunit_data or "DN/s")
                return self._skip(model)
        elif zp is None:
            chosen = self._nearest_standard(model)
            if chosen is None:
                log.warning("%s: %s: no zero point given and no standard of DETECTOR=%s FILTER=%s "
                            "among %d file(s); the frame keeps its unit (%s)", self.name, name,
                            model.meta.instrument.detector, filt, len(self.standard_files or []),
                            model.meta.bunit_data or "DN/s")
                return self._skip(model)
            try:
                (zp, x_std), source = self._measure(chosen, band), os.path.basename(chosen)
            except ValueError as exc:
                log.warning("%s: %s: no zero point: %s; the frame keeps its unit", self.name,
                            name, exc)
                return self._skip(model)
            at = (x_std, None, None)
        if self.zero_point is None:
            zp = self._extinction(model, float(zp), *at, band)
        conv = photmjsr_from_zero_point(zp, band, IMAGER_PIXEL_SCALE_MAS / 1000.0)
        model.data = (np.asarray(model.data, np.float64) * conv).astype(np.float32)
        model.err = (np.asarray(model.err, np.float64) * conv).astype(np.float32)
        for ext in ("var_poisson", "var_rnoise"):
            arr = getattr(model, ext, None)
            if arr is not None and np.size(arr):
                setattr(model, ext, (np.asarray(arr, np.float64) * conv**2).astype(np.float32))
        model.meta.bunit_data = model.meta.bunit_err = "MJy/sr"
        phot = model.meta.photometry
        phot.photmjsr, phot.zero_point, phot.standard = conv, float(zp), source
        phot.pixel_area_arcsec2 = (IMAGER_PIXEL_SCALE_MAS / 1000.0) ** 2
        log.info("%s: %s: zero point %.4f (%s) -> PHOTMJSR %.4g MJy/sr per count/s", self.name,
                 name, zp, source, conv)
        return model

    def _extinction(self, model: ImageModel, zp_std: float, x_std: float | None,
                    k_ref: float | None, k_source: str | None, band: str) -> float:
        """The zero point at the frame's airmass from the standard's (recorded in ``model``)."""
        phot, x = model.meta.photometry, model.meta.observation.airmass
        if self.extinction is not None:
            k, k_source = float(self.extinction), "given (photom.extinction)"
        elif k_ref is not None:
            k, k_source = float(k_ref), k_source or "the photom reference"
        else:
            k, k_source = extinction_coefficient(band), EXTINCTION_SOURCE
        phot.extinction, phot.extinction_source, phot.standard_airmass = k, k_source, x_std
        if x_std is not None:
            phot.zero_point_airmass1 = zero_point_at_airmass(zp_std, x_std, 1.0, k)
        if not self.correct_extinction or x is None or x_std is None:
            if self.correct_extinction:
                log.warning("%s: %s: the %s airmass is unknown (%s missing): the zero point is "
                            "applied as measured at the standard's airmass, without extinction "
                            "correction", self.name, model.meta.filename or "frame",
                            "frame's" if x is None else "standard's",
                            "AIRMASS" if x is None else "PHOTSTAM/TELAIRM")
            phot.extinction_correction = 0.0
            return zp_std
        zp = zero_point_at_airmass(zp_std, x_std, x, k)
        phot.extinction_correction = round(zp - zp_std, 6)
        log.info("%s: extinction %.3f mag/airmass (%s): standard at airmass %.3f, frame at "
                 "%.3f: zero point %+.4f mag", self.name, k, k_source, x_std, x, zp - zp_std)
        return zp

    def _skip(self, model: ImageModel) -> ImageModel:
        model.meta.cal_step.photom = "SKIPPED"
        return model

    def _reference_zero_point(self, model: ImageModel
                              ) -> tuple[float | None, str,
                                         tuple[float | None, float | None, str | None]]:
        """(PHOTZP, the reference's name, (its standard's airmass, PHOTEXT, PHOTEXTS)) of the
        ``photom`` reference for ``model``, or (None, why there is none, ...). A reference
        from before PHOTEXT (2026-12-07) has TELAIRM only: the table's k applies to it."""
        none = (None, None, None)
        override = self.get_ref_override("photom")
        if isinstance(override, PhotomModel):
            ref, path = override, override.meta.filename or "override"
        else:
            try:
                path = self.get_reference_file(model, "photom")
            except (Exception, SystemExit) as exc:
                # CRDS raises many types, and exits (-1) when it has no cache configured: a
                # missing zero point must not stop the science frame; the warning says why.
                cause = exc.__context__ if isinstance(exc, SystemExit) and exc.__context__ else exc
                return None, f"CRDS: {type(cause).__name__}: {cause}", none
            if not path or path.strip().upper() == "N/A":
                return None, "CRDS returned N/A", none
            ref = PhotomModel(os.fspath(path))
        try:
            if str(ref.meta.reftype or "").lower() != "photom":
                raise ValueError(f"{self.name}: {path} has REFTYPE={ref.meta.reftype}; "
                                 "expected PHOTOM")
            for key in ("detector", "filter"):
                got, want = getattr(ref.meta.instrument, key), getattr(model.meta.instrument, key)
                if str(got) != str(want):
                    return (None, f"{os.path.basename(str(path))}: {key.upper()}={got} "
                            f"(frame {want})", none)
            phot = ref.meta.photometry
            zp = phot.zero_point
            if zp is None:
                raise ValueError(f"{self.name}: {path}: PHOTZP is missing")
            x_std = phot.standard_airmass if phot.standard_airmass is not None \
                else ref.meta.telluric.airmass
            return (float(zp), os.path.basename(str(path)),
                    (x_std, phot.extinction, phot.extinction_source))
        finally:
            if ref is not override:
                ref.close()

    def _nearest_standard(self, model: ImageModel) -> str | None:
        t0 = _when(model)
        best, best_dt = None, np.inf
        for path in self.standard_files or []:
            with ImageModel(os.fspath(path)) as std:
                same = (std.meta.instrument.detector == model.meta.instrument.detector
                        and std.meta.instrument.filter == model.meta.instrument.filter
                        and std.meta.observation.obsname == "IMG1-TEL")
                t = _when(std)
            if not same:
                log.info("%s: %s is not an IMG1-TEL frame of this detector and filter", self.name,
                         path)
                continue
            delta = abs((t - t0).total_seconds()) if t and t0 else 0.0
            if delta < best_dt:
                best, best_dt = os.fspath(path), delta
        return best

    def _measure(self, path: str, band: str) -> tuple[float, float | None]:
        """(zero point, airmass) of the standard in ``path``."""
        with ImageModel(path) as std:
            mag, std_band = std.meta.standard.mag, std.meta.standard.band
            if mag is None or not std_band:
                raise ValueError(f"{self.name}: {path}: the standard's STDMAG/STDMAGBD are missing")
            if filter_band(std_band) != band:
                raise ValueError(f"{self.name}: {path}: mismatched filter: STDMAG is in "
                                 f"{std_band}, the frame's filter needs {band}")
            try:
                return (measure_zero_point(std.data, std.err, std.dq, float(mag),
                                           radius=self.radius).zp,
                        std.meta.observation.airmass)
            except ValueError as exc:
                raise ValueError(f"{self.name}: {path}: {exc}") from exc
