"""DarkSubStep: subtract the CRDS dark-rate reference (matched on DETECTOR and READPATT)."""

from __future__ import annotations

import logging
from typing import ClassVar

from ..datamodels import ImageModel
from .base import IrisStep, ReferenceFileError, reference_array, reference_name, reference_part
from .dark_sub import subtract_dark

log = logging.getLogger(__name__)

__all__ = ["DarkSubStep"]


class DarkSubStep(IrisStep):
    """Subtract the dark rate (DN/s) from a rate image; ERR and DQ propagated (S_DARK, R_DARK)."""

    class_alias = "dark_sub"
    cal_step = "dark_sub"
    reference_file_types: ClassVar[list[str]] = ["dark"]

    def process(self, step_input):
        model = self.prepare_input(step_input)
        if not isinstance(model, ImageModel):
            raise TypeError(f"{self.name}: expected an ImageModel (_rate), got {type(model).__name__}")
        dark = self.load_reference(model, "dark")
        name = f"dark {reference_name(dark)}"
        sci_patt = model.meta.exposure.readpatt
        dark_patt = getattr(dark.meta.exposure, "readpatt", None)
        if sci_patt and dark_patt and str(dark_patt) != str(sci_patt):
            # Only an override can get here (CRDS matches READPATT). Both are rates, so the
            # subtraction is still dimensionally right; pattern-dependent signatures may not be.
            log.warning("%s: %s has READPATT=%s but the data READPATT=%s; subtracting anyway",
                        self.name, name, dark_patt, sci_patt)
        data = reference_array(dark.data, model, name)
        try:
            err = reference_part(dark, "err", model, name)
            dq = reference_part(dark, "dq", model, name)
            model.data, model.err, model.dq = subtract_dark(model.data, model.err, model.dq, data, err, dq)
        except ValueError as exc:
            raise ReferenceFileError(f"{self.name}: {name}: {exc}") from exc
        model.meta.cal_step.dark_sub = "COMPLETE"
        return model

