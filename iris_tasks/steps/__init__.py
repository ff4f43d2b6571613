"""IRIS pipeline steps: thin stpipe Steps over the algorithm modules beside them.

Each step ``<name>_step.py`` opens/records/selects references; the science is in
``<name>.py`` as pure functions over arrays (testable without stpipe or CRDS).
"""

from .assign_wcs_step import AssignWcsStep
from .base import IrisPipeline, IrisStep, ReferenceFileError
from .dark_sub_step import DarkSubStep
from .dq_init_step import DQInitStep
from .flat_field_step import FlatFieldStep
from .readout_step import ReadoutStep
from .sky_sub_step import SkyCalibrationError, SkySubStep

__all__ = [
    "AssignWcsStep", "DQInitStep", "DarkSubStep", "FlatFieldStep", "IrisPipeline", "IrisStep",
    "ReadoutStep", "ReferenceFileError", "SkyCalibrationError", "SkySubStep",
]
