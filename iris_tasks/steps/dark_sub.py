"""Dark-current subtraction: the algorithm of the dark_sub step (pure functions over arrays).

Scaling: science and dark are both *rates* (DN/s) measured with the same read pattern
(CRDS matches the dark on DETECTOR and READPATT), so the dark is subtracted as it is; no
exposure-time scaling is involved. Matching READPATT keeps pattern-dependent signatures (reset
anomaly, glow integrated differently over short and long ramps) consistent between the two.
"""

from __future__ import annotations

import numpy as np

from ..datamodels.dqflags import pixel
from ._stats import row_blocks

_UNRELIABLE = np.uint32(pixel["UNRELIABLE_DARK"] | pixel["DO_NOT_USE"])


def subtract_dark(
    sci: np.ndarray,
    err: np.ndarray,
    dq: np.ndarray,
    dark: np.ndarray,
    dark_err: np.ndarray | None = None,
    dark_dq: np.ndarray | None = None,
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(sci - dark, sqrt(err**2 + dark_err**2), dq | dark_dq).

    Pixels where the dark is NaN/inf are left unsubtracted and flagged
    UNRELIABLE_DARK | DO_NOT_USE rather than turned into NaN or silently kept. The dark's
    own DQ (HOT, WARM, ...) is OR'ed into the science DQ.
    """
    if dark.shape != sci.shape:
        raise ValueError(f"dark shape {dark.shape} does not match science shape {sci.shape}")
    out_sci = np.empty(sci.shape, np.float32)
    out_err = np.empty(sci.shape, np.float32)
    out_dq = np.empty(sci.shape, np.uint32)
    for b in row_blocks(sci.shape):
        valid = np.isfinite(dark[b])
        dark_used = np.where(valid, dark[b], 0.0).astype(np.float32)
        out_sci[b] = sci[b] - dark_used
        var = err[b].astype(np.float64) ** 2
        if dark_err is not None:
            de = np.where(valid & np.isfinite(dark_err[b]), dark_err[b], 0.0)
            var = var + de.astype(np.float64) ** 2
        out_err[b] = np.sqrt(var)
        dq_b = dq[b].astype(np.uint32, copy=True)
        if dark_dq is not None:
            dq_b |= dark_dq[b].astype(np.uint32, copy=False)
        dq_b[~valid] |= _UNRELIABLE
        out_dq[b] = dq_b
    return out_sci, out_err, out_dq
