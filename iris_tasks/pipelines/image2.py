"""Image2Pipeline (``iris_image2``): imager ``_rate`` -> calibrated ``_cal`` image."""

from __future__ import annotations

import logging
import os
from typing import Any, ClassVar

from ..datamodels import ImageModel, IrisDataModel
from ..steps.assign_wcs_step import AssignWcsStep
from ..steps.base import IrisPipeline
from ..steps.dark_sub_step import DarkSubStep
from ..steps.dq_init_step import DQInitStep
from ..steps.flat_field_step import FlatFieldStep
from ..steps.photom_step import PhotomStep
from ..steps.sky_sub_step import SkySubStep

log = logging.getLogger(__name__)

__all__ = ["Image2Pipeline"]


class Image2Pipeline(IrisPipeline):
    """dq_init -> dark_sub -> flat_field -> sky_sub -> assign_wcs -> photom.

``photom`` (last, as in JWST's calwebb_image2) puts the frame in MJy/sr with the ``photom``
reference CRDS serves (the night's imager standard of this DETECTOR/FILTER); where none
applies it is SKIPPED with a warning and the ``_cal`` stays in DN/s. Standards (IMG1-TEL)
are not calibrated by it; ``run_reduction`` skips it for sky frames.

    Sky frames (``sky_files``) may be ``_rate`` images: they are taken through the same
    dq_init, dark_sub and flat_field (same references, same parameters) before the sky
    combine, so sky and science are always at the same calibration level. Already calibrated
    sky frames (S_FLAT COMPLETE) are used as they are.
    """

    class_alias = "iris_image2"

    spec = """
    sky_files = force_list(default=None)  # sky frames for sky_sub (_rate or _cal)
    suffix = string(default='cal')  # output suffix
    """  # noqa: E501

    step_defs: ClassVar[dict] = {
        "dq_init": DQInitStep,
        "dark_sub": DarkSubStep,
        "flat_field": FlatFieldStep,
        "sky_sub": SkySubStep,
        "assign_wcs": AssignWcsStep,
        "photom": PhotomStep,
    }

    def process(self, step_input, sky_inputs: Any = None):
        model = self.prepare_input(step_input)
        if not isinstance(model, ImageModel):
            raise TypeError(f"{self.name}: expected an ImageModel (_rate), got {type(model).__name__}")
        model = self.dq_init.run(model)
        model = self.dark_sub.run(model)
        model = self.flat_field.run(model)
        # Sky frames: run() argument, else this pipeline's sky_files, else the sub-step's own.
        skies = list(sky_inputs or self.sky_files or self.sky_sub.sky_files or [])
        if not self.sky_sub.skip and skies:
            skies = [self._calibrate_sky(sky, model) for sky in skies]
        model = self.sky_sub.run(model, skies)
        model = self.assign_wcs.run(model)
        model = self.photom.run(model)
        return model

    def _calibrate_sky(self, sky: Any, science: ImageModel) -> ImageModel:
        """A sky frame brought to the science frame's calibration level."""
        sky_model = sky if isinstance(sky, IrisDataModel) else self.open_model(os.fspath(sky))
        if sky_model.meta.cal_step.flat_field == science.meta.cal_step.flat_field:
            return sky_model
        log.info("%s: calibrating sky frame %s like the science frame", self.name,
                 sky_model.meta.filename)
        if isinstance(sky, IrisDataModel):
            sky_model = sky_model.copy()  # the caller's model stays as it was
        for step in (self.dq_init, self.dark_sub, self.flat_field):
            sky_model = step.run(sky_model)
        return sky_model
