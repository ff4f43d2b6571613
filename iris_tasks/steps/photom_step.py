"""PhotomStep (``photom``): an imager ``_cal`` frame in MJy/sr from a standard star (S_PHOTOM).

The zero point comes from the IMG1-TEL frame (flat-fielded like the science, ``_cal``) of the
science frame's DETECTOR and FILTER nearest in time among ``standard_files``, measured with
photutils apertures (:func:`iris_tasks.steps.photom.measure_zero_point`) against the
standard's header magnitude STDMAG in band STDMAGBD; or it is given as ``zero_point``. SCI and
ERR are multiplied by PHOTMJSR (MJy/sr per count/s per pixel, the JWST keyword); PHOTZP,
PHOTSTD, PIXAR_A2 and BUNIT = MJy/sr are recorded. The standard's airmass is not corrected for
(no extinction coefficients yet): take standards near the science airmass. Without a standard
or zero point, or with a standard that gives none (no star, saturated, magnitude in another
band), the step is SKIPPED with a warning naming the file and the frame keeps its unit.
"""

from __future__ import annotations

import logging
import os

import numpy as np

from ..datamodels import ImageModel
from ..instrument.standards import filter_band
from ..metadata import parse_obs_datetime
from .assign_wcs import IMAGER_PIXEL_SCALE_MAS
from .base import IrisStep
from .photom import measure_zero_point, photmjsr_from_zero_point

log = logging.getLogger(__name__)

__all__ = ["PhotomStep"]


def _when(model: ImageModel):
    obs = model.meta.observation
    return parse_obs_datetime(obs.date, obs.time or "00:00:00") if obs.date else None


class PhotomStep(IrisStep):
    """Flux calibration of an imager frame from a photometric standard."""

    class_alias = "photom"
    cal_step = "photom"

    spec = """
    standard_files = force_list(default=None)  # IMG1-TEL _cal frames; the one of this DETECTOR/FILTER nearest in time gives the zero point
    zero_point = float(default=None)  # or the zero point itself (Vega magnitude of 1 count/s)
    radius = float(default=30.0)  # aperture radius (pixels) for the standard: the whole PSF
    """  # noqa: E501

    def process(self, step_input):
        model = self.prepare_input(step_input)
        if not isinstance(model, ImageModel):
            raise TypeError(f"{self.name}: expected an ImageModel (_cal), got {type(model).__name__}")
        name = model.meta.filename or "frame"
        filt = str(model.meta.instrument.filter or "")
        band = filter_band(filt)
        zp, source = self.zero_point, "given"
        if zp is None:
            chosen = self._nearest_standard(model)
            if chosen is None:
                log.warning("%s: %s: no zero point given and no standard of DETECTOR=%s FILTER=%s "
                            "among %d file(s); the frame keeps its unit (%s)", self.name, name,
                            model.meta.instrument.detector, filt, len(self.standard_files or []),
                            model.meta.bunit_data or "DN/s")
                model.meta.cal_step.photom = "SKIPPED"
                return model
            try:
                zp, source = self._measure(chosen, band), os.path.basename(chosen)
            except ValueError as exc:
                log.warning("%s: %s: no zero point: %s; the frame keeps its unit", self.name,
                            name, exc)
                model.meta.cal_step.photom = "SKIPPED"
                return model
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

    def _measure(self, path: str, band: str) -> float:
        with ImageModel(path) as std:
            mag, std_band = std.meta.standard.mag, std.meta.standard.band
            if mag is None or not std_band:
                raise ValueError(f"{self.name}: {path}: the standard's STDMAG/STDMAGBD are missing")
            if filter_band(std_band) != band:
                raise ValueError(f"{self.name}: {path}: mismatched filter: STDMAG is in "
                                 f"{std_band}, the frame's filter needs {band}")
            try:
                return measure_zero_point(std.data, std.err, std.dq, float(mag),
                                          radius=self.radius).zp
            except ValueError as exc:
                raise ValueError(f"{self.name}: {path}: {exc}") from exc
