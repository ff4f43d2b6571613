"""H4RG-10 detector model and up-the-ramp read simulation.

A :class:`DetectorModel` holds every per-pixel property of one IRIS detector (bias, gain, read
noise, dark current, hot/dead pixels, non-linearity, full well, pixel response). It is generated
deterministically from ``(seed, detector name, size)``, so the reference files written before a
night and the raw frames of that night describe the same detector.

:func:`simulate_ramp` turns an illumination (e-/s per pixel) into uint16 reads. Charge is
accumulated read by read (Poisson increments per read interval), so the shot noise is correlated
up the ramp exactly as in a real integrating detector; then non-linearity, the full-well plateau,
bias, kTC, white read noise and 1/f noise are applied and the values are clipped to uint16.
"""

from __future__ import annotations

import dataclasses
import logging
import math
import time
import zlib
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field

import numpy as np

log = logging.getLogger(__name__)

FULL_SIZE = 4096
REFPIX = 4
DEFAULT_READ_TIME = 1.4  # s per read (read i ends at (i + 1) * READTIME)
DEFAULT_NCHAN = 32
PIXEL_PITCH_UM = 10.0
DEFAULT_CR_RATE = 5.0  # events / cm^2 / s

# Above this many electrons per read interval the Poisson draw is replaced by a normal draw of
# the same mean and variance: the relative error of that approximation is < 1e-3 there and it
# is several times cheaper than numpy's Poisson sampler for large means.
NORMAL_APPROX_ELECTRONS = 1000.0
# Below this many electrons per pixel over the whole ramp, draw the ramp total once and spread
# the electrons uniformly over the read intervals (Poisson splitting: statistically identical to
# independent Poisson increments, and ~nreads times cheaper for dark frames).
SPLIT_BELOW_ELECTRONS = 2.0

NOISE_COMPONENTS = frozenset({"poisson", "read", "ktc", "onef"})

ProgressFn = Callable[[float, str], None]


def name_code(name: str) -> int:
    """Stable integer for a name, used as a key of numpy seed sequences."""
    return zlib.crc32(name.encode("utf-8"))


def seed_sequence(seed: int, *keys: str | int) -> np.random.SeedSequence:
    """Independent, reproducible random stream for ``seed`` and a path of keys.

    Every random quantity of the simulator (detector maps, each frame, each scene) draws from its
    own stream, so simulating a subset of detectors or frames gives identical bytes for the
    frames that are simulated.
    """
    spawn_key = tuple(_spawn_code(k) for k in keys)
    return np.random.SeedSequence(entropy=int(seed), spawn_key=spawn_key)


def _spawn_code(key: str | int) -> int:
    """A seed-sequence key as the non-negative integer numpy requires: names by their CRC, a
    negative number (an exposure before its night's clock starts) by the CRC of its text."""
    if isinstance(key, str):
        return name_code(key)
    value = int(key)
    return value if value >= 0 else name_code(f"negative:{value}")


def _smooth_pattern(rng: np.random.Generator, ny: int, nx: int, amplitude: float,
                    order: int = 3) -> np.ndarray:
    """Smooth large-scale 2-D pattern (sum of low-order cosines), unit mean, rms ~ amplitude."""
    yy = (np.arange(ny, dtype=np.float32) + 0.5) / ny
    xx = (np.arange(nx, dtype=np.float32) + 0.5) / nx
    out = np.zeros((ny, nx), np.float32)
    for p in range(order):
        for q in range(order):
            if p == 0 and q == 0:
                continue
            coeff = rng.normal(0.0, amplitude / (p + q))
            # Outer product of two 1-D cosines: cheap even at 4096x4096.
            out += np.float32(coeff) * np.outer(np.cos(np.pi * p * yy), np.cos(np.pi * q * xx))
    return 1.0 + out


