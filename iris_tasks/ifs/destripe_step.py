"""DestripeStep (``destripe``): residual 1/f row stripes removed from an IFS rate (S_DESTRP)."""

from __future__ import annotations

import logging
import time
from typing import ClassVar

import numpy as np

from ..datamodels import ImageModel, IrisDataModel, dqflags
from ..steps.base import IrisStep, ReferenceFileError, reference_name
from .destripe import destripe, unlit_mask
from .extract_step import TraceCache, check_trace, ifs_rate_input
from .profile import CrossProfile

log = logging.getLogger(__name__)

__all__ = ["DEFAULT_CHANNELS", "DestripeStep", "clear_mask_cache"]

# Output channels when the header has no NCHAN (the readout's default, H4RG 32-channel mode).
DEFAULT_CHANNELS = 32

# Unlit masks of the last traces used (a 4k slicer trace has 16M samples, ~3 s to mask).
_MASKS: TraceCache[np.ndarray] = TraceCache(2)


def clear_mask_cache() -> None:
    """Forget the cached unlit masks."""
    _MASKS.clear()


# Flexure the frame may have moved by since the reference (the flexure step's largest shift):
# destripe runs before the flexure is measured, so its mask leaves that margin lit.
FLEXURE_MARGIN = 1


def _cached_unlit(trace: IrisDataModel, shape: tuple[int, int], mask_sigma: float) -> np.ndarray:
    def build() -> np.ndarray:
        # A measured (version 2) profile reaches as far as its table: its halo is light, not
        # stripe, and must not be counted as unlit.
        min_half = 0
        if getattr(trace, "profile", None) is not None:
            min_half = CrossProfile.from_model(trace).half + FLEXURE_MARGIN
        return unlit_mask(trace.trace_x, trace.trace_y, float(trace.meta.psf_sigma), shape,
                          mask_sigma, min_half=min_half)

    return _MASKS.get(trace, shape, build, float(mask_sigma))


class DestripeStep(IrisStep):
    """Subtract, from every row of every readout channel, the level of its unlit pixels.

    The unlit pixels are those farther than ``mask_sigma`` PSF sigmas from every spectrum of
    the ``ifstrace`` reference (the one ``extract_cube`` uses), with good DQ and away from the
    frame's reference-pixel border. Row segments with fewer than ``min_unlit`` of them take
    their row's median over the measured channels (``fallback``, when at least
    ``fallback_channels`` were measured) or stay as they are. Frames that are not
    IFS frames, or have no trace reference, are passed through with S_DESTRP=SKIPPED and the
    reason in the log. The level is the clipped mean (``clip`` sigma about the median) or,
    with ``clip=0``, the median. ERR is not changed: the subtracted offset carries ~sigma /
    sqrt(n_unlit) of white noise per segment (~1 % of a pixel's variance at 4k), below the
    1/f it removes, and correlated along the segment like the stripe was.
    """

    class_alias = "destripe"
    cal_step = "destripe"
    reference_file_types: ClassVar[list[str]] = ["ifstrace"]

    spec = """
    modes = string(default='LENSLET')  # IFS modes destriped (comma-separated): ~1 % of a slicer frame is unlit, too few rows to measure (docs/ifs.md)
    mask_sigma = float(default=4.0)  # pixels within this many PSF sigmas (in x) of a trace count as lit
    min_unlit = integer(default=16)  # fewest unlit good pixels for a row segment's own estimate
    fallback = boolean(default=True)  # segments with too few unlit pixels take their row's median over channels ...
    fallback_channels = integer(default=4)  # ... when at least this many channels of the row were measured
    clip = float(default=3.0)  # 0: each segment's median; > 0: mean of its pixels within this many sigma of the median (less noise)
    border = integer(default=4)  # frame-edge rows/columns never used (H4RG reference pixels)
    bad_bits = string(default='DO_NOT_USE,SATURATED,DEAD,HOT,REFERENCE_PIXEL,NON_SCIENCE')  # pixel DQ bits excluded from the estimate
    """  # noqa: E501

    def process(self, step_input):
        model, not_ifs = ifs_rate_input(self, step_input)
        if not_ifs:
            return self._skip(model, f"{not_ifs}; destriping needs the unlit pixels of a "
                                     "LENSLET or SLICER frame")
        name = model.meta.filename or "input"
        mode = model.meta.instrument.ifsmode
        wanted = {m.strip().upper() for m in str(self.modes).split(",") if m.strip()}
        if mode not in wanted:
            log.info("%s: %s: IFSMODE=%s not in modes=%s; not destriped", self.name, name, mode,
                     self.modes)
            model.meta.cal_step.destripe = "SKIPPED"
            return model
        try:
            trace = self.load_reference(model, "ifstrace", required=False)
        except ReferenceFileError as exc:
            return self._skip(model, f"no usable ifstrace reference ({exc})")
        if trace is None:
            return self._skip(model, "no ifstrace reference applies (N/A)")
        check_trace(trace, model, f"ifstrace reference {reference_name(trace)}")

        t0 = time.perf_counter()
        shape = model.data.shape
        usable = _cached_unlit(trace, shape, self.mask_sigma).copy()
        bad = np.uint32(dqflags.to_bits(self.bad_bits))
        usable &= (np.asarray(model.dq, np.uint32) & bad) == 0
        usable &= np.isfinite(model.data)
        b = max(0, int(self.border))
        if b:
            usable[:b] = usable[-b:] = False
            usable[:, :b] = usable[:, -b:] = False
        nchan = int(model.meta.exposure.nchan or DEFAULT_CHANNELS)
        nchan = min(nchan, shape[1])
        result = destripe(model.data, usable, nchan, min_unlit=self.min_unlit,
                          fallback=self.fallback, fallback_channels=self.fallback_channels,
                          clip=self.clip)
        model.data = result.data
        log.info("%s: %s: %.0f%% of pixels unlit and good; %d channels x %d rows: %d segments "
                 "from their own pixels, %d from the row's median, %d unchanged; offsets rms %.4g %s "
                 "(%.2f s)", self.name, name, 100.0 * usable.mean(), nchan, shape[0],
                 result.n_direct, result.n_fallback, result.n_skipped, result.rms,
                 model.meta.bunit_data or "", time.perf_counter() - t0)
        model.meta.cal_step.destripe = "COMPLETE"
        return model

    def _skip(self, model: ImageModel, reason: str) -> ImageModel:
        log.warning("%s: skipped: %s", self.name, reason)
        model.meta.cal_step.destripe = "SKIPPED"
        return model
