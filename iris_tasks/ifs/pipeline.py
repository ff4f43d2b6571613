"""Ifs2Pipeline (``iris_ifs2``): IFS ``_rate`` -> sky-subtracted, telluric-corrected cube ``_s3d``."""

from __future__ import annotations

import logging
import os
from collections.abc import Sequence
from typing import Any, ClassVar

from astropy.io import fits

from ..datamodels import CubeModel, ImageModel, IrisDataModel
from ..steps.base import IrisPipeline
from ..steps.dark_sub_step import DarkSubStep
from ..steps.dq_init_step import DQInitStep
from ..steps.flat_field_step import FlatFieldStep
from .destripe_step import DestripeStep
from .extract_step import ExtractCubeStep
from .flexure_step import FlexureStep
from .sky_step import CubeSkySubStep
from .telluric_step import TelluricStep

log = logging.getLogger(__name__)

__all__ = ["Ifs2Pipeline", "matching_sky_frames"]

# Header keywords a sky frame must share with the science frame to be its sky.
SKY_MATCH_KEYS = ("DETECTOR", "IFSMODE", "IFSSCALE", "FILTER")


class Ifs2Pipeline(IrisPipeline):
    """dq_init -> dark_sub -> flat_field -> destripe -> flexure -> extract_cube -> sky_sub
    -> telluric.

    The pixel-level steps are the imager's (they work on any rate image; CRDS picks the IFS
    mask/dark/flat by DETECTOR, READPATT, FILTER and IFSMODE). ``destripe`` removes the
    residual 1/f row stripes measured on the unlit pixels between the spectra (on by default:
    it lowers the lenslet cube's error, docs/ifs.md). ``flexure`` measures the frame's offset
    from the ``ifstrace`` reference (FLEXDX/FLEXDY) and ``extract_cube`` extracts with the
    trace moved by it; every sky frame reduced here gets its own. Sky frames (``sky_files`` or
    the second ``run`` argument) may be ``_rate`` images - they are taken through the same
    steps and references into cubes - or ``_s3d`` cubes already reduced that way. Without
    sky frames ``sky_sub`` falls back to the outer-spaxel median (``method='auto'``); a sky
    frame itself is reduced with ``steps={'sky_sub': {'skip': True}}``. ``telluric`` divides
    the cube by a standard star's response (``telluric`` reference: CRDS, or
    ``steps={'telluric': {'telluric_files': [...]}}``, the nearest in time and airmass) into
    erg/s/cm^2/A/arcsec^2; without an applicable standard it is skipped with a warning and the
    cube stays in e-/s. A telluric standard's own cube is not corrected.
    """

    class_alias = "iris_ifs2"

    spec = """
    sky_files = force_list(default=None)  # sky frames for sky_sub (_rate or _s3d)
    suffix = string(default='s3d')  # output suffix
    """  # noqa: E501

    step_defs: ClassVar[dict] = {
        "dq_init": DQInitStep,
        "dark_sub": DarkSubStep,
        "flat_field": FlatFieldStep,
        "destripe": DestripeStep,
        "flexure": FlexureStep,
        "extract_cube": ExtractCubeStep,
        "sky_sub": CubeSkySubStep,
        "telluric": TelluricStep,
    }

    def process(self, step_input, sky_inputs: Any = None):
        model = self.prepare_input(step_input)
        if not isinstance(model, ImageModel):
            raise TypeError(f"{self.name}: expected an IFS ImageModel (_rate), got "
                            f"{type(model).__name__}")
        cube = self._to_cube(model)
        skies = list(sky_inputs or self.sky_files or self.sky_sub.sky_files or [])
        if not self.sky_sub.skip and skies:
            skies = [self._sky_cube(sky) for sky in skies]
        cube = self.sky_sub.run(cube, skies)
        return self.telluric.run(cube)

    def _to_cube(self, model: ImageModel) -> CubeModel:
        for step in (self.dq_init, self.dark_sub, self.flat_field, self.destripe, self.flexure):
            model = step.run(model)
        return self.extract_cube.run(model)

    def _sky_cube(self, sky: Any) -> CubeModel:
        """A sky frame as a cube reduced like the science frame."""
        owned = not isinstance(sky, IrisDataModel)
        model = self.open_model(os.fspath(sky)) if owned else sky
        if isinstance(model, CubeModel):
            return model
        if not isinstance(model, ImageModel):
            raise TypeError(f"{self.name}: sky frame {sky} is a {type(model).__name__}")
        log.info("%s: reducing sky frame %s like the science frame", self.name,
                 model.meta.filename)
        if not owned:
            model = model.copy()  # the caller's model stays as it was
        return self._to_cube(model)


def matching_sky_frames(science: str | os.PathLike, candidates: Sequence[str | os.PathLike]
                        ) -> list[str]:
    """The ``candidates`` (sky rates or cubes) with the science frame's DETECTOR, IFSMODE,
    IFSSCALE and FILTER: its sky frames in a directory of a night's frames."""
    head = fits.getheader(science, 0)
    chosen = []
    for path in candidates:
        h = fits.getheader(path, 0)
        if all(str(h.get(k)) == str(head.get(k)) for k in SKY_MATCH_KEYS):
            chosen.append(os.fspath(path))
    return chosen