@dataclass
class DetectorModel:
    """Every per-pixel property of one simulated H4RG-10 (arrays are (ny, nx) float32)."""

    name: str
    det_id: str
    seed: int
    ny: int
    nx: int
    nchan: int
    refpix: int
    gain: np.ndarray  # e-/DN
    read_noise: np.ndarray  # DN per read (white)
    bias: np.ndarray  # DN, fixed reset level incl. the per-channel offsets
    channel_bias: np.ndarray  # (nchan,) DN offsets of each output relative to the base bias
    dark_current: np.ndarray  # e-/s, 0 in reference pixels
    hot: np.ndarray  # bool
    nonlin_a: np.ndarray  # 1/DN: measured = true * (1 - a * true) (signal above bias, DN)
    saturation: np.ndarray  # DN incl. bias: the full-well plateau of the raw reads
    pixel_response: np.ndarray  # relative QE (1 = nominal; 0 = dead), 0 in reference pixels
    dead: np.ndarray  # bool
    low_qe: np.ndarray  # bool
    ktc_noise: float = 15.0  # DN rms, per pixel, constant within a ramp
    onef_rms: float = 2.0  # DN rms of the 1/f component per read
    onef_common: float = 0.5  # fraction of the 1/f variance common to all channels
    sat_margin: float = 250.0  # DN: the saturation reference sits this far below the plateau
    cr_rate: float = DEFAULT_CR_RATE  # cosmic-ray events / cm^2 / s
    pixel_pitch_um: float = PIXEL_PITCH_UM
    # Bad reference pixels: this fraction of the 4-pixel border is hot (ramps at 10-1000 DN/s,
    # leakage), dead (stuck at 0 DN or at a fixed level: no read noise, no 1/f) or noisy
    # (5-20x the read noise), in the proportions bad_refpix_mix; bad_refpix_known of them
    # are in the mask reference (bad_refpix_mask()), the rest are found only by the data.
    # 0 by default (the frames of earlier versions, bit for bit).
    bad_refpix_fraction: float = 0.0
    bad_refpix_mix: tuple[float, float, float] = (0.4, 0.3, 0.3)
    bad_refpix_known: float = 0.5
    # Alternating column noise: a 1/f series per output channel added with opposite signs to
    # the even and odd columns of the channel (the two column buses of an H4RG output).
    # DN rms per read; 0 by default (the frames of earlier versions, bit for bit).
    acn_rms: float = 0.0
    # Snowballs: large cosmic-ray events (events / cm^2 / s), a round core of radius 1.5-5 px
    # that holds 20-100 ke- per pixel with a diffuse halo out to about twice that radius whose
    # charge per pixel falls from ~800 e- at the core's edge with a 1.2 px scale length (so
    # that its outer pixels' jumps are too small for a two-point test).  0 by default.
    snowball_rate: float = 0.0
    # Inter-pixel capacitance: each of the 4 nearest neighbours sees this fraction of a
    # pixel's signal (the pixel keeps 1 - 4 alpha), applied to the accumulated signal of
    # every read (so the shot noise is coupled too).  0 by default.  With IPC the frame is
    # simulated in one chunk (the coupling crosses chunk edges).
    ipc_alpha: float = 0.0
    # A measured-like 3x3 IPC kernel instead (possibly asymmetric): kernel[1 + dy, 1 + dx] is
    # the fraction of a pixel's charge seen by its neighbour at (dy, dx), sum 1 (the convention
    # of the ``ipc`` reference). None: the nearest-neighbour kernel of ipc_alpha.
    ipc_kernel: np.ndarray | None = None
    # Picture frame: an offset pattern of the readout that is strongest at the array's edges,
    # exp(-d / picture_frame_scale) with d the distance (px) from the nearest edge, whose
    # amplitude changes from read to read (picture_frame_rms DN, independent between reads)
    # and drifts over the ramp (picture_frame_drift DN/s, e.g. settling after the reset). The
    # reference border sits where it is strongest, so a reference-pixel correction carries it
    # to the whole frame. 0 by default (the frames of earlier versions, bit for bit).
    picture_frame_rms: float = 0.0
    picture_frame_drift: float = 0.0
    picture_frame_scale: float = 32.0
    # Correlated noise between the output channels at the pixel rate: one 1/f series sampled
    # at every pixel time (row_overhead extra pixel times per row and one extra row per read,
    # as an H4RG is clocked), the same in every channel at the same time (the channels are read
    # in parallel, odd ones right to left). DN rms per read; 0 by default. (The 1/f of onef_rms
    # is sampled 4 times per row and channel; onef_common of its variance is common.)
    common_noise_rms: float = 0.0
    row_overhead: int = 12
    _flats: dict[str, np.ndarray] = field(default_factory=dict, repr=False)

    # ------------------------------------------------------------------ construction
    @classmethod
    def for_detector(cls, name: str, size: int = FULL_SIZE, seed: int = 0, *,
                     nchan: int = DEFAULT_NCHAN, **overrides: object) -> DetectorModel:
        """The detector ``name`` (IMG1..IMG4, IFS) of a ``size`` x ``size`` array.

        ``overrides`` replace scalar parameters (e.g. ``onef_rms=0``, ``cr_rate=50``).
        """
        from ..metadata import DETECTORS

        if name not in DETECTORS:
            raise ValueError(f"unknown detector {name!r}; expected one of {', '.join(DETECTORS)}")
        if not 2 * REFPIX + 8 <= size <= FULL_SIZE:
            raise ValueError(f"size {size} out of range [{2 * REFPIX + 8}, {FULL_SIZE}]")
        if nchan < 1:
            raise ValueError(f"nchan must be positive (32 or 64 for an H4RG), not {nchan}")
        if nchan > size:
            raise ValueError(f"{nchan} channels do not fit {size} columns")
        t0 = time.perf_counter()
        rng = np.random.default_rng(seed_sequence(seed, "detector", name, size))
        ny = nx = int(size)
        shape = (ny, nx)
        active = np.zeros(shape, bool)
        active[REFPIX:-REFPIX, REFPIX:-REFPIX] = True
        chan = (np.arange(nx) * nchan) // nx

        # Gain: per-output amplifier gain (+-2 %) times a small pixel-to-pixel part.
        gain0 = float(rng.uniform(1.95, 2.10))
        gain_chan = gain0 * (1.0 + 0.02 * rng.standard_normal(nchan))
        gain = (gain_chan[chan][None, :] * (1.0 + 0.005 * rng.standard_normal(shape))).astype(np.float32)

        # Read noise: ~4.5 DN (~9 e-) per read, lognormal scatter and a few noisy pixels.
        rn0 = float(rng.uniform(4.0, 5.0))
        read_noise = (rn0 * rng.lognormal(0.0, 0.1, shape)).astype(np.float32)
        noisy = rng.random(shape) < 0.002
        read_noise[noisy] *= 3.0

        # Bias: base level + per-channel offsets + fixed pixel pattern.
        base_bias = float(rng.uniform(11000.0, 13000.0))
        channel_bias = rng.normal(0.0, 150.0, nchan).astype(np.float32)
        bias = (base_bias + channel_bias[chan][None, :]
                + rng.normal(0.0, 25.0, shape)).astype(np.float32)

        # Dark current: ~0.005 e-/s with lognormal scatter, 0.1 % hot pixels at 1-10 e-/s.
        dark = (0.005 * rng.lognormal(-0.045, 0.3, shape)).astype(np.float32)
        hot = (rng.random(shape) < 0.001) & active
        dark[hot] = (10.0 ** rng.uniform(0.0, 1.0, int(hot.sum()))).astype(np.float32)
        dark[~active] = 0.0

        # Non-linearity: measured = true * (1 - a * true), ~5 % low at full well.
        nonlin_a = (1.0e-6 * (1.0 + 0.08 * rng.standard_normal(shape))).astype(np.float32)
        np.clip(nonlin_a, 0.6e-6, 1.4e-6, out=nonlin_a)

        # Full-well plateau of the raw reads (DN incl. bias), 60-65k.
        saturation = np.clip(rng.normal(62500.0, 700.0, shape), 60000.0, 65000.0).astype(np.float32)

        # Pixel response (QE): 1.5 % pixel-to-pixel, a few dead and low-QE pixels.
        response = rng.normal(1.0, 0.015, shape).astype(np.float32)
        dead = (rng.random(shape) < 2e-4) & active
        low_qe = (rng.random(shape) < 5e-4) & active & ~dead
        response[low_qe] = rng.uniform(0.3, 0.6, int(low_qe.sum())).astype(np.float32)
        response[dead] = 0.0
        response[~active] = 0.0

        det_id = f"SIM-H4RG10-{name_code(name + str(seed)) % 100000:05d}"
        model = cls(name=name, det_id=det_id, seed=int(seed), ny=ny, nx=nx, nchan=int(nchan),
                    refpix=REFPIX, gain=gain, read_noise=read_noise, bias=bias,
                    channel_bias=channel_bias, dark_current=dark, hot=hot, nonlin_a=nonlin_a,
                    saturation=saturation, pixel_response=response, dead=dead, low_qe=low_qe)
        if overrides:
            model = dataclasses.replace(model, **overrides)
        log.debug("detector %s %dx%d built in %.2f s", name, ny, nx, time.perf_counter() - t0)
        return model

    # ------------------------------------------------------------------ derived maps
    @property
    def shape(self) -> tuple[int, int]:
        return (self.ny, self.nx)

    @property
    def active(self) -> np.ndarray:
        """True for light-sensitive pixels, False for the reference border."""
        mask = np.zeros(self.shape, bool)
        r = self.refpix
        mask[r:self.ny - r, r:self.nx - r] = True
        return mask

    @property
    def gain_nominal(self) -> float:
        """Mean gain over the active area (the GAIN header keyword)."""
        return round(float(self.gain[self.active].mean()), 4)

    @property
    def channel_of_column(self) -> np.ndarray:
        return (np.arange(self.nx) * self.nchan) // self.nx

    @property
    def ipc(self) -> np.ndarray | None:
        """The 3x3 IPC kernel the frames are coupled with, or None (no IPC)."""
        if self.ipc_kernel is not None:
            k = np.asarray(self.ipc_kernel, np.float64)
            if k.shape != (3, 3) or abs(k.sum() - 1.0) > 1e-6:
                raise ValueError(f"ipc_kernel must be 3x3 with sum 1, not {k.tolist()}")
            return k
        if self.ipc_alpha > 0:
            return ipc_kernel(self.ipc_alpha).astype(np.float64)
        return None

    def picture_frame_pattern(self) -> np.ndarray:
        """(ny, nx) float32 exp(-d / picture_frame_scale), d = pixels from the nearest edge."""
        y = np.arange(self.ny, dtype=np.float32)
        x = np.arange(self.nx, dtype=np.float32)
        dy = np.minimum(y, self.ny - 1 - y)[:, None]
        dx = np.minimum(x, self.nx - 1 - x)[None, :]
        scale = max(float(self.picture_frame_scale), 1e-3)
        return np.exp(-np.minimum(dy, dx) / np.float32(scale)).astype(np.float32)

    def saturation_reference(self) -> np.ndarray:
        """The SATURATION reference: a margin below the plateau so noisy plateau reads flag."""
        return (self.saturation - np.float32(self.sat_margin)).astype(np.float32)

    def flat(self, filter_name: str) -> np.ndarray:
        """True flat field for ``filter_name``: pixel response x smooth illumination pattern.

        Normalised to mean 1 over good active pixels; 0 for dead and reference pixels.
        """
        if filter_name not in self._flats:
            rng = np.random.default_rng(seed_sequence(self.seed, "flat", self.name, filter_name,
                                                      self.nx))
            # A few % large-scale structure (optics/illumination, filter dependent) and a mild
            # vignetting-like radial fall-off.
            pattern = _smooth_pattern(rng, self.ny, self.nx, 0.03)
            yy, xx = np.ogrid[:self.ny, :self.nx]
            r2 = (((yy - self.ny / 2) / self.ny) ** 2 + ((xx - self.nx / 2) / self.nx) ** 2) * 4
            pattern *= (1.0 - 0.02 * r2).astype(np.float32)
            flat = (self.pixel_response * pattern).astype(np.float32)
            good = self.active & ~self.dead & ~self.low_qe
            flat /= np.float32(flat[good].mean())
            self._flats[filter_name] = flat
        return self._flats[filter_name]

    def flat_dn(self, filter_name: str) -> np.ndarray:
        """The flat as measured in DN/s: QE flat / gain, normalised to median 1 over good pixels.

        A uniform lamp gives a rate in DN/s proportional to QE / gain, so a flat built from
        rate images (the nightly master flats) contains the per-pixel gain variation; this is
        the pre-night FLAT reference, which must agree with them. Good pixels are those the
        mask reference leaves unflagged (active, not dead, hot or low-QE), as in the master's
        normalisation. 0 for dead and reference pixels (like :meth:`flat`).
        """
        qe = self.flat(filter_name)
        with np.errstate(divide="ignore", invalid="ignore"):
            response = np.where(qe > 0, qe / self.gain, 0.0)
        good = self.active & ~self.dead & ~self.low_qe & ~self.hot
        return (response / np.median(response[good])).astype(np.float32)

    def nonlinear(self, true_dn: np.ndarray, rows: slice = slice(None)) -> np.ndarray:
        """Measured signal (DN above bias) for a linear signal ``true_dn`` (noiseless, no plateau)."""
        a = self.nonlin_a[rows]
        t = np.minimum(true_dn, 0.5 / a)  # the quadratic turns over at 1/(2a): never reached
        return t * (1.0 - a * t)

    # ------------------------------------------------------------------ bad reference pixels
    def bad_refpix(self) -> dict[str, np.ndarray]:
        """The bad reference pixels: ``kind`` (ny, nx) int8 (0 good, 1 hot, 2 dead, 3 noisy),
        ``hot_rate`` (DN/s), ``dead_level`` (DN), ``noise_factor`` and ``known`` (bool: in the
        mask reference).  Drawn from their own stream of (seed, name, size) and the
        ``bad_refpix_*`` parameters, so overriding the fraction leaves all else unchanged."""
        key = (self.bad_refpix_fraction, tuple(self.bad_refpix_mix), self.bad_refpix_known)
        cached = self._flats.get("__bad_refpix__")
        if cached is not None and cached["key"] == key:
            return cached
        f = float(self.bad_refpix_fraction)
        if not 0.0 <= f <= 1.0:
            raise ValueError(f"bad_refpix_fraction must be in [0, 1], not {f}")
        mix = np.asarray(self.bad_refpix_mix, np.float64)
        if mix.shape != (3,) or (mix < 0).any() or mix.sum() <= 0:
            raise ValueError(f"bad_refpix_mix must be 3 non-negative weights, not {self.bad_refpix_mix}")
        rng = np.random.default_rng(seed_sequence(self.seed, "bad_refpix", self.name, self.nx))
        border = ~self.active
        kind = np.zeros(self.shape, np.int8)
        u = rng.random(self.shape)
        bad = border & (u < f)
        kind[bad] = 1 + rng.choice(3, size=int(bad.sum()), p=mix / mix.sum())
        hot_rate = np.zeros(self.shape, np.float32)
        hot_rate[kind == 1] = 10.0 ** rng.uniform(1.0, 3.0, int((kind == 1).sum()))
        dead_level = np.zeros(self.shape, np.float32)
        nd = int((kind == 2).sum())
        dead_level[kind == 2] = np.where(rng.random(nd) < 0.5, 0.0,
                                         rng.uniform(1000.0, 60000.0, nd))
        noise_factor = np.ones(self.shape, np.float32)
        noise_factor[kind == 3] = rng.uniform(5.0, 20.0, int((kind == 3).sum()))
        known = bad & (rng.random(self.shape) < self.bad_refpix_known)
        out = {"key": key, "kind": kind, "hot_rate": hot_rate, "dead_level": dead_level,
               "noise_factor": noise_factor, "known": known}
        self._flats["__bad_refpix__"] = out
        return out

    def bad_refpix_mask(self) -> np.ndarray:
        """(ny, nx) bool: the bad reference pixels that the mask reference flags."""
        return self.bad_refpix()["known"].copy()

    # ------------------------------------------------------------------ linearity reference
    def linearity_fit_range(self) -> float:
        """Largest value of a * measured to cover: the plateau above the lowest bias (+2 %)."""
        active = self.active
        top = (self.saturation - self.bias)[active] * self.nonlin_a[active]
        return float(top.max()) * 1.02

    def linearity_coefficients(self, max_rel_error: float = 1e-5,
                               max_ncoeff: int = 8) -> tuple[np.ndarray, float]:
        """Per-pixel inverse polynomial: linear = sum_k c_k * raw**k, raw = DN above bias.

        The forward model is one-parameter (measured m = t(1 - a t)), so t = m F(a m) with a
        universal F; F is fitted numerically once (least squares, increasing degree until the
        relative error is below ``max_rel_error``) and scaled per pixel: c_k = g_{k-1} a^(k-1).
        Returns (coeffs (ncoeff, ny, nx) float32, achieved max relative error of the fit).
        """
        g, err = inverse_series(self.linearity_fit_range(), max_rel_error, max_ncoeff)
        # float32 is enough: a^(k-1) >= 1e-36 for k <= 8, and only ~1e-7 relative precision
        # of each coefficient is needed.
        a = self.nonlin_a
        coeffs = np.zeros((len(g) + 1, self.ny, self.nx), np.float32)
        coeffs[1] = 1.0
        for k in range(2, len(g) + 1):
            np.multiply(coeffs[k - 1], a, out=coeffs[k])  # a^(k-1)
        for k in range(1, len(g) + 1):
            coeffs[k] *= np.float32(g[k - 1])
        # Reference pixels carry no signal: identity correction.
        coeffs[:, ~self.active] = 0.0
        coeffs[1, ~self.active] = 1.0
        return coeffs, err

    # ------------------------------------------------------------------ truth export
    def scalars(self) -> dict[str, object]:
        return {
            "name": self.name, "det_id": self.det_id, "seed": self.seed, "ny": self.ny,
            "nx": self.nx, "nchan": self.nchan, "refpix": self.refpix,
            "gain_nominal": self.gain_nominal, "ktc_noise_dn": self.ktc_noise,
            "onef_rms_dn": self.onef_rms, "onef_common_fraction": self.onef_common,
            "sat_margin_dn": self.sat_margin, "cr_rate_per_cm2_s": self.cr_rate,
            "pixel_pitch_um": self.pixel_pitch_um,
            "channel_bias_dn": [float(v) for v in self.channel_bias],
            "n_hot": int(self.hot.sum()), "n_dead": int(self.dead.sum()),
            "n_low_qe": int(self.low_qe.sum()),
            "bad_refpix_fraction": self.bad_refpix_fraction, "acn_rms_dn": self.acn_rms,
            "snowball_rate_per_cm2_s": self.snowball_rate, "ipc_alpha": self.ipc_alpha,
            "ipc_kernel": None if self.ipc is None else self.ipc.tolist(),
            "picture_frame_rms_dn": self.picture_frame_rms,
            "picture_frame_drift_dn_per_s": self.picture_frame_drift,
            "picture_frame_scale_px": self.picture_frame_scale,
            "common_noise_rms_dn": self.common_noise_rms, "row_overhead_px": self.row_overhead,
        }


