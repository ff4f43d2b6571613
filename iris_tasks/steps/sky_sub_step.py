"""SkySubStep: subtract the background from associated sky frames or, failing those, a model."""

from __future__ import annotations

import logging
import os
from typing import Any

from ..datamodels import ImageModel, IrisDataModel
from ..errors import ProcessingError
from .base import IrisStep, ensure_image_arrays
from .sky_sub import SkyFrame, combine_sky_frames, model_background, subtract_sky

log = logging.getLogger(__name__)

__all__ = ["SkyCalibrationError", "SkySubStep"]

# Calibrations a sky frame must share with the science frame before it can be subtracted.
_LEVEL_STEPS = ("dark_sub", "flat_field")


class SkyCalibrationError(ProcessingError, ValueError):
    """Sky frames missing, unusable, or not calibrated like the science frame."""


class SkySubStep(IrisStep):
    """Background subtraction (S_SKYSUB; SKYFILES names the sky frames or the model fallback).

    ``method``: ``frames`` needs sky frames and fails without them; ``model`` always uses the
    Background2D model; ``auto`` uses sky frames when given, else the model, and says so in
    SKYFILES and the log. The model is computed by the fast Background2D-equivalent mesh
    (``model_engine='mesh'``, see :mod:`._mesh`) or by photutils itself (``'photutils'``). Sky frames are given as ``sky_files`` (paths or models)
    or as the second argument of ``run``; they must be calibrated to the science frame's
    level (dark- and flat-corrected alike). Image2Pipeline does that for raw _rate skies.
    """

    class_alias = "sky_sub"
    cal_step = "sky_sub"

    spec = """
    method = option('auto', 'frames', 'model', default='auto')  # background from sky frames, a 2-D model, or frames when available
    sky_files = force_list(default=None)  # sky frames (_cal or _rate at the science calibration level)
    sigma = float(default=3.0)  # clipping threshold for the sky combine and scaling
    maxiters = integer(default=5)  # clipping iterations in the sky combine
    box_size = integer(default=64)  # Background2D box size (pixels) for the model fallback
    filter_size = integer(default=3)  # Background2D median filter size (boxes)
    source_nsigma = float(default=3.0)  # sources masked above this many background RMS in the model
    model_engine = option('mesh', 'photutils', default='mesh')  # model fallback: fast Background2D-equivalent mesh, or photutils Background2D itself
    """  # noqa: E501

    def process(self, step_input, sky_inputs: Any = None):
        model = self.prepare_input(step_input)
        if not isinstance(model, ImageModel):
            raise TypeError(f"{self.name}: expected an ImageModel, got {type(model).__name__}")
        skies = list(sky_inputs) if sky_inputs is not None else list(self.sky_files or [])
        name = model.meta.filename or "science"
        if self.method == "frames" and not skies:
            inst = model.meta.instrument
            raise SkyCalibrationError(
                f"{self.name}: {name}: sky subtraction from sky frames was requested "
                f"(method='frames') but no sky frames were given or found "
                f"(DETECTOR={inst.detector} FILTER={inst.filter})"
            )
        if skies and self.method != "model":
            frames = [self._sky_frame(s, model) for s in skies]
            try:
                estimate = combine_sky_frames(model.data, model.dq, frames,
                                              sigma=self.sigma, maxiters=self.maxiters)
            except ValueError as exc:
                raise SkyCalibrationError(f"{self.name}: {name}: {exc}") from exc
            model.meta.provenance.sky_files = ",".join(f.name for f in frames)
            model.meta.provenance.sky_method = "FRAMES"
        else:
            estimate = model_background(model.data, model.dq, box_size=self.box_size,
                                        filter_size=self.filter_size, sigma=self.sigma,
                                        source_nsigma=self.source_nsigma,
                                        engine=self.model_engine)
            model.meta.provenance.sky_files = "NONE (Background2D model)"
            model.meta.provenance.sky_method = "MODEL"
            if self.method == "auto":
                log.warning("%s: %s: no sky frames; subtracting a Background2D model instead",
                            self.name, name)
        log.info("%s: %s: background level %.6g DN/s from %s", self.name, name, estimate.level,
                 estimate.detail)
        model.data, model.err, model.dq = subtract_sky(model.data, model.err, model.dq, estimate)
        model.meta.cal_step.sky_sub = "COMPLETE"
        return model

    def _sky_frame(self, sky: Any, science: ImageModel) -> SkyFrame:
        owned = not isinstance(sky, IrisDataModel)
        model = self.open_model(os.fspath(sky)) if owned else sky
        try:
            label = os.path.basename(str(model.meta.filename or sky)) if owned else str(
                model.meta.filename or "<sky model>")
            if not isinstance(model, ImageModel):
                raise SkyCalibrationError(f"{self.name}: sky frame {label} is a "
                                          f"{type(model).__name__}, not an image")
            for key in ("detector", "filter"):
                want = getattr(science.meta.instrument, key)
                got = getattr(model.meta.instrument, key)
                if want and got and want != got:
                    raise SkyCalibrationError(f"{self.name}: sky frame {label} has "
                                              f"{key.upper()}={got}; science has {want}")
            for step in _LEVEL_STEPS:
                want = getattr(science.meta.cal_step, step) == "COMPLETE"
                got = getattr(model.meta.cal_step, step) == "COMPLETE"
                if want != got:
                    raise SkyCalibrationError(
                        f"{self.name}: sky frame {label} has {step} "
                        f"{'done' if got else 'not done'} but the science frame "
                        f"{'has' if want else 'has not'}; calibrate both alike "
                        "(iris_image2 does this for _rate sky frames)")
            if (model.meta.cal_step.photom == "COMPLETE") != (
                    science.meta.cal_step.photom == "COMPLETE"):
                raise SkyCalibrationError(
                    f"{self.name}: sky frame {label} is in {model.meta.bunit_data or 'DN/s'} "
                    f"but the science frame in {science.meta.bunit_data or 'DN/s'} (S_PHOTOM "
                    "differs); use the sky frame's _rate or a _cal without photom (iris_image2 "
                    "flux-calibrates after sky subtraction)")
            ensure_image_arrays(model)
            return SkyFrame(model.data.copy(), model.err.copy(), model.dq.copy(), label)
        finally:
            if owned:
                model.close()
