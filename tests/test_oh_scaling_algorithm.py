"""iris_tasks.ifs.oh_scaling on a synthetic cube: per-window factors recovered (fast)."""

from __future__ import annotations

import numpy as np

from iris_tasks.ifs.cube import outer_spaxels
from iris_tasks.ifs.oh_scaling import line_windows, scale_oh_lines


def test_line_windows_merge_and_stay_on_the_grid():
    w = np.linspace(2.0, 2.1, 101)
    assert line_windows(w, [2.0, 2.0021, 2.05, 2.2], 1) == [(0, 4), (49, 52)]


def test_window_factors_recovered_and_residuals_cut():
    rng = np.random.default_rng(0)
    nw, ny, nx = 400, 10, 30
    w = np.linspace(2.0, 2.2, nw)
    lines = np.sort(rng.uniform(2.01, 2.19, 25))
    # lines vary in groups (as lines of one vibrational transition do): 0.02 micron blocks
    block_f = rng.uniform(0.7, 1.4, 10)
    true_f = block_f[np.floor((lines - 2.0) / 0.02).astype(int)]
    k = np.arange(nw)

    def spectrum(f):
        out = np.full(nw, 5.0)
        for lam, amp in zip(lines, f, strict=True):
            out += 100 * amp * np.exp(-0.5 * ((k - (lam - w[0]) / (w[1] - w[0])) / 1.0) ** 2)
        return out

    sky = np.broadcast_to(spectrum(np.ones(lines.size))[:, None, None], (nw, ny, nx)).copy()
    sci = np.broadcast_to(spectrum(true_f)[:, None, None], (nw, ny, nx)).copy()
    sci[:, 4:6, 14:16] += 50.0  # a source in the middle: not in the sky spaxels
    good = np.ones(sci.shape, bool)
    scaled, fit = scale_oh_lines(sci, good, sky, good, w, lines, outer_spaxels(ny, nx, 0.7))
    assert fit.residual_after < fit.residual_before / 5  # measured 8.2x (blends across groups)
    resid = (sci - scaled)[:, 0, 0]  # a sky spaxel
    unscaled = (sci - sky)[:, 0, 0]
    assert np.sqrt(np.mean(resid**2)) < np.sqrt(np.mean(unscaled**2)) / 5
    # each isolated line's window factor is its true factor
    for lam, f in zip(lines, true_f, strict=True):
        c = int(round((lam - w[0]) / (w[1] - w[0])))
        if all(abs(lam - other) > 0.004 for other in lines if other != lam):
            assert abs(fit.factor[c] - f) < 0.02, (lam, fit.factor[c], f)
