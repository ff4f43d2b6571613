"""FlexureStep (``flexure``): the IFS frame's offset from the ifstrace reference (S_FLEX).

Measures, from the frame itself, how far its spectra sit from where the ``ifstrace``
reference puts them (:func:`iris_tasks.ifs.flexure.fit_flexure`) and records it in the header
(FLEXDX, FLEXDY, FLEXEDX, FLEXEDY, FLEXROT, FLEXMETH); ``extract_cube`` then extracts with the
reference trace moved by it. The image itself is not changed.
"""

from __future__ import annotations

import logging
import math
import time
from typing import ClassVar

import numpy as np

from ..datamodels import ImageModel, IrisDataModel, dqflags
from ..instrument.lines import oh_lines
from ..steps.base import IrisStep, ReferenceFileError, reference_name
from .cube import rate_variance
from .extract_step import TraceCache, check_trace, ifs_rate_input
from .flexure import METHODS, FlexureFit, FlexureModel, fit_flexure
from .profile import CrossProfile

log = logging.getLogger(__name__)

__all__ = ["FlexureStep", "clear_flexure_cache", "flexure_model", "record_flexure"]

# Flexure models of the last traces used (cheap: ~0.1-0.5 s and tens of MB at 4k).
_MODELS: TraceCache[FlexureModel] = TraceCache(2)


def clear_flexure_cache() -> None:
    """Forget the cached flexure models."""
    _MODELS.clear()


def flexure_model(trace: IrisDataModel, shape: tuple[int, int], mode: str, *,
                  max_shift: float = 1.0) -> FlexureModel:
    """The :class:`FlexureModel` of ``trace`` on a detector of ``shape`` for IFSMODE ``mode``
    (cached): its
    profile, throughput, wavelength grid, the OH lines of its band and, for a version-2
    reference, the median line-spread width as the starting line width."""
    what = f"ifstrace reference {reference_name(trace)}"

    def build() -> FlexureModel:
        t0 = time.perf_counter()
        try:
            profile = CrossProfile.from_model(trace)
        except ValueError as exc:
            raise ReferenceFileError(f"{what}: {exc}") from None
        wave = np.asarray(trace.wavelength, np.float64)
        lines = oh_lines(float(wave[0]), float(wave[-1]))
        sigma_bins = 1.0
        lsf = getattr(trace, "lsf_sigma", None)
        if lsf is not None and np.size(lsf) and wave.size > 1:
            disp = float(np.median(np.abs(np.diff(wave))))
            med = float(np.nanmedian(np.asarray(lsf, np.float64)))
            if np.isfinite(med) and med > 0 and disp > 0:
                sigma_bins = med / disp
        throughput = getattr(trace, "throughput", None)
        try:
            model = FlexureModel(trace.trace_x, trace.trace_y, wave, profile, shape, mode,
                                 lines=lines,
                                 throughput=throughput, max_shift=max_shift,
                                 lsf_sigma_bins=sigma_bins)
        except ValueError as exc:
            raise ReferenceFileError(f"{what}: flexure model: {exc}") from None
        log.info("flexure model of %s on %dx%d: %d x-fit groups, %d OH windows (%d lines "
                 "in the band) in %.2f s", reference_name(trace), shape[0], shape[1],
                 model.dx_layout.g_row.size, 0 if model.oh is None else model.oh["k"].size,
                 len(lines), time.perf_counter() - t0)
        return model

    return _MODELS.get(trace, shape, build, str(mode), round(float(max_shift), 3))


def record_flexure(model: ImageModel, fit: FlexureFit, source: str | None = None) -> None:
    """Write a fit into the frame's meta (FLEXDX ... FLEXMETH; FLEXSRC = ``source`` when an
    axis came from a prior)."""
    fx = model.meta.flexure
    fx.dx = float(fit.dx)
    fx.dy = float(fit.dy)
    fx.dx_err = float(fit.dx_err)
    fx.dy_err = float(fit.dy_err)
    fx.rotation = float(math.degrees(fit.rotation))
    fx.method = fit.method
    if "PRIOR" in fit.method:
        fx.source = (source or "prior")[:68]


def _prior(value: float | None, err: float | None, what: str) -> tuple[float, float] | None:
    if value is None:
        return None
    if err is None:
        raise ValueError(f"{what} is given without {what}_err (its 1-sigma uncertainty)")
    return float(value), float(err)


