"""Bad-pixel mask -> DQ: the algorithm of the dq_init step (pure functions over arrays)."""

from __future__ import annotations

import numpy as np

from ..datamodels.dqflags import pixel


def apply_mask(dq: np.ndarray, mask_dq: np.ndarray) -> np.ndarray:
    """``dq`` OR the mask's flags (new array, uint32).

    Mask flags are combined with OR, never assigned, so flags set earlier (saturation,
    jumps from stage 1) survive. Mask pixels flagged DEAD, HOT or NON_SCIENCE without
    DO_NOT_USE are left usable: which of those a measurement tolerates is the user's choice.
    """
    if dq.shape != mask_dq.shape:
        raise ValueError(f"mask shape {mask_dq.shape} does not match DQ shape {dq.shape}")
    return (dq.astype(np.uint32, copy=False) | mask_dq.astype(np.uint32, copy=False)).astype(np.uint32)


def flag_non_finite(sci: np.ndarray, dq: np.ndarray) -> np.ndarray:
    """DQ with DO_NOT_USE on pixels whose science value is NaN or infinite."""
    bad = ~np.isfinite(sci)
    out = dq.astype(np.uint32, copy=True)
    out[bad] |= np.uint32(pixel["DO_NOT_USE"])
    return out
