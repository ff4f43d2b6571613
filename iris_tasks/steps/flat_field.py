"""Flat-field division: the algorithm of the flat_field step (pure functions over arrays).

Error propagation (flat f with error sf, corrected value c = s / f):

* VAR_POISSON and VAR_RNOISE are divided by f**2 (they describe s);
* VAR_FLAT += c**2 * (sf / f)**2;
* ERR = sqrt(ERR_in**2 / f**2 + VAR_FLAT_new), so terms already folded into ERR by
  earlier steps (the dark's error) are kept rather than rebuilt from the VAR_* arrays.
"""

from __future__ import annotations

import numpy as np

from ..datamodels.dqflags import pixel
from ._stats import row_blocks

NO_FLAT = np.uint32(pixel["NO_FLAT_FIELD"] | pixel["DO_NOT_USE"])
# Flat DQ bits that mean the flat value itself must not be applied.
_FLAT_UNUSABLE = np.uint32(pixel["NO_FLAT_FIELD"] | pixel["DO_NOT_USE"])


def unusable_flat(flat: np.ndarray, flat_dq: np.ndarray | None = None) -> np.ndarray:
    """Boolean map of pixels whose flat is <= 0, NaN/inf, or flagged NO_FLAT_FIELD/DO_NOT_USE."""
    with np.errstate(invalid="ignore"):
        bad = ~np.isfinite(flat) | (flat <= 0)
    if flat_dq is not None:
        bad |= (flat_dq.astype(np.uint32, copy=False) & _FLAT_UNUSABLE) != 0
    return bad


def apply_flat(
    sci: np.ndarray,
    err: np.ndarray,
    dq: np.ndarray,
    flat: np.ndarray,
    flat_err: np.ndarray | None = None,
    flat_dq: np.ndarray | None = None,
    var_poisson: np.ndarray | None = None,
    var_rnoise: np.ndarray | None = None,
    var_flat: np.ndarray | None = None,
) -> dict[str, np.ndarray]:
    """Divide by the flat; returns data, err, dq, var_poisson, var_rnoise, var_flat.

    Where the flat is unusable the pixel is left undivided and flagged
    NO_FLAT_FIELD | DO_NOT_USE; other flat DQ bits (LOW_QE, DEAD, ...) are OR'ed in.
    """
    if flat.shape != sci.shape:
        raise ValueError(f"flat shape {flat.shape} does not match science shape {sci.shape}")
    out = {key: np.empty(sci.shape, np.float32)
           for key in ("data", "var_flat", "var_poisson", "var_rnoise", "err")}
    out["dq"] = np.empty(sci.shape, np.uint32)
    for b in row_blocks(sci.shape):
        _apply_flat_block(out, b, sci, err, dq, flat, flat_err, flat_dq, var_poisson, var_rnoise,
                          var_flat)
    return out


def _apply_flat_block(out: dict[str, np.ndarray], b: slice, sci, err, dq, flat, flat_err, flat_dq,
                      var_poisson, var_rnoise, var_flat) -> None:
    """:func:`apply_flat` on rows ``b`` (float64 arithmetic, float32 results into ``out``)."""
    flat_b = flat[b]
    fdq = None if flat_dq is None else flat_dq[b]
    bad = unusable_flat(flat_b, fdq)
    f = np.where(bad, 1.0, flat_b).astype(np.float64)
    f2 = f * f
    data = sci[b] / f
    out["data"][b] = data
    if flat_err is None:
        rel = np.zeros_like(f)
    else:
        rel = np.where(bad | ~np.isfinite(flat_err[b]), 0.0, flat_err[b] / f)
    zeros = np.zeros(f.shape, np.float64)
    vf_in = zeros if var_flat is None else var_flat[b]
    vf = vf_in / f2 + np.where(np.isfinite(data), data, 0.0) ** 2 * rel**2
    out["var_flat"][b] = vf
    out["var_poisson"][b] = (zeros if var_poisson is None else var_poisson[b]) / f2
    out["var_rnoise"][b] = (zeros if var_rnoise is None else var_rnoise[b]) / f2
    # ERR_in already contains VAR_FLAT_in; remove it once so it is not counted twice.
    base = err[b].astype(np.float64) ** 2 / f2 - vf_in / f2
    out["err"][b] = np.sqrt(np.maximum(base, 0.0) + vf)
    dq_out = dq[b].astype(np.uint32, copy=True)
    if fdq is not None:
        dq_out |= fdq.astype(np.uint32, copy=False)
    dq_out[bad] |= NO_FLAT
    out["dq"][b] = dq_out
