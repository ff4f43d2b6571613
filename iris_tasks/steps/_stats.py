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


# Element-wise steps are evaluated in blocks of rows of about this many pixels: their float64
# temporaries (~8 of them) then stay in cache instead of each being a fresh 134 MB
# allocation at 4096^2 (allocation + page faults + memory traffic were most of the time).
# The expressions are unchanged, so results are bit-identical to whole-array evaluation.
BLOCK_PIXELS = 1 << 16


def row_blocks(shape: tuple[int, ...], block_pixels: int | None = None) -> list[slice]:
    """Slices of the first axis covering ``shape`` in blocks of ~``block_pixels`` elements
    (default :data:`BLOCK_PIXELS`, read at call time)."""
    if block_pixels is None:
        block_pixels = BLOCK_PIXELS
    if len(shape) == 0:
        return [slice(None)]
    n = shape[0]
    per_row = max(1, int(np.prod(shape[1:], dtype=np.int64)))
    rows = max(1, block_pixels // per_row)
    return [slice(i, min(n, i + rows)) for i in range(0, max(n, 1), rows)]
