"""readout_cy: raw H4RG up-the-ramp readout processing at memory-bandwidth speed.

Cython/OpenMP kernels (``readout_cy._kernels``, whose C parts are the headers in
``readout_cy/src/``) behind a small numpy-only Python face:

* :func:`process_ramp` / :func:`process_exposure` - raw uint16 reads -> slope image
  (reference pixels, saturation, linearity, jumps, CDS/MCDS/UTR fit, variances, DQ);
* :class:`RampAccumulator` - the same, fed read by read;
* the kernels one by one: :func:`refpix_correct`, :func:`flag_saturation`,
  :func:`linearity_correct`, :func:`detect_jumps`, :func:`fit_slopes`, each with a numpy
  twin of the same name in :mod:`readout_cy.reference`.

DQ: readout_cy defines no DQ bits.  Every function that writes DQ takes a required
``dqflags`` argument -- a :class:`DQFlags` or a name -> bit mapping holding DO_NOT_USE,
SATURATED, JUMP_DET, NO_GAIN_VALUE, NO_LIN_CORR, NO_SAT_CHECK, REFERENCE_PIXEL,
BAD_REF_PIXEL and UNRELIABLE_BIAS -- and
the project passes its one definition, ``iris_tasks.datamodels.dqflags.pixel`` (readout_cy
itself imports numpy only).

See docs/readout.md.
"""

from ._api import (
    MODES,
    WEIGHTINGS,
    DQFlags,
    FlickerSpec,
    FlickerSums,
    JumpResult,
    LinearityResult,
    RampAccumulator,
    RampResult,
    RefpixReport,
    SaturationResult,
    detect_jumps,
    fit_slopes,
    flag_saturation,
    flicker_apply,
    flicker_sums,
    linearity_correct,
    process_exposure,
    process_ramp,
    refpix_correct,
    refpix_variance,
    sorting_network,
)
from ._kernels import max_threads, openmp_enabled

__all__ = [
    "MODES",
    "WEIGHTINGS",
    "DQFlags",
    "FlickerSpec",
    "FlickerSums",
    "JumpResult",
    "LinearityResult",
    "RampAccumulator",
    "RefpixReport",
    "RampResult",
    "SaturationResult",
    "detect_jumps",
    "fit_slopes",
    "flicker_apply",
    "flicker_sums",
    "flag_saturation",
    "linearity_correct",
    "max_threads",
    "openmp_enabled",
    "process_exposure",
    "process_ramp",
    "refpix_correct",
    "refpix_variance",
    "sorting_network",
]
