"""DQInitStep: OR the CRDS bad-pixel mask into an image's DQ array."""

from __future__ import annotations

import logging
from typing import ClassVar

from ..datamodels import ImageModel
from .base import IrisStep, ReferenceFileError, reference_name, reference_part
from .dq_init import apply_mask, flag_non_finite

log = logging.getLogger(__name__)

__all__ = ["DQInitStep"]


class DQInitStep(IrisStep):
    """Combine the mask reference (R_MASK) with the DQ of a rate image (S_DQINIT)."""

    class_alias = "dq_init"
    cal_step = "dq_init"
    reference_file_types: ClassVar[list[str]] = ["mask"]

    def process(self, step_input):
        model = self.prepare_input(step_input)
        if not isinstance(model, ImageModel):
            raise TypeError(f"{self.name}: expected an ImageModel (_rate), got {type(model).__name__}")
        mask = self.load_reference(model, "mask")
        mask_dq = reference_part(mask, "dq", model, f"mask {reference_name(mask)}")
        if mask_dq is None:
            raise ReferenceFileError(f"{self.name}: mask {reference_name(mask)} has no DQ array")
        model.dq = flag_non_finite(model.data, apply_mask(model.dq, mask_dq))
        model.meta.cal_step.dq_init = "COMPLETE"
        return model
