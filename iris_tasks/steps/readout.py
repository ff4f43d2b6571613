"""Stage 1 algorithm: raw reads + detector references -> rate arrays, via readout_cy.

readout_cy does the per-pixel work in one pass (reference pixels, saturation, linearity,
jumps, CDS/MCDS/UTR fit, variances, multi-ramp combination by inverse variance). This
module only turns reference models into the maps it takes and records what each reference
flag means for the kernel:

* saturation DQ NO_SAT_CHECK -> saturation NaN (the kernel skips the check there);
* linearity DQ NO_LIN_CORR -> coefficients NaN (the kernel flags NO_LIN_CORR, no correction);
* read noise NaN -> replaced by the median read noise, pixel flagged UNRELIABLE_ERROR;
* gain NaN -> passed on (the kernel flags NO_GAIN_VALUE | DO_NOT_USE);
* mask DQ on a reference (border) pixel with any of :data:`REFPIX_EXCLUDE_FLAGS` -> that
  reference pixel is not used by the reference-pixel correction (``refpix_mask``); the
  kernel also leaves out reference pixels whose own behaviour over the reads is an outlier
  (``refpix_reject``) and flags them BAD_REF_PIXEL.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

from ..datamodels.dqflags import pixel

SAMPMODE_TO_MODE = {"UTR": "utr", "CDS": "cds", "MCDS": "mcds"}

# Mask-reference bits that keep a reference pixel out of the reference-pixel correction.
# REFERENCE_PIXEL and NON_SCIENCE do not: every border pixel carries them.
REFPIX_EXCLUDE_FLAGS: int = (
    pixel["DO_NOT_USE"] | pixel["BAD_REF_PIXEL"] | pixel["DEAD"] | pixel["HOT"] | pixel["WARM"]
    | pixel["TELEGRAPH"] | pixel["RC"] | pixel["OTHER_BAD_PIXEL"]
)


@dataclass
class DetectorMaps:
    """Per-pixel detector calibration in the units readout_cy takes."""

    gain: np.ndarray  # e-/DN
    read_noise: np.ndarray  # DN per read
    saturation: np.ndarray  # DN
    nonlinearity: np.ndarray | None  # (ncoeff, ny, nx)
    dq: np.ndarray  # flags to OR into the output (mask, reference DQ, substitutions)
    refpix_mask: np.ndarray | None = None  # reference pixels not to use (from the mask DQ)


def detector_maps(
    *,
    gain: np.ndarray,
    read_noise: np.ndarray,
    saturation: np.ndarray,
    saturation_dq: np.ndarray | None = None,
    nonlinearity: np.ndarray | None = None,
    linearity_dq: np.ndarray | None = None,
    mask_dq: np.ndarray | None = None,
) -> DetectorMaps:
    """Reference arrays -> :class:`DetectorMaps` (see the module docstring for the rules).

    The inputs are never modified. A map is copied only where a rule changes a value (a
    4096^2 reference usually has no pixel to change, and the linearity cube alone is 400 MB),
    so with native float32 inputs the maps share their memory.
    """
    shape = np.shape(gain)
    dq = _or_flags(shape, mask_dq, saturation_dq, linearity_dq)
    sat = np.asarray(saturation, dtype=np.float32)
    with np.errstate(invalid="ignore"):
        no_sat = ~(sat > 0)  # NaN and non-positive levels cannot be checked
    if saturation_dq is not None:
        no_sat |= (np.asarray(saturation_dq) & pixel["NO_SAT_CHECK"]) != 0
    if no_sat.any():
        sat = np.where(no_sat, np.float32(np.nan), sat)
        dq[no_sat] |= np.uint32(pixel["NO_SAT_CHECK"])
    rn = np.asarray(read_noise, dtype=np.float32)
    with np.errstate(invalid="ignore"):
        bad_rn = ~(np.isfinite(rn) & (rn >= 0))
    if bad_rn.any():
        good = rn[~bad_rn]
        fill = float(np.median(good)) if good.size else 0.0
        rn = np.where(bad_rn, np.float32(fill), rn)
        dq[bad_rn] |= np.uint32(pixel["UNRELIABLE_ERROR"])
    g = np.asarray(gain, dtype=np.float32)
    with np.errstate(invalid="ignore"):
        bad_g = g <= 0  # zero/negative gain is as unusable as NaN
    if bad_g.any():
        g = np.where(bad_g, np.float32(np.nan), g)
    coeffs = None
    if nonlinearity is not None:
        coeffs = np.asarray(nonlinearity, dtype=np.float32)
        if linearity_dq is not None:
            no_lin = (np.asarray(linearity_dq) & pixel["NO_LIN_CORR"]) != 0
            if no_lin.any():
                coeffs = np.where(no_lin, np.float32(np.nan), coeffs)
    refmask = None
    if mask_dq is not None:
        refmask = (np.asarray(mask_dq) & np.uint32(REFPIX_EXCLUDE_FLAGS)) != 0
    return DetectorMaps(g, rn, sat, coeffs, dq, refmask)


def _or_flags(shape: tuple[int, ...], *flags: np.ndarray | None) -> np.ndarray:
    """uint32 OR of the given DQ arrays (zeros when none), a new array."""
    dq = np.zeros(shape, np.uint32)
    for f in flags:
        if f is not None:
            np.bitwise_or(dq, f, out=dq, casting="unsafe")
    return dq


def readout_mode(sampmode: str | None, requested: str = "auto") -> str:
    """readout_cy mode: the requested one, else from SAMPMODE (UTR/CDS/MCDS)."""
    if requested and requested != "auto":
        return requested
    if sampmode is None or str(sampmode).upper() not in SAMPMODE_TO_MODE:
        raise ValueError(f"SAMPMODE={sampmode!r}: cannot choose a readout mode "
                         f"(expected one of {', '.join(SAMPMODE_TO_MODE)}); pass mode=")
    return SAMPMODE_TO_MODE[str(sampmode).upper()]


def process(
    reads: np.ndarray,
    read_times: np.ndarray,
    maps: DetectorMaps,
    *,
    mode: str,
    fowler_k: int | None = None,
    refpix: bool = True,
    bias: np.ndarray | None = None,
    jump_threshold: float | None = 4.0,
    weighting: str = "optimal",
    threads: int | None = None,
    channels: int = 32,
    refpix_reject: float | None = 5.0,
):
    """Run readout_cy on (nramps, nreads, ny, nx) reads; returns its RampResult with the
    detector-map flags OR'ed into ``dq``. ``channels``: the detector's output channels, whose
    offsets the reference-pixel correction measures one by one. ``refpix_reject``: robust
    sigma of the outlier test on the reference pixels' own behaviour (None: mask only);
    ``result.refpix`` reports what was left out."""
    import readout_cy

    # FITS data arrive big-endian; the kernels take native uint16.
    reads = np.ascontiguousarray(reads, dtype=np.uint16)
    if jump_threshold is not None and (not math.isfinite(jump_threshold) or jump_threshold <= 0):
        jump_threshold = None
    result = readout_cy.process_ramp(
        reads, read_times, gain=maps.gain, read_noise=maps.read_noise, saturation=maps.saturation,
        nonlinearity=maps.nonlinearity, mode=mode, refpix=refpix, jump_threshold=jump_threshold,
        threads=threads, fowler_k=fowler_k if mode == "mcds" else None, bias=bias,
        weighting=weighting if mode == "utr" else "optimal", refpix_channels=channels,
        refpix_mask=maps.refpix_mask if refpix else None, refpix_reject=refpix_reject,
        dqflags=pixel,  # the project's one DQ definition; readout_cy defines no bits
    )
    result.dq |= maps.dq
    return result
