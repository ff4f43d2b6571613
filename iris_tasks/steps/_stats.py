"""Small, fast statistics along the first axis of a stack (NaN = missing)."""

from __future__ import annotations

import numpy as np


def nanmedian_axis0(stack: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(median over axis 0 ignoring NaN, number of finite values); NaN where there are none.

    ``np.nanmedian`` on a short first axis goes through masked arrays and is several times
    slower. Sorting pushes NaN to the end, so the median of the n finite values of a column
    is the mean of its sorted entries (n - 1) // 2 and n // 2.
    """
    ordered = np.sort(stack, axis=0)
    count = np.isfinite(stack).sum(axis=0)
    lo = np.take_along_axis(ordered, np.maximum((count - 1) // 2, 0)[None], axis=0)[0]
    hi = np.take_along_axis(ordered, (count // 2).clip(max=stack.shape[0] - 1)[None], axis=0)[0]
    median = np.where(count > 0, 0.5 * (lo + hi), np.nan)
    return median.astype(stack.dtype, copy=False), count
