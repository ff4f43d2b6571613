"""DQ bit values used by readout_cy.

They duplicate the JWST values of ``iris_tasks.datamodels.dqflags.pixel`` on purpose:
``readout_cy`` may import numpy only.  A test in ``tests/test_readout_api.py`` checks they
still match when iris_tasks is importable.
"""

DO_NOT_USE = 1
SATURATED = 2
JUMP_DET = 4
DROPOUT = 8
NONLINEAR = 65536
NO_GAIN_VALUE = 524288
NO_LIN_CORR = 1048576
NO_SAT_CHECK = 2097152
REFERENCE_PIXEL = 2**31

__all__ = [
    "DO_NOT_USE",
    "SATURATED",
    "JUMP_DET",
    "DROPOUT",
    "NONLINEAR",
    "NO_GAIN_VALUE",
    "NO_LIN_CORR",
    "NO_SAT_CHECK",
    "REFERENCE_PIXEL",
]
