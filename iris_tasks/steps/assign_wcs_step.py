"""AssignWcsStep: write the imager's TAN WCS (from RA/DEC/PA) into the SCI header keywords."""

from __future__ import annotations

import logging

from ..datamodels import ImageModel
from ..errors import BadInputError
from .assign_wcs import IMAGER_PIXEL_SCALE_MAS, imager_wcsinfo
from .base import IrisStep

log = logging.getLogger(__name__)

__all__ = ["AssignWcsStep", "PointingError"]


class PointingError(BadInputError, ValueError):
    """RA/DEC/PA missing or invalid: no WCS can be assigned."""


class AssignWcsStep(IrisStep):
    """Celestial WCS from the pointing keywords (S_WCS; WCSAXES, CTYPEn, CRPIXn, ... on SCI)."""

    class_alias = "assign_wcs"
    cal_step = "assign_wcs"

    spec = """
    pixel_scale = float(default=4.0)  # imager pixel scale (mas)
    """

    def process(self, step_input):
        model = self.prepare_input(step_input)
        if not isinstance(model, ImageModel):
            raise TypeError(f"{self.name}: expected an ImageModel, got {type(model).__name__}")
        p = model.meta.pointing
        missing = [k for k, v in (("RA", p.ra), ("DEC", p.dec), ("PA", p.pa)) if v is None]
        name = model.meta.filename or "input"
        if missing:
            raise PointingError(f"{self.name}: {name}: cannot assign a WCS, missing {', '.join(missing)}")
        sub = model.meta.subarray
        try:
            info = imager_wcsinfo(float(p.ra), float(p.dec), float(p.pa), model.data.shape,
                                  pixel_scale_mas=self.pixel_scale or IMAGER_PIXEL_SCALE_MAS,
                                  xstart=sub.xstart, ystart=sub.ystart)
        except ValueError as exc:
            raise PointingError(f"{self.name}: {name}: {exc}") from exc
        for key, value in info.items():
            setattr(model.meta.wcsinfo, key, value)
        model.meta.cal_step.assign_wcs = "COMPLETE"
        return model