def inverse_series(vmax: float, max_rel_error: float = 1e-5,
                   max_ncoeff: int = 8) -> tuple[np.ndarray, float]:
    """Power-series coefficients g_j of F(v) = t/m with v = a m, for m = t (1 - a t).

    Exact inverse: a t = (1 - sqrt(1 - 4 v)) / 2. Fitted over v in [0, vmax] by least squares
    (Chebyshev basis for conditioning, then converted to a power series).
    """
    if not 0.0 < vmax < 0.25:
        raise ValueError(f"non-linearity range a*m = {vmax:.3g} outside (0, 0.25)")
    v = np.linspace(0.0, vmax, 4001)
    u = 0.5 * (1.0 - np.sqrt(1.0 - 4.0 * v))
    F = np.ones_like(v)
    F[1:] = u[1:] / v[1:]
    err = math.inf
    g = np.array([1.0])
    for ncoeff in range(2, max_ncoeff + 1):
        poly = np.polynomial.Chebyshev.fit(v, F, ncoeff - 2).convert(kind=np.polynomial.Polynomial)
        g = np.zeros(ncoeff - 1)
        g[:len(poly.coef)] = poly.coef
        err = float(np.max(np.abs(np.polynomial.polynomial.polyval(v, g) / F - 1.0)))
        if err < max_rel_error:
            break
    return g, err


