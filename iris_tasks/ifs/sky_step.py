"""CubeSkySubStep (``cube_sky_sub``): sky subtraction in cube space (S_SKYSUB, SKYFILES)."""

from __future__ import annotations

import logging
import os
from typing import Any

import numpy as np

from ..datamodels import CubeModel, IrisDataModel
from ..datamodels.dqflags import pixel
from ..errors import ProcessingError
from ..instrument.lines import oh_lines
from ..steps.base import IrisStep
from .cube import median_sky, outer_sky, outer_spaxels, subtract_sky
from .oh_scaling import scale_oh_lines

log = logging.getLogger(__name__)

__all__ = ["CubeSkySubStep", "SkyCubeError"]

# Calibrations a sky cube must share with the science cube before it can be subtracted.
_LEVEL_STEPS = ("dark_sub", "flat_field", "destripe", "extract_cube")


class SkyCubeError(ProcessingError, ValueError):
    """Sky cubes missing, unusable, or not calibrated like the science cube."""


class CubeSkySubStep(IrisStep):
    """Subtract the sky from an IFS cube.

    ``method``: ``frames`` subtracts the per-voxel median of sky cubes (LEN-SKY/SLI-SKY
    reduced like the science frame) and fails without them; ``outer`` (alias ``model``)
    subtracts, per wavelength, the median of the field's outer spaxels (normalised radius >=
    ``outer_radius``; assumes a compact target); ``auto`` uses sky cubes when given, else the
    outer-spaxel fallback, and says so in SKYFILES and the log. Sky cubes come as
    ``sky_files`` or the second argument of ``run``.
    """

    class_alias = "cube_sky_sub"
    cal_step = "sky_sub"

    spec = """
    method = option('auto', 'frames', 'outer', 'model', default='auto')  # sky cubes, outer-spaxel median, or cubes when available
    sky_files = force_list(default=None)  # sky cubes (_s3d) reduced like the science frame
    outer_radius = float(default=0.7)  # spaxels at normalised radius >= this are 'outer' for the fallback
    min_outer = integer(default=8)  # fail the fallback with fewer outer spaxels than this
    scale_oh = boolean(default=False)  # with sky frames: scale their OH lines to the science frame's, per line window (Davies 2007-like)
    oh_min_relative = float(default=0.01)  # OH lines fainter than this fraction of the band's brightest are not windowed
    """  # noqa: E501

    def process(self, step_input, sky_inputs: Any = None):
        cube = self.prepare_input(step_input)
        if not isinstance(cube, CubeModel):
            raise TypeError(f"{self.name}: expected a CubeModel, got {type(cube).__name__}")
        skies = list(sky_inputs) if sky_inputs is not None else list(self.sky_files or [])
        name = cube.meta.filename or "science cube"
        if self.method == "frames" and not skies:
            inst = cube.meta.instrument
            raise SkyCubeError(f"{self.name}: {name}: sky subtraction from sky frames was "
                               f"requested (method='frames') but none were given (IFSMODE="
                               f"{inst.ifsmode} IFSSCALE={inst.ifsscale} FILTER={inst.filter})")
        if skies and self.method in ("auto", "frames"):
            frames = [self._sky_cube(s, cube) for s in skies]
            sky, sky_err, undefined = median_sky([(d, e, q) for d, e, q, _ in frames])
            cube.meta.provenance.sky_files = ",".join(label for *_, label in frames)
            cube.meta.provenance.sky_method = "FRAMES"
            if self.scale_oh:
                sky = self._scale_oh(cube, sky, ~undefined)
            log.info("%s: %s: sky = median of %d sky cube(s)", self.name, name, len(frames))
        else:
            ny, nx = cube.data.shape[1:]
            outer = outer_spaxels(ny, nx, self.outer_radius)
            n_out = int(outer.sum())
            if n_out < self.min_outer:
                raise SkyCubeError(f"{self.name}: {name}: only {n_out} spaxels at radius >= "
                                   f"{self.outer_radius} in a {ny}x{nx} field (need "
                                   f"{self.min_outer}); give sky frames or lower outer_radius")
            sky, sky_err, undefined, _ = outer_sky(np.asarray(cube.data), np.asarray(cube.dq), outer)
            # No schema keyword says "how"; SKYFILES carries it so the header shows the fallback.
            cube.meta.provenance.sky_method = "MODEL"
            cube.meta.provenance.sky_files = (f"NONE (median of {n_out} outer spaxels, "
                                              f"r>={self.outer_radius:g})")
            if self.method == "auto":
                log.warning("%s: %s: no sky frames; subtracting the median of the %d outer "
                            "spaxels per wavelength instead", self.name, name, n_out)
        cube.data, cube.err, cube.dq = subtract_sky(cube.data, cube.err, cube.dq, sky, sky_err,
                                                    undefined)
        cube.meta.cal_step.sky_sub = "COMPLETE"
        return cube

    def _scale_oh(self, cube: CubeModel, sky: np.ndarray, sky_good: np.ndarray) -> np.ndarray:
        """The sky cube with its OH lines scaled to the science frame's (OHNWIN/OHRESB/OHRESA)."""
        wave = np.asarray(cube.wavelength, np.float64)
        lines = oh_lines(float(wave[0]), float(wave[-1]))
        keep = lines.intensity >= self.oh_min_relative * float(lines.intensity.max(initial=0.0))
        ny, nx = cube.data.shape[1:]
        data = np.asarray(cube.data, np.float64)
        good = ((np.asarray(cube.dq) & pixel["DO_NOT_USE"]) == 0) & np.isfinite(data)
        scaled, fit = scale_oh_lines(data, good, sky, sky_good, wave, lines.wavelength_um[keep],
                                     outer_spaxels(ny, nx, self.outer_radius))
        oh = cube.meta.oh_scaling
        oh.windows = len(fit.windows)
        oh.residual_before = fit.residual_before
        oh.residual_after = fit.residual_after
        return scaled

    def _sky_cube(self, sky: Any, science: CubeModel):
        owned = not isinstance(sky, IrisDataModel)
        model = self.open_model(os.fspath(sky)) if owned else sky
        try:
            label = os.path.basename(str(model.meta.filename or sky))
            if not isinstance(model, CubeModel):
                raise SkyCubeError(f"{self.name}: sky frame {label} is a {type(model).__name__}, "
                                   "not a cube (reduce it with iris_ifs2 first)")
            if model.data.shape != science.data.shape:
                raise SkyCubeError(f"{self.name}: sky cube {label} has shape {model.data.shape}; "
                                   f"the science cube has {science.data.shape}")
            for key in ("detector", "ifsmode", "ifsscale", "filter"):
                want = getattr(science.meta.instrument, key)
                got = getattr(model.meta.instrument, key)
                if want and got and want != got:
                    raise SkyCubeError(f"{self.name}: sky cube {label} has {key.upper()}={got}; "
                                       f"the science cube has {want}")
            if (model.meta.bunit_data or "") != (science.meta.bunit_data or ""):
                raise SkyCubeError(f"{self.name}: sky cube {label} is in {model.meta.bunit_data}; "
                                   f"the science cube in {science.meta.bunit_data}")
            for step in _LEVEL_STEPS:
                want = getattr(science.meta.cal_step, step) == "COMPLETE"
                got = getattr(model.meta.cal_step, step) == "COMPLETE"
                if want != got:
                    raise SkyCubeError(
                        f"{self.name}: sky cube {label} has {step} {'done' if got else 'not done'}"
                        f" but the science cube {'has' if want else 'has not'}; reduce both alike")
            return (np.array(model.data, np.float64), np.array(model.err, np.float64),
                    np.array(model.dq, np.uint32), label)
        finally:
            if owned:
                model.close()

