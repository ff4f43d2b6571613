"""Stage1Pipeline (``iris_stage1``): raw ramp -> ``_rate`` image."""

from __future__ import annotations

import logging
from typing import ClassVar

from ..steps.base import IrisPipeline
from ..steps.readout_step import ReadoutStep

log = logging.getLogger(__name__)

__all__ = ["Stage1Pipeline"]


class Stage1Pipeline(IrisPipeline):
    """Detector-level processing of one raw exposure.

    One fused step today (readout_cy does refpix, saturation, linearity, jumps and the fit in
    one pass over the reads); a pipeline so that later detector steps (persistence, ...)
    slot in without changing callers.
    """

    class_alias = "iris_stage1"

    spec = """
    suffix = string(default='rate')  # output suffix
    """

    step_defs: ClassVar[dict] = {"readout": ReadoutStep}

    def process(self, step_input):
        result = self.readout.run(step_input)
        return result
