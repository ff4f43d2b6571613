"""What is known of IRIS before any data is taken: the optical design of the IFS and the
published line lists of its calibration lamps and of the night sky.

Both the simulator (which perturbs the design into an "as-built" instrument) and the nightly
builders (which start from the design and measure the real instrument from calibration
frames) read it; neither hands the other its model. Nothing here is fitted to data.
"""

from .ifs_design import IFS_BANDS, MODE_SCALES, REFPIX, IfsDesign, band, nominal_design
from .lines import LAMP_SPECIES, LineList, arc_lines, oh_lines

__all__ = ["IFS_BANDS", "LAMP_SPECIES", "MODE_SCALES", "REFPIX", "IfsDesign", "LineList",
           "arc_lines", "band", "nominal_design", "oh_lines"]
