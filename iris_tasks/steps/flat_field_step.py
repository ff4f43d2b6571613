"""FlatFieldStep: divide by the CRDS flat (matched on DETECTOR, FILTER, IFSMODE)."""

from __future__ import annotations

import logging
from typing import ClassVar

import numpy as np

from ..datamodels import ImageModel
from .base import IrisStep, ReferenceFileError, reference_array, reference_name, reference_part
from .flat_field import apply_flat, unusable_flat

log = logging.getLogger(__name__)

__all__ = ["FlatFieldStep"]


class FlatFieldStep(IrisStep):
    """Divide by the flat; unusable flat pixels flagged NO_FLAT_FIELD|DO_NOT_USE (S_FLAT, R_FLAT)."""

    class_alias = "flat_field"
    cal_step = "flat_field"
    reference_file_types: ClassVar[list[str]] = ["flat"]

    spec = """
    max_bad_fraction = float(default=0.5)  # fail if more of the flat than this is unusable (wrong file?)
    """  # noqa: E501

    def process(self, step_input):
        model = self.prepare_input(step_input)
        if not isinstance(model, ImageModel):
            raise TypeError(f"{self.name}: expected an ImageModel (_rate), got {type(model).__name__}")
        flat = self.load_reference(model, "flat")
        name = f"flat {reference_name(flat)}"
        data = reference_array(flat.data, model, name)
        err = reference_part(flat, "err", model, name)
        dq = reference_part(flat, "dq", model, name)
        bad = unusable_flat(data, dq)
        fraction = float(np.mean(bad))
        if fraction > self.max_bad_fraction:
            raise ReferenceFileError(
                f"{self.name}: {name}: {fraction:.0%} of the pixels are <= 0, NaN or flagged "
                f"(limit {self.max_bad_fraction:.0%}); refusing to flat-field with it"
            )
        if bad.any():
            log.warning("%s: %s: %d pixels (%.2f%%) have no usable flat; flagged NO_FLAT_FIELD|DO_NOT_USE",
                        self.name, name, int(bad.sum()), 100 * fraction)
        try:
            out = apply_flat(model.data, model.err, model.dq, data, err, dq,
                             model.var_poisson, model.var_rnoise, model.var_flat)
        except ValueError as exc:
            raise ReferenceFileError(f"{self.name}: {name}: {exc}") from exc
        for key, value in out.items():
            setattr(model, key, value)
        model.meta.cal_step.flat_field = "COMPLETE"
        return model

