"""Stage 1 algorithm: raw reads + detector references -> rate arrays, via readout_cy.

readout_cy does the per-pixel work in one pass (reference pixels, saturation, linearity,
jumps, CDS/MCDS/UTR fit, variances, multi-ramp combination by inverse variance). This
module only turns reference models into the maps it takes and records what each reference
flag means for the kernel:

* saturation DQ NO_SAT_CHECK -> saturation NaN (the kernel skips the check there);
* linearity DQ NO_LIN_CORR -> coefficients NaN (the kernel flags NO_LIN_CORR, no correction);
* read noise NaN -> replaced by the median read noise, pixel flagged UNRELIABLE_ERROR;
* gain NaN -> passed on (the kernel flags NO_GAIN_VALUE | DO_NOT_USE).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

from ..datamodels.dqflags import pixel

SAMPMODE_TO_MODE = {"UTR": "utr", "CDS": "cds", "MCDS": "mcds"}


@dataclass
class DetectorMaps:
    """Per-pixel detector calibration in the units readout_cy takes."""

    gain: np.ndarray  # e-/DN
    read_noise: np.ndarray  # DN per read
    saturation: np.ndarray  # DN
    nonlinearity: np.ndarray | None  # (ncoeff, ny, nx)
    dq: np.ndarray  # flags to OR into the output (mask, reference DQ, substitutions)


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
    """Reference arrays -> :class:`DetectorMaps` (see the module docstring for the rules)."""
    shape = np.shape(gain)
    dq = np.zeros(shape, np.uint32)
    if mask_dq is not None:
        dq |= mask_dq.astype(np.uint32)
    sat = np.array(saturation, dtype=np.float32)
    if saturation_dq is not None:
        no_check = (saturation_dq.astype(np.uint32) & pixel["NO_SAT_CHECK"]) != 0
        sat[no_check] = np.nan
        dq |= saturation_dq.astype(np.uint32)
    sat[~np.isnan(sat) & ~(sat > 0)] = np.nan  # non-positive levels cannot be checked either
    dq[np.isnan(sat)] |= np.uint32(pixel["NO_SAT_CHECK"])
    rn = np.array(read_noise, dtype=np.float32)
    bad_rn = ~np.isfinite(rn) | (rn < 0)
    if bad_rn.any():
        good = rn[~bad_rn]
        fill = float(np.median(good)) if good.size else 0.0
        rn[bad_rn] = fill
        dq[bad_rn] |= np.uint32(pixel["UNRELIABLE_ERROR"])
    g = np.array(gain, dtype=np.float32)
    g[~(g > 0)] = np.nan  # zero/negative gain is as unusable as NaN
    coeffs = None
    if nonlinearity is not None:
        coeffs = np.array(nonlinearity, dtype=np.float32)
        if linearity_dq is not None:
            no_lin = (linearity_dq.astype(np.uint32) & pixel["NO_LIN_CORR"]) != 0
            coeffs[:, no_lin] = np.nan
            dq |= linearity_dq.astype(np.uint32)
    return DetectorMaps(g, rn, sat, coeffs, dq)


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
):
    """Run readout_cy on (nramps, nreads, ny, nx) reads; returns its RampResult with the
    detector-map flags OR'ed into ``dq``."""
    import readout_cy

    # FITS data arrive big-endian; the kernels take native uint16.
    reads = np.ascontiguousarray(reads, dtype=np.uint16)
    if jump_threshold is not None and (not math.isfinite(jump_threshold) or jump_threshold <= 0):
        jump_threshold = None
    result = readout_cy.process_ramp(
        reads, read_times, gain=maps.gain, read_noise=maps.read_noise, saturation=maps.saturation,
        nonlinearity=maps.nonlinearity, mode=mode, refpix=refpix, jump_threshold=jump_threshold,
        threads=threads, fowler_k=fowler_k if mode == "mcds" else None, bias=bias,
        weighting=weighting if mode == "utr" else "optimal",
    )
    result.dq |= maps.dq
    return result