class FlexureStep(IrisStep):
    """Fit the frame's offset (dx, dy, optionally a rotation) from the ifstrace reference.

    ``method``: 'auto' - dx from the lit pattern, dy from the OH sky lines (the wavelength
    zero point) or, without enough lines, from the ends of the spectra; 'lit' - dy from the
    ends only; 'oh' - dy from the OH lines only; 'none' - nothing measured. A frame without
    enough signal (or an offset beyond ``max_shift``, or less precise than ``max_error``)
    gets 0 for that axis with a warning; with nothing measured FLEXMETH='NONE' and S_FLEX
    SKIPPED. Never fails the frame for that.

    ``prior_dx``/``prior_dy`` (with ``prior_dx_err``/``prior_dy_err`` and ``prior_source``):
    an offset for an axis the frame cannot measure, from elsewhere - the real-time chain
    passes the offsets measured on the night's neighbouring frames of the same
    mode/scale/filter (weighted mean from the ledger; the step itself never reads the ledger).
    Used only for an axis the frame leaves unmeasured: FLEXMETH says PRIORX/PRIORY and
    FLEXSRC ``prior_source``.
    """

    class_alias = "flexure"
    cal_step = "flexure"
    reference_file_types: ClassVar[list[str]] = ["ifstrace"]

    spec = """
    method = option('auto', 'lit', 'oh', 'none', default='auto')  # what measures dy: OH lines (auto falls back to the spectrum ends), 'lit' ends only; dx always from the lit pattern
    max_shift = float(default=1.0)  # largest offset followed (pixels); a fit beyond it is rejected (0 applied)
    max_error = float(default=0.1)  # an axis measured less precisely than this (pixels, 1 sigma) is not applied
    fit_rotation = boolean(default=True)  # also fit a rotation about the detector centre (from dx changing with the row): 0.003 deg moves the corners of a 4k frame by 0.1 px
    min_lines = integer(default=3)  # fewest OH windows for an OH dy
    bad_bits = string(default='DO_NOT_USE,SATURATED,DEAD,REFERENCE_PIXEL,NON_SCIENCE')  # pixel DQ bits left out of the fit
    prior_dx = float(default=None)  # dx (px) for a frame whose lit pattern cannot measure it (its 1-sigma error in prior_dx_err); unset: 0
    prior_dx_err = float(default=None)
    prior_dy = float(default=None)  # dy (px) for a frame whose OH lines/ends cannot measure it (error in prior_dy_err); unset: 0
    prior_dy_err = float(default=None)
    prior_source = string(default='')  # where the priors come from, written as FLEXSRC when one is used
    """  # noqa: E501

    def process(self, step_input):
        model, not_ifs = ifs_rate_input(self, step_input)
        if not_ifs:
            return self._skip(model, f"{not_ifs}; flexure needs a LENSLET or SLICER frame")
        name = model.meta.filename or "input"
        mode = model.meta.instrument.ifsmode
        if self.method not in METHODS or self.method == "none":
            return self._skip(model, f"method={self.method!r}", warn=False)
        trace = self.load_reference(model, "ifstrace")
        check_trace(trace, model, f"ifstrace reference {reference_name(trace)}")
        fm = flexure_model(trace, model.data.shape, mode, max_shift=self.max_shift)
        var = rate_variance(model.err, model.var_poisson, model.var_rnoise)
        bad = np.uint32(dqflags.to_bits(self.bad_bits))
        good = (np.asarray(model.dq, np.uint32) & bad) == 0
        prior_dx = _prior(self.prior_dx, self.prior_dx_err, "prior_dx")
        prior_dy = _prior(self.prior_dy, self.prior_dy_err, "prior_dy")
        fit = fit_flexure(fm, model.data, var, good, method=self.method,
                          fit_rotation=self.fit_rotation, max_error=self.max_error,
                          min_lines=self.min_lines, prior_dx=prior_dx, prior_dy=prior_dy)
        # what failed matters when an axis is left unmeasured; otherwise it is detail
        parts = fit.method.split("+")
        complete = "LIT" in parts and ("OH" in parts or "ENDS" in parts)
        for msg in fit.messages:
            (log.info if complete else log.warning)("%s: %s: %s", self.name, name, msg)
        if "PRIOR" in fit.method:
            log.warning("%s: %s: %s from a prior (%s)", self.name, name,
                        " and ".join(a for a, p in (("dx", "PRIORX"), ("dy", "PRIORY"))
                                     if p in parts), self.prior_source or "source not given")
        record_flexure(model, fit, self.prior_source)
        extra = ""
        if fit.dy_oh is not None:
            extra += f"; OH dy {fit.dy_oh:+.4f} +- {fit.dy_oh_err:.4f} ({fit.n_lines} windows)"
        if fit.dy_ends is not None:
            extra += f"; ends dy {fit.dy_ends:+.4f} +- {fit.dy_ends_err:.4f}"
        if self.fit_rotation:
            extra += f"; rotation {math.degrees(fit.rotation):+.5f} deg"
        log.info("%s: %s: dx %+.4f +- %.4f, dy %+.4f +- %.4f px (%s)%s; %.2f s", self.name,
                 name, fit.dx, fit.dx_err, fit.dy, fit.dy_err, fit.method, extra,
                 fit.timings.get("total", 0.0))
        model.meta.cal_step.flexure = "SKIPPED" if fit.method == "NONE" else "COMPLETE"
        return model

    def _skip(self, model: ImageModel, reason: str, warn: bool = True) -> ImageModel:
        (log.warning if warn else log.info)("%s: skipped: %s", self.name, reason)
        record_flexure(model, FlexureFit(0.0, 0.0, 0.0, 0.0, "NONE"))
        model.meta.cal_step.flexure = "SKIPPED"
        return model
