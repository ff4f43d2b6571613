"""Residual 1/f background of an IFS frame, fitted on the extraction's residual.

The readout's reference-pixel correction leaves, in every ``_rate`` image, a background made of
the part of the 1/f noise that the side reference columns cannot follow (docs/readout.md): an
offset per readout channel that drifts slowly along the slow-read direction y, plus row-to-row
stripes. A lenslet frame is mostly unlit and ``destripe`` measures it between the spectra. A
slicer frame is not: its spectra are one column apart over whole slices, so only the gaps
between slices and the rows beyond the ends of the spectra see no light, and even the gaps
carry the halo of the slices' outermost spaxels. There the background can only be measured
together with the light.

The extraction does that (:func:`iris_tasks.ifs.extract.extract` with ``background=``): its
first pass fits the cube with the background in the data; inside a slice the fitted fluxes
absorb the background (one spaxel per column can reproduce any level), but in the gaps and
beyond the spectra the model predicts only the little light of the profile wings, so the
residual ``D - A g`` there is the background. :func:`fit_background` fits a smooth model to
that residual on those pixels, the extraction subtracts it from the data and fits again. This
is the JWST ``clean_flicker_noise``/NSClean idea (measure the 1/f on the pixels that carry no
science light, sources masked) with the masking done by the instrument model's own prediction,
so that pixels in the wings can be used.

Model: in every readout channel ``c`` a piecewise-linear function of the row, with knots every
``knot_rows`` rows, ``b_c(y) = sum_m theta_cm h_m(y)``. Few channels of a slicer frame hold a
gap (at 1024 px about one in three; at 4096 px most), so each channel's curve is tied to the
mean curve of all channels by a Gaussian prior whose width - the scatter of the channels about
their mean - is estimated from the data (the channels that measure their own curve well): a
channel without background pixels takes the common curve (half of the simulator's 1/f is
common to all channels), a well-measured channel its own. Row-to-row stripes are not modelled:
they average out in the sums over wavelength that fluxes are made of.

Pure functions over arrays; see docs/ifs.md, "Residual 1/f background of slicer frames".
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

import numpy as np

from .destripe import channel_edges

log = logging.getLogger(__name__)

__all__ = ["BackgroundFit", "BackgroundSpec", "background_pixels", "fit_background",
           "halo_image", "row_basis"]


@dataclass(frozen=True)
class BackgroundSpec:
    """What :func:`fit_background` models and where it looks.

    nchan: readout channels (vertical bands of columns, the readout's layout).
    knot_rows: spacing of the knots of each channel's piecewise-linear curve in y (rows).
    max_light: pixels whose total profile weight (the trace's ``A 1``) is below this fraction
        of its median over lit pixels measure the background (gaps, spectrum ends, far wings).
    clip: residuals beyond this many sigma (their own variance) from the fitted curve get a
        bounded (Huber) influence: cosmic-ray remnants, hot pixels, sky-line wings.
    iterations: rounds of the iteratively reweighted (Huber) fit.
    halo_px: > 0 fits, jointly with the curves, one amplitude of a halo term - the model
        image spread in x by a Gaussian of this sigma beyond the profile window
        (:func:`halo_image`) - so that light the profile misses in the gaps is not read as
        background; 0: no halo term.
    use_ends: also use the rows beyond the ends of the spectra (rows without any lit pixel).
    row_term: add one offset per row common to all channels (the row-to-row part of the
        common-mode 1/f), measured by every background pixel of the row, with its smooth
        part (a running mean over ``knot_rows``) left to the curves.
    border: frame-edge rows/columns never used (H4RG reference pixels).
    """

    nchan: int = 32
    knot_rows: int = 64
    max_light: float = 0.05
    clip: float = 3.0
    iterations: int = 6
    halo_px: float = 0.0
    use_ends: bool = True
    row_term: bool = False
    border: int = 4


@dataclass
class BackgroundFit:
    """A fitted background: the image and how it was obtained."""

    image: np.ndarray  # (ny, nx) float64 background, the data's units
    curves: np.ndarray  # (nchan, nknots) knot values of each channel's curve
    common: np.ndarray  # (nknots,) the mean curve over channels
    channel_sigma: float  # scatter of the channels' curves about the common one (prior width)
    n_pixels: int  # pixels used
    n_channels_measured: int  # channels with background pixels of their own
    lit_mean: float  # mean of the background over the lit pixels (what the fluxes would carry)
    halo_amplitude: float = 0.0  # fitted amplitude of the halo term (0 without one)
    row_offsets: np.ndarray | None = None  # (ny,) the row term (``row_term``), else None


def row_basis(ny: int, knot_rows: int) -> tuple[np.ndarray, np.ndarray]:
    """Piecewise-linear hat functions in y: (knot rows (K,), basis (ny, K)), knots at both
    ends and every ~``knot_rows`` rows between, so that every row is a convex combination of
    its two neighbouring knots."""
    if knot_rows < 1:
        raise ValueError(f"knot_rows must be >= 1, got {knot_rows}")
    nk = max(2, int(round((ny - 1) / knot_rows)) + 1)
    knots = np.linspace(0.0, ny - 1.0, nk)
    y = np.arange(ny, dtype=np.float64)
    basis = np.clip(1.0 - np.abs(y[:, None] - knots[None, :]) / (knots[1] - knots[0]), 0.0, None)
    return knots, basis


def halo_image(model: np.ndarray, sigma: float, inner: int) -> np.ndarray:
    """The model image spread along x by a unit-sum Gaussian of ``sigma`` columns that is zero
    within ``inner`` columns of its centre (the profile window, which the model describes)."""
    from scipy.ndimage import convolve1d

    half = int(np.ceil(4.0 * sigma)) + int(inner)
    d = np.arange(-half, half + 1, dtype=np.float64)
    kernel = np.where(np.abs(d) > inner, np.exp(-0.5 * (d / sigma) ** 2), 0.0)
    kernel /= kernel.sum()
    return convolve1d(np.asarray(model, np.float64), kernel, axis=1, mode="constant")


def background_pixels(light: np.ndarray, usable: np.ndarray, max_light: float,
                      border: int = 4, use_ends: bool = True) -> np.ndarray:
    """(ny, nx) bool: usable pixels where the trace puts less than ``max_light`` of its median
    lit-pixel weight (``light`` = the trace's total profile weight per pixel, ``A 1``), away
    from a ``border`` of reference pixels; without ``use_ends`` only in rows that some
    spectrum reaches."""
    light = np.asarray(light, np.float64)
    lit = light > 0
    typical = float(np.median(light[lit])) if lit.any() else 1.0
    out = np.asarray(usable, bool) & (light < max_light * typical)
    if not use_ends:
        out &= lit.any(axis=1)[:, None]
    if border > 0:
        out[:border] = out[-border:] = False
        out[:, :border] = out[:, -border:] = False
    return out


def _solve(sw: np.ndarray, swr: np.ndarray, basis: np.ndarray
           ) -> tuple[np.ndarray, np.ndarray, float, np.ndarray]:
    """Knot values per channel from the (ny, nchan) sums of weight and weight x residual:
    (curves (nchan, K), common (K,), channel scatter, channels with data)."""
    nchan, nk = sw.shape[1], basis.shape[1]
    # per channel normal equations M_c = H^T diag(sw_c) H (tridiagonal: hat functions overlap
    # only their neighbours), v_c = H^T swr_c
    eye = np.eye(nk)
    M = np.zeros((nchan, nk, nk))
    k = np.arange(nk)
    M[:, k, k] = sw.T @ basis**2
    off = sw.T @ (basis[:, :-1] * basis[:, 1:])
    M[:, k[:-1], k[1:]] = off
    M[:, k[1:], k[:-1]] = off
    v = basis.T @ swr  # (nk, nchan)
    info = np.einsum("ckk->c", M) / nk  # mean information per knot of each channel
    own = info > 0

    def with_prior(prec: float) -> tuple[np.ndarray, np.ndarray]:
        # theta_c = (M_c + p I)^-1 (v_c + p theta_bar); theta_bar = mean_c theta_c
        inv = np.linalg.inv(M + prec * eye[None])  # (nchan, nk, nk)
        a = np.einsum("ckl,lc->ck", inv, v)  # (nchan, nk)
        common = np.linalg.solve(eye - prec * inv.mean(axis=0), a.mean(axis=0))
        return a + prec * np.einsum("ckl,l->ck", inv, common), common

    # free curves first (a tiny prior keeps empty channels finite), then the scatter
    curves, common = with_prior(1e-9 * float(info.max()) if own.any() else 1.0)
    sigma = 0.0
    for _ in range(2):
        if own.sum() >= 4:
            noise = 1.0 / info[own]  # ~ variance of a knot value
            excess = ((curves[own] - common) ** 2).mean(axis=1) - noise
            sharp = noise < max(float(np.median(excess)), 0.0) / 4.0
            if sharp.sum() >= 4:
                sigma = float(np.sqrt(max(np.mean(excess[sharp]), 0.0)))
        prec = 1.0 / sigma**2 if sigma > 0 else 1e12 * max(float(info.max()), 1.0)
        curves, common = with_prior(prec)
    return curves, common, sigma, own


def fit_background(residual: np.ndarray, weight: np.ndarray, pixels: np.ndarray,
                   spec: BackgroundSpec, lit: np.ndarray | None = None,
                   halo: np.ndarray | None = None) -> BackgroundFit:
    """Fit each channel's smooth background curve to ``residual`` on ``pixels``.

    ``residual``: (ny, nx) data minus the extraction's model; ``weight``: 1 / variance (0 for
    unusable pixels); ``pixels``: where the background is measured (:func:`background_pixels`).
    ``lit``: pixels the extraction uses (for :attr:`BackgroundFit.lit_mean`). ``halo``: an
    image of light the model misses, per unit amplitude (:func:`halo_image`); its amplitude
    is fitted by alternating with the curves (it varies across a channel, the curves do not)
    and it is not part of the background returned.

    Each channel's knot values theta_c minimise a robust (Huber, ``spec.clip`` sigma) sum of
    the weighted residuals plus ``|theta_c - theta_bar|^2 / s^2``, with theta_bar the mean
    curve and ``s`` the channels' scatter about it. ``s`` is estimated from the channels whose
    own curve is determined to better than half the scatter (at least 4 of them), starting
    from free curves; with fewer the channels share one curve. The Huber weights (iteratively
    reweighted, ``spec.iterations`` rounds) give pixels that do not follow a smooth curve -
    cosmic-ray remnants, hot pixels, the profile wings of bright sky lines where the model's
    profile is not exact - a bounded influence; a hard clip about a per-row median would keep
    a sky line's whole row. Only the measuring pixels are gathered: sums per row and channel
    by ``bincount``, then a few K x K solves (K knots).
    """
    ny, nx = np.shape(residual)
    nchan = min(int(spec.nchan), nx)
    edges = channel_edges(nx, nchan)
    chan_of_col = np.repeat(np.arange(nchan), np.diff(edges))
    idx = np.flatnonzero(np.asarray(pixels, bool))
    rv = np.asarray(residual).ravel()[idx].astype(np.float64)
    wv = np.asarray(weight).ravel()[idx].astype(np.float64)
    ok = (wv > 0) & np.isfinite(rv)
    idx, rv, wv = idx[ok], rv[ok], wv[ok]
    hv = None if halo is None else np.asarray(halo).ravel()[idx].astype(np.float64)
    amplitude = 0.0
    seg = (idx // nx) * nchan + chan_of_col[idx % nx]
    _, basis = row_basis(ny, spec.knot_rows)
    robust = np.ones_like(wv)
    sqrt_w = np.sqrt(wv)
    rows = idx // nx
    row_off = np.zeros(ny)
    rounds = max(1, int(spec.iterations)) if (spec.clip > 0 or hv is not None
                                              or spec.row_term) else 1
    for _ in range(rounds):
        ww = wv * robust
        target = rv if hv is None else rv - amplitude * hv
        if spec.row_term:
            target = target - row_off[rows]
        sw = np.bincount(seg, ww, minlength=ny * nchan).reshape(ny, nchan)
        swr = np.bincount(seg, ww * target, minlength=ny * nchan).reshape(ny, nchan)
        curves, common, sigma, own = _solve(sw, swr, basis)
        fitted = (basis @ curves.T).ravel()[seg]
        if hv is not None:
            den = float(np.sum(ww * hv * hv))
            amplitude = float(np.sum(ww * hv * (rv - fitted - row_off[rows])) / den
                              ) if den > 0 else 0.0
            fitted = fitted + amplitude * hv
        if spec.row_term:
            from scipy.ndimage import uniform_filter1d

            sw_row = np.bincount(rows, ww, minlength=ny)
            s_row = np.bincount(rows, ww * (rv - fitted), minlength=ny)
            raw = np.where(sw_row > 0, s_row / np.maximum(sw_row, 1e-300), 0.0)
            # the smooth part belongs to the curves (else the two are degenerate)
            smooth = (uniform_filter1d(raw * (sw_row > 0), spec.knot_rows, mode="nearest")
                      / np.maximum(uniform_filter1d((sw_row > 0).astype(float),
                                                    spec.knot_rows, mode="nearest"), 1e-12))
            row_off = np.where(sw_row > 0, raw - smooth, 0.0)
            fitted = fitted + row_off[rows]
        if spec.clip > 0:
            z = np.abs(rv - fitted) * sqrt_w
            robust = np.minimum(1.0, spec.clip / np.maximum(z, 1e-300))
    image = _image(curves, basis, edges)
    if spec.row_term:
        image += row_off[:, None]
    lit_mean = float(image[lit].mean()) if lit is not None and np.any(lit) else float(image.mean())
    return BackgroundFit(image=image, curves=curves, common=common, channel_sigma=sigma,
                         n_pixels=int(idx.size), n_channels_measured=int(own.sum()),
                         lit_mean=lit_mean, halo_amplitude=amplitude,
                         row_offsets=row_off if spec.row_term else None)


def _image(curves: np.ndarray, basis: np.ndarray, edges: np.ndarray) -> np.ndarray:
    """(ny, nx) image of the channels' curves."""
    per_channel = basis @ curves.T  # (ny, nchan)
    return np.repeat(per_channel, np.diff(edges), axis=1)