def apply_linearity(coeffs: np.ndarray, raw: np.ndarray) -> np.ndarray:
    """Evaluate linear = sum_k c_k raw**k (Horner) for raw of shape (..., ny, nx)."""
    out = np.zeros(np.broadcast_shapes(raw.shape, coeffs.shape[1:]), np.float64)
    for c in coeffs[::-1]:
        out = out * raw + c
    return out


# ---------------------------------------------------------------------- noise generators
def _onef_series(rng: np.random.Generator, nchan: int, length: int, rms: float,
                 common: float) -> np.ndarray:
    """(nchan, length) float32 1/f noise: FFT-filtered white noise, per channel + common mode."""
    n = max(length, 2)
    white = rng.standard_normal((nchan + 1, n), dtype=np.float32)
    spec = np.fft.rfft(white, axis=1)
    freq = np.fft.rfftfreq(n)
    filt = np.zeros_like(freq)
    filt[1:] = 1.0 / np.sqrt(freq[1:] / freq[1])  # power ~ 1/f; no DC term (that is bias)
    series = np.fft.irfft(spec * filt, n, axis=1).astype(np.float32)
    series /= series.std(axis=1, keepdims=True) + np.float32(1e-12)
    out = np.sqrt(1.0 - common) * series[:nchan] + np.sqrt(common) * series[nchan]
    return (out * np.float32(rms)).astype(np.float32)[:, :length]


