"""Scaled OH sky subtraction for IFS cubes (arrays only), after Davies 2007 (MNRAS 375, 1099).

The OH airglow varies by tens of per cent in minutes, and not uniformly: lines from different
vibrational transitions vary independently. A sky frame taken minutes from the science frame
then leaves residuals at every line. Davies fits one scale factor per group of lines of the
same transition; the published line list used here (Rousselot et al. 2000) carries no
transition labels, so the groups are **windows around each line or blend** (overlapping
windows merged), each with its own factor:

1. sky-dominated spaxels (the field's outskirts, the same choice as the outer-spaxel sky) give
   the science cube's and the sky cube's sky spectra (medians over those spaxels);
2. each spectrum's continuum (running median of ``continuum_bins``) is removed: what is left
   are the lines;
3. in each window, the factor ``f = sum(o s) / sum(s s)`` (least squares through zero) of the
   science lines ``o`` on the sky lines ``s``;
4. the sky cube's line part (each spaxel's spectrum minus its running median) is multiplied by
   ``f`` in the windows, the continuum left as it is.

The residual rms in the windows over the sky spaxels, before and after, is returned for QA.
"""

from __future__ import annotations

import logging
import warnings
from dataclasses import dataclass

import numpy as np
from scipy.ndimage import median_filter

log = logging.getLogger(__name__)

__all__ = ["OhScaling", "line_windows", "scale_oh_lines"]


@dataclass
class OhScaling:
    """The fitted scale factors and what they did."""

    factor: np.ndarray  # (nw,) applied to the sky's line part (1 outside windows)
    windows: list[tuple[int, int]]  # [start, stop) bins
    window_factors: np.ndarray
    residual_before: float  # rms of science - sky in the windows over the sky spaxels
    residual_after: float


def line_windows(wave_um: np.ndarray, lines_um: np.ndarray, half_bins: int
                 ) -> list[tuple[int, int]]:
    """[start, stop) bin ranges of +-``half_bins`` around each line inside the grid, merged."""
    w = np.asarray(wave_um, np.float64)
    step = float(np.median(np.diff(w)))
    k = np.rint((np.asarray(lines_um, np.float64) - w[0]) / step).astype(np.int64)
    k = np.unique(k[(k >= 0) & (k < w.size)])
    out: list[tuple[int, int]] = []
    for c in k:
        a, b = max(0, int(c) - half_bins), min(w.size, int(c) + half_bins + 1)
        if out and a <= out[-1][1]:
            out[-1] = (out[-1][0], max(out[-1][1], b))
        else:
            out.append((a, b))
    return out


def _median_spectrum(cube: np.ndarray, good: np.ndarray, spaxels: np.ndarray) -> np.ndarray:
    vals = np.where(good[:, spaxels], cube[:, spaxels], np.nan)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)
        return np.nan_to_num(np.nanmedian(vals, axis=1))


def scale_oh_lines(science: np.ndarray, science_good: np.ndarray, sky: np.ndarray,
                   sky_good: np.ndarray, wave_um: np.ndarray, lines_um: np.ndarray,
                   sky_spaxels: np.ndarray, *, half_bins: int = 3, continuum_bins: int = 31,
                   factor_range: tuple[float, float] = (0.3, 3.0)) -> tuple[np.ndarray, OhScaling]:
    """(the sky cube with its OH lines scaled to the science frame's, the fit).

    ``science``/``sky``: cubes (nw, ny, nx) on one grid; ``*_good``: usable voxels;
    ``sky_spaxels`` (ny, nx): spaxels where the science frame is sky only; ``lines_um``: the
    OH lines (vacuum micron) bright enough to matter. A window whose sky lines carry no signal
    keeps factor 1; factors outside ``factor_range`` are clipped to it (and logged).
    """
    sci = np.asarray(science, np.float64)
    sk = np.asarray(sky, np.float64)
    spax = np.asarray(sky_spaxels, bool)
    o = _median_spectrum(sci, science_good, spax)
    s = _median_spectrum(sk, sky_good, spax)
    o_lines = o - median_filter(o, continuum_bins, mode="nearest")
    s_lines = s - median_filter(s, continuum_bins, mode="nearest")
    windows = line_windows(wave_um, lines_um, half_bins)
    factor = np.ones(o.size)
    fitted = np.ones(len(windows))
    for n, (a, b) in enumerate(windows):
        den = float(np.sum(s_lines[a:b] ** 2))
        if den <= 0:
            continue
        f = float(np.sum(o_lines[a:b] * s_lines[a:b]) / den)
        if not factor_range[0] <= f <= factor_range[1]:
            log.info("OH window %d-%d: factor %.2f clipped to %s", a, b, f, factor_range)
            f = float(np.clip(f, *factor_range))
        factor[a:b] = f
        fitted[n] = f
    in_win = np.zeros(o.size, bool)
    for a, b in windows:
        in_win[a:b] = True
    before = float(np.sqrt(np.mean((o_lines - s_lines)[in_win] ** 2))) if in_win.any() else 0.0
    after = float(np.sqrt(np.mean((o_lines - factor * s_lines)[in_win] ** 2))) if in_win.any() else 0.0
    # the sky cube's own continuum per spaxel, its lines scaled
    filled = np.where(sky_good, sk, np.nan)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)
        filled = np.where(np.isfinite(filled), filled, np.nanmedian(filled, axis=0)[None])
    cont = median_filter(np.nan_to_num(filled), size=(continuum_bins, 1, 1), mode="nearest")
    scaled = cont + factor[:, None, None] * (sk - cont)
    log.info("OH scaling: %d windows, factors %.2f-%.2f (median %.2f); line residual rms "
             "%.3g -> %.3g", len(windows), float(fitted.min(initial=1.0)),
             float(fitted.max(initial=1.0)), float(np.median(fitted)) if fitted.size else 1.0,
             before, after)
    return scaled, OhScaling(factor=factor, windows=windows, window_factors=fitted,
                             residual_before=before, residual_after=after)
