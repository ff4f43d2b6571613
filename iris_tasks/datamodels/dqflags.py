"""Data-quality bit definitions, one for the whole project.

Bit values are JWST's so that tools written for JWST products (and people used to them) read
IRIS DQ arrays correctly. readout_cy (which may import numpy only) holds no copy: callers pass
``pixel`` as its ``dqflags`` argument, as JWST steps pass this table to stcal's ``ramp_fit``.
"""

from astropy.nddata.bitmask import interpret_bit_flags
from stdatamodels import dqflags as _stdq

pixel: dict[str, int] = {
    "GOOD": 0,
    "DO_NOT_USE": 2**0,
    "SATURATED": 2**1,
    "JUMP_DET": 2**2,
    "DROPOUT": 2**3,
    "OUTLIER": 2**4,
    "PERSISTENCE": 2**5,
    "AD_FLOOR": 2**6,
    "CHARGELOSS": 2**7,
    "UNRELIABLE_ERROR": 2**8,
    "NON_SCIENCE": 2**9,
    "DEAD": 2**10,
    "HOT": 2**11,
    "WARM": 2**12,
    "LOW_QE": 2**13,
    "RC": 2**14,
    "TELEGRAPH": 2**15,
    "NONLINEAR": 2**16,
    "BAD_REF_PIXEL": 2**17,
    "NO_FLAT_FIELD": 2**18,
    "NO_GAIN_VALUE": 2**19,
    "NO_LIN_CORR": 2**20,
    "NO_SAT_CHECK": 2**21,
    "UNRELIABLE_BIAS": 2**22,
    "UNRELIABLE_DARK": 2**23,
    "UNRELIABLE_SLOPE": 2**24,
    "UNRELIABLE_FLAT": 2**25,
    "NO_SKY": 2**26,
    "OTHER_BAD_PIXEL": 2**30,
    "REFERENCE_PIXEL": 2**31,
}

# Bits that make a pixel unusable for photometry in stage 2 and in the master builders.
BAD_FOR_SCIENCE: int = (
    pixel["DO_NOT_USE"] | pixel["DEAD"] | pixel["REFERENCE_PIXEL"] | pixel["NON_SCIENCE"]
)


def interpret(value: int) -> list[str]:
    """Names of the bits set in ``value`` (e.g. 6 -> ['SATURATED', 'JUMP_DET'])."""
    return sorted(_stdq.dqflags_to_mnemonics(int(value), pixel))


def to_bits(names: str | list[str]) -> int:
    """Bit value of a comma-separated string or list of DQ names."""
    return int(interpret_bit_flags(names, flag_name_map=pixel) or 0)
