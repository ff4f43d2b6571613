"""IFS stage 2: lenslet and slicer frames -> wavelength-calibrated cubes (see docs/ifs.md).

* :mod:`.extract` - the weighted least-squares inverse of the trace forward model (arrays only);
* :mod:`.cube` - units, throughput, DQ, WCS and sky for the cube product (arrays only);
* :mod:`.destripe` - residual 1/f row stripes measured on the unlit pixels (arrays only);
* :mod:`.profile` - the cross-dispersion profile per detector zone (:class:`CrossProfile`);
* :mod:`.flexure` - the frame's offset from the trace reference, from the frame (arrays only);
* :class:`DestripeStep` (``destripe``), :class:`FlexureStep` (``flexure``),
  :class:`ExtractCubeStep` (``extract_cube``),
  :class:`CubeSkySubStep` (``cube_sky_sub``) and :class:`Ifs2Pipeline` (``iris_ifs2``) - the
  stpipe layer.
"""

from .destripe_step import DestripeStep
from .extract_step import ExtractCubeStep
from .flexure_step import FlexureStep
from .pipeline import Ifs2Pipeline, matching_sky_frames
from .profile import CrossProfile
from .sky_step import CubeSkySubStep, SkyCubeError

__all__ = ["CrossProfile", "CubeSkySubStep", "DestripeStep", "ExtractCubeStep", "FlexureStep",
           "Ifs2Pipeline", "SkyCubeError", "matching_sky_frames"]