def _common_noise(rng: np.random.Generator, detector: DetectorModel, nramps: int,
                  nreads: int) -> tuple[np.ndarray, np.ndarray]:
    """Correlated noise between channels: ((nramps, nreads, ny, width) DN, position (nx,)).

    One 1/f series over the exposure's pixel clock: per read ``ny + 1`` rows (one row of
    frame overhead) of ``width + row_overhead`` pixel times, width = the widest channel. Every
    channel sees the same value at the same time; column x of its channel is read at
    position(x) (odd channels right to left)."""
    ny, nx, nch = detector.ny, detector.nx, detector.nchan
    col = np.arange(nx)
    chan = (col * nch) // nx
    start = -(-(chan * nx) // nch)
    stop = -(-((chan + 1) * nx) // nch)
    width = int((stop - start).max())
    pos = col - start
    pos = np.where(chan % 2 == 1, (stop - start) - 1 - pos, pos)
    per_row = width + max(int(detector.row_overhead), 0)
    n = nramps * nreads * (ny + 1) * per_row
    series = _onef_series(rng, 1, n, detector.common_noise_rms, 0.0)[0]
    frames = series.reshape(nramps, nreads, ny + 1, per_row)[:, :, :ny, :width]
    return np.ascontiguousarray(frames), pos


def _column_segments(nx: int, nchan: int, nseg: int) -> tuple[np.ndarray, np.ndarray]:
    """Channel and time-segment index of each column (odd channels read right to left)."""
    col = np.arange(nx)
    chan = (col * nchan) // nx
    start = -(-(chan * nx) // nchan)  # first column of the channel: ceil(c * nx / nchan)
    stop = -(-((chan + 1) * nx) // nchan)
    pos = col - start
    width = stop - start
    seg = (pos * nseg) // width
    seg = np.where(chan % 2 == 1, nseg - 1 - seg, seg)
    return chan, seg


def _poisson_increments(rng: np.random.Generator, lam: np.ndarray, nreads: int) -> tuple[np.ndarray, int]:
    """(nreads, *lam.shape) float32 electrons collected in each read interval."""
    shape = (nreads,) + lam.shape
    inc = np.empty(shape, np.float32)
    big = lam > NORMAL_APPROX_ELECTRONS
    low = (lam * nreads) < SPLIT_BELOW_ELECTRONS
    mid = ~(big | low)
    n_big = int(big.sum())
    if mid.all():
        inc[...] = rng.poisson(lam, size=shape)
        return inc, 0
    if low.any():
        lam_low = lam[low].astype(np.float64)
        total = rng.poisson(lam_low * nreads)
        nlow = lam_low.size
        pix = np.repeat(np.arange(nlow), total)
        which = rng.integers(0, nreads, size=pix.size)
        counts = np.bincount(which * nlow + pix, minlength=nreads * nlow).reshape(nreads, nlow)
        inc[:, low] = counts
    if mid.any():
        lam_mid = lam[mid]
        inc[:, mid] = rng.poisson(lam_mid, size=(nreads, lam_mid.size))
    if n_big:
        lam_big = lam[big].astype(np.float32)
        inc[:, big] = lam_big + np.sqrt(lam_big) * rng.standard_normal((nreads, n_big), dtype=np.float32)
    return inc, n_big


def cosmic_ray_events(rng: np.random.Generator, detector: DetectorModel, nreads: int,
                      read_time: float, nramps: int = 1, rate: float | None = None) -> dict[str, np.ndarray]:
    """Random cosmic-ray hits for a whole exposure.

    Number of events ~ Poisson(rate x active area x ramp duration) per ramp; arrival times are
    uniform in [0, nreads * read_time); the charge (lognormal, median 800 e-) lands 60-90 % in
    the hit pixel and the rest in its four neighbours (charge diffusion). Events land only on
    active pixels; charge spread onto the reference border is lost.
    Columns: ramp, read (first read that contains the charge), y, x, time_s, electrons.
    """
    rate = detector.cr_rate if rate is None else float(rate)
    r = detector.refpix
    n_active = (detector.ny - 2 * r) * (detector.nx - 2 * r)
    area_cm2 = n_active * (detector.pixel_pitch_um * 1e-4) ** 2
    duration = nreads * read_time
    counts = rng.poisson(rate * area_cm2 * duration, size=nramps)
    n = int(counts.sum())
    ramp = np.repeat(np.arange(nramps), counts)
    y = rng.integers(r, detector.ny - r, n)
    x = rng.integers(r, detector.nx - r, n)
    t = rng.uniform(0.0, duration, n)
    read = np.minimum((t // read_time).astype(np.int64), nreads - 1)
    electrons = rng.lognormal(np.log(800.0), 0.7, n)
    central = rng.uniform(0.6, 0.9, n)
    share = rng.random((n, 4))
    share = share / share.sum(axis=1, keepdims=True) * (1.0 - central)[:, None]
    return {"ramp": ramp, "read": read, "y": y, "x": x, "time_s": t, "electrons": electrons,
            "central_fraction": central, "neighbour_share": share}


def snowball_events(rng: np.random.Generator, detector: DetectorModel, nreads: int,
                    read_time: float, nramps: int = 1,
                    rate: float | None = None) -> dict[str, np.ndarray]:
    """Random snowballs for a whole exposure (see ``DetectorModel.snowball_rate``).

    Columns: ramp, read (first read with the charge), y, x (centre, float), radius (core, px),
    core_e (electrons per core pixel), halo_e (electrons per pixel at the core's edge).
    """
    rate = detector.snowball_rate if rate is None else float(rate)
    r = detector.refpix
    n_active = (detector.ny - 2 * r) * (detector.nx - 2 * r)
    area_cm2 = n_active * (detector.pixel_pitch_um * 1e-4) ** 2
    counts = rng.poisson(rate * area_cm2 * nreads * read_time, size=nramps)
    n = int(counts.sum())
    return {
        "ramp": np.repeat(np.arange(nramps), counts),
        "read": rng.integers(1, max(nreads, 2), n) if nreads > 1 else np.zeros(n, np.int64),
        "y": rng.uniform(r, detector.ny - r, n),
        "x": rng.uniform(r, detector.nx - r, n),
        "radius": rng.uniform(1.5, 5.0, n),
        "core_e": rng.uniform(2e4, 1e5, n),
        "halo_e": rng.uniform(400.0, 1200.0, n),
    }


def _snowball_deposits(ev: dict[str, np.ndarray], ramp: int,
                       detector: DetectorModel) -> tuple[np.ndarray, ...]:
    """Flattened (read, y, x, electrons) pixel deposits of one ramp's snowballs."""
    out: list[tuple[np.ndarray, ...]] = []
    r = detector.refpix
    for i in np.nonzero(ev["ramp"] == ramp)[0]:
        rad = float(ev["radius"][i])
        ext = int(np.ceil(2.5 * rad + 4))
        y0, x0 = float(ev["y"][i]), float(ev["x"][i])
        yy, xx = np.mgrid[int(y0) - ext:int(y0) + ext + 1, int(x0) - ext:int(x0) + ext + 1]
        d = np.hypot(yy + 0.5 - y0, xx + 0.5 - x0)
        e = np.where(d <= rad, ev["core_e"][i],
                     ev["halo_e"][i] * np.exp(-(d - rad) / 1.2) * (d <= 2.0 * rad + 3.0))
        keep = (e > 0) & (yy >= r) & (yy < detector.ny - r) & (xx >= r) & (xx < detector.nx - r)
        out.append((np.full(int(keep.sum()), ev["read"][i]), yy[keep], xx[keep],
                    e[keep].astype(np.float32)))
    if not out:
        empty = np.zeros(0, np.int64)
        return empty, empty, empty, np.zeros(0, np.float32)
    return tuple(np.concatenate([o[k] for o in out]) for k in range(4))


def _cr_deposits(events: dict[str, np.ndarray], ramp: int, detector: DetectorModel) -> tuple[np.ndarray, ...]:
    """Flattened (read, y, x, electrons) pixel deposits of one ramp's events."""
    sel = events["ramp"] == ramp
    if not sel.any():
        empty = np.zeros(0, np.int64)
        return empty, empty, empty, np.zeros(0, np.float32)
    read, y, x = events["read"][sel], events["y"][sel], events["x"][sel]
    e = events["electrons"][sel]
    frac = np.column_stack([events["central_fraction"][sel], events["neighbour_share"][sel]])
    dy = np.array([0, -1, 1, 0, 0])
    dx = np.array([0, 0, 0, -1, 1])
    yy = (y[:, None] + dy).ravel()
    xx = (x[:, None] + dx).ravel()
    rr = np.repeat(read, 5)
    ee = (e[:, None] * frac).ravel().astype(np.float32)
    r = detector.refpix
    keep = (yy >= r) & (yy < detector.ny - r) & (xx >= r) & (xx < detector.nx - r)
    return rr[keep], yy[keep], xx[keep], ee[keep]


def _resolve_noise(noise: bool | Iterable[str]) -> frozenset[str]:
    if noise is True:
        return NOISE_COMPONENTS
    if noise is False or noise is None:
        return frozenset()
    comps = frozenset(noise)
    unknown = comps - NOISE_COMPONENTS
    if unknown:
        raise ValueError(f"unknown noise components {sorted(unknown)}; known: {sorted(NOISE_COMPONENTS)}")
    return comps


def simulate_ramp(detector: DetectorModel, scene_rate_e_per_s: np.ndarray | float | None = None,
                  nreads: int = 10, read_time: float = DEFAULT_READ_TIME, nramps: int = 1,
                  rng: np.random.Generator | int | None = None, cosmic_rays: bool = True, *,
                  flat: np.ndarray | None = None, noise: bool | Iterable[str] = True,
                  cr_rate: float | None = None, progress: ProgressFn | None = None,
                  chunk_elements: int = 1 << 22) -> tuple[np.ndarray, dict]:
    """Simulate raw reads of ``detector`` looking at ``scene_rate_e_per_s``.

    Parameters
    ----------
    scene_rate_e_per_s
        Illumination in e-/s per pixel *before* the detector response (scalar or (ny, nx));
        ``None`` for a dark. Light falling on reference pixels is discarded.
    flat
        Relative response multiplied into the illumination (the true flat); dark current is
        added after it. ``None``: no flat.
    noise
        ``True`` (all), ``False`` (noiseless: expected charge, no read/kTC/1/f noise) or a
        subset of {"poisson", "read", "ktc", "onef"}.
    cosmic_rays
        Add cosmic-ray charge (rate ``cr_rate`` or the detector's, events/cm^2/s).

    Returns
    -------
    (reads, truth): reads uint16 (nramps, nreads, ny, nx); truth holds read_times, the total
    rate (e-/s, incl. flat and dark), the cosmic-ray event table and bookkeeping.
    """
    if nreads < 1 or nramps < 1:
        raise ValueError(f"nreads ({nreads}) and nramps ({nramps}) must be >= 1")
    if not read_time > 0:
        raise ValueError(f"read_time must be positive, not {read_time}")
    if not isinstance(rng, np.random.Generator):
        rng = np.random.default_rng(rng)
    comps = _resolve_noise(noise)
    ny, nx = detector.shape
    t_start = time.perf_counter()

    rate = np.zeros(detector.shape, np.float32)
    if scene_rate_e_per_s is not None:
        rate += np.asarray(scene_rate_e_per_s, dtype=np.float32)
    if flat is not None:
        rate *= np.asarray(flat, np.float32)
    if not np.all(np.isfinite(rate)) or rate.min() < 0:
        raise ValueError("scene rate must be finite and >= 0")
    rate += detector.dark_current
    rate[~detector.active] = 0.0

    events = cosmic_ray_events(rng, detector, nreads, read_time, nramps, cr_rate) if cosmic_rays \
        else cosmic_ray_events(rng, detector, nreads, read_time, nramps, 0.0)

    snow = None
    if cosmic_rays and detector.snowball_rate > 0:
        snow = snowball_events(rng, detector, nreads, read_time, nramps)

    onef = None
    if "onef" in comps and detector.onef_rms > 0:
        min_width = nx // detector.nchan
        nseg = max(1, min(4, min_width))
        series = _onef_series(rng, detector.nchan, nramps * nreads * ny * nseg,
                              detector.onef_rms, detector.onef_common)
        # time order: ramp, read, row, segment within the row
        onef = series.reshape(detector.nchan, nramps, nreads, ny, nseg).transpose(1, 2, 3, 0, 4)
        col_chan, col_seg = _column_segments(nx, detector.nchan, nseg)

    badref = detector.bad_refpix() if detector.bad_refpix_fraction > 0 else None
    read_end = ((np.arange(nreads) + 1.0) * read_time).astype(np.float32)

    acn = None
    if "onef" in comps and detector.acn_rms > 0:
        min_width = nx // detector.nchan
        nseg_a = max(1, min(4, min_width))
        aseries = _onef_series(rng, detector.nchan, nramps * nreads * ny * nseg_a,
                               detector.acn_rms, 0.0)
        acn = aseries.reshape(detector.nchan, nramps, nreads, ny, nseg_a).transpose(1, 2, 3, 0, 4)
        acn_chan, acn_seg = _column_segments(nx, detector.nchan, nseg_a)
        start = -(-(acn_chan * nx) // detector.nchan)
        acn_sign = np.where((np.arange(nx) - start) % 2 == 0, 1.0, -1.0).astype(np.float32)

    # drawn after everything above, and only when asked: default frames stay bit for bit
    common = None
    if "onef" in comps and detector.common_noise_rms > 0:
        common, common_pos = _common_noise(rng, detector, nramps, nreads)
    pframe = None
    if "read" in comps and (detector.picture_frame_rms > 0 or detector.picture_frame_drift != 0):
        pf_pattern = detector.picture_frame_pattern()
        pf_amp = (np.float32(detector.picture_frame_rms)
                  * rng.standard_normal((nramps, nreads), dtype=np.float32)
                  + np.float32(detector.picture_frame_drift) * read_end[None, :]).astype(np.float32)
        pframe = True

    out = np.empty((nramps, nreads, ny, nx), np.uint16)
    rows_per_chunk = max(1, min(ny, chunk_elements // max(1, nreads * nx)))
    ipc = detector.ipc
    if ipc is not None:
        rows_per_chunk = ny
    nchunks = -(-ny // rows_per_chunk)
    n_normal = 0
    for r in range(nramps):
        cr_read, cr_y, cr_x, cr_e = _cr_deposits(events, r, detector)
        if snow is not None:
            sb = _snowball_deposits(snow, r, detector)
            cr_read, cr_y, cr_x, cr_e = (np.concatenate([a, b]) for a, b in
                                         zip((cr_read, cr_y, cr_x, cr_e), sb, strict=True))
        for ci, y0 in enumerate(range(0, ny, rows_per_chunk)):
            y1 = min(ny, y0 + rows_per_chunk)
            rows = slice(y0, y1)
            lam = rate[rows] * np.float32(read_time)  # electrons per read interval
            if "poisson" in comps:
                inc, nb = _poisson_increments(rng, lam, nreads)
                n_normal += nb
            else:
                inc = np.broadcast_to(lam, (nreads,) + lam.shape).astype(np.float32)
            sel = (cr_y >= y0) & (cr_y < y1)
            if sel.any():
                np.add.at(inc, (cr_read[sel], cr_y[sel] - y0, cr_x[sel]), cr_e[sel])
            charge = np.cumsum(inc, axis=0, out=inc)  # electrons since reset, read by read
            signal = detector.nonlinear(charge / detector.gain[rows], rows)
            if ipc is not None:
                signal = apply_ipc(signal, ipc, detector.active)
            value = signal + detector.bias[rows]
            if "ktc" in comps and detector.ktc_noise > 0:
                value += np.float32(detector.ktc_noise) * rng.standard_normal(lam.shape, dtype=np.float32)
            np.minimum(value, detector.saturation[rows], out=value)  # full-well plateau
            if "read" in comps:
                value += detector.read_noise[rows] * rng.standard_normal(value.shape, dtype=np.float32)
            if onef is not None:
                value += onef[r, :, rows][:, :, col_chan, col_seg]
            if acn is not None:
                value += acn[r, :, rows][:, :, acn_chan, acn_seg] * acn_sign
            if common is not None:
                value += common[r, :, rows][:, :, common_pos]
            if pframe is not None:
                value += pf_amp[r, :, None, None] * pf_pattern[rows][None]
            if badref is not None:
                _apply_bad_refpix(value, badref, rows, read_end, detector.read_noise[rows], rng)
            np.rint(value, out=value)
            np.clip(value, 0, 65535, out=value)
            out[r, :, rows] = value
            if progress is not None:
                done = (r * nchunks + ci + 1) / (nramps * nchunks)
                progress(done, f"{detector.name} ramp {r + 1}/{nramps} rows {y1}/{ny}")
    elapsed = time.perf_counter() - t_start
    log.debug("simulated %s %s in %.2f s", detector.name, out.shape, elapsed)
    truth = {
        "read_times": (np.arange(nreads) + 1.0) * read_time,
        "read_time": float(read_time), "nreads": int(nreads), "nramps": int(nramps),
        "rate_e_per_s": rate,
        "cosmic_rays": {k: v for k, v in events.items() if k not in ("central_fraction", "neighbour_share")},
        "noise": sorted(comps),
        "n_normal_approx": int(n_normal),
    }
    if badref is not None:
        truth["bad_refpix"] = {k: badref[k] for k in ("kind", "known")}
    if snow is not None:
        truth["snowballs"] = snow
    if common is not None:
        # (nramps, nreads, ny, channel width) DN: the common noise at each position in the
        # channels' read order (column x of channel c sees [..., y, position(x)])
        truth["common_noise"] = common
        truth["common_noise_position"] = common_pos
    if pframe is not None:
        truth["picture_frame"] = {"pattern": pf_pattern, "amplitude": pf_amp}
    return out, truth


def ipc_kernel(alpha: float) -> np.ndarray:
    """3x3 IPC kernel: alpha to each nearest neighbour, 1 - 4 alpha kept (sum 1)."""
    k = np.zeros((3, 3), np.float32)
    k[0, 1] = k[2, 1] = k[1, 0] = k[1, 2] = alpha
    k[1, 1] = 1.0 - 4.0 * alpha
    return k


def apply_ipc(signal: np.ndarray, kernel: float | np.ndarray, active: np.ndarray) -> np.ndarray:
    """(..., ny, nx) signal coupled to its neighbours by ``kernel`` (3x3: kernel[1 + dy, 1 + dx]
    of each pixel's signal lands on the pixel at (dy, dx); or a float alpha: the
    nearest-neighbour kernel). Active pixels only: the reference border has no signal to
    couple and receives none."""
    k = ipc_kernel(kernel) if np.ndim(kernel) == 0 else np.asarray(kernel, np.float32)
    s = np.where(active, signal, np.float32(0.0)).astype(np.float32)
    ny, nx = s.shape[-2:]
    out = np.float32(k[1, 1]) * s
    # nearest neighbours first, in the order of earlier versions (the same float32 sums)
    for dy, dx in ((1, 0), (-1, 0), (0, 1), (0, -1), (-1, -1), (-1, 1), (1, -1), (1, 1)):
        if k[1 + dy, 1 + dx] == 0:
            continue
        src = (..., slice(max(-dy, 0), ny + min(-dy, 0)), slice(max(-dx, 0), nx + min(-dx, 0)))
        dst = (..., slice(max(dy, 0), ny + min(dy, 0)), slice(max(dx, 0), nx + min(dx, 0)))
        out[dst] += np.float32(k[1 + dy, 1 + dx]) * s[src]
    return np.where(active, out, signal).astype(np.float32)


def _apply_bad_refpix(value: np.ndarray, badref: dict[str, np.ndarray], rows: slice,
                      read_end: np.ndarray, read_noise: np.ndarray,
                      rng: np.random.Generator) -> None:
    """Hot reference pixels ramp, dead ones are stuck, noisy ones get extra white noise
    (``value``: (nreads, rows, nx) DN, in place)."""
    kind = badref["kind"][rows]
    if not kind.any():
        return
    hot = kind == 1
    if hot.any():
        value[:, hot] += read_end[:, None] * badref["hot_rate"][rows][hot][None, :]
    dead = kind == 2
    if dead.any():
        value[:, dead] = badref["dead_level"][rows][dead][None, :]
    noisy = kind == 3
    if noisy.any():
        extra = read_noise[noisy] * np.sqrt(badref["noise_factor"][rows][noisy] ** 2 - 1.0)
        value[:, noisy] += extra[None, :] * rng.standard_normal((value.shape[0], int(noisy.sum())),
                                                                 dtype=np.float32)
