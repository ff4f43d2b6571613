"""ReadoutStep: stage 1, raw ramps (RampModel) -> rate image (ImageModel, ``_rate``)."""

from __future__ import annotations

import logging
import time
from typing import ClassVar

import numpy as np

from ..datamodels import ImageModel, RampModel
from ..metadata import readpatt
from . import readout
from .base import IrisStep, ReferenceFileError, reference_array, reference_name, reference_part

log = logging.getLogger(__name__)

__all__ = ["ReadoutStep"]

FULL_FRAME = 4096
# Output channels when the raw header has no NCHAN (the H4RG's 32-channel mode).
DEFAULT_CHANNELS = 32


class ReadoutStep(IrisStep):
    """Reference pixels, saturation, linearity, jumps and the ramp fit in one pass (readout_cy).

    References (CRDS, or ``override_<type>``): mask, saturation, linearity, readnoise, gain.
    Multi-ramp exposures are combined by inverse variance. The mask DQ is OR'ed into the
    output DQ. Statuses: S_READOU plus S_REFPIX, S_SATURA, S_LINEAR, S_JUMP, S_RAMP.
    """

    class_alias = "readout"
    cal_step = "readout"
    reference_file_types: ClassVar[list[str]] = ["mask", "saturation", "linearity", "readnoise", "gain",
                                                 "ipc"]
    # Loaded only when the ``ipc`` option asks for it (IPC deconvolution is off by default).
    optional_reference_types: ClassVar[frozenset[str]] = frozenset({"ipc"})

    spec = """
    mode = option('auto', 'utr', 'cds', 'mcds', default='auto')  # ramp fit; auto = from SAMPMODE
    refpix = option('auto', 'on', 'off', default='auto')  # reference-pixel correction; auto = on for full frames
    jump_threshold = float(default=4.0)  # jump detection threshold (sigma); <= 0 disables (UTR only)
    weighting = option('optimal', 'unweighted', default='optimal')  # UTR fit weights
    snowballs = boolean(default=True)  # UTR with jumps: clusters of >= 9 jump pixels are snowballs; their halo (2x the core radius + 1 px) gets a jump at the same read and is re-fitted
    ipc = option('off', 'reference', 'alpha', default='off')  # inter-pixel capacitance deconvolution of the slopes (variances propagated): 'reference' = the 3x3 kernel of the ipc reference (CRDS or override_ipc; required then), 'alpha' = the symmetric kernel of ipc_alpha
    ipc_alpha = float(default=0.0)  # ipc='alpha': coupling to each nearest neighbour (e.g. 0.015); with ipc='off', > 0 still deconvolves with it (the option's meaning before the ipc reference)
    picture_frame = boolean(default=False)  # remove the picture frame (an edge pattern exp(-d/scale) whose amplitude drifts over the ramp, which the reference pixels carry to the whole frame): its amplitude fitted on background pixels (docs/readout.md)
    picture_frame_scale = float(default=0.0)  # picture_frame: the pattern's scale (px); 0 = fitted on the frame (16 px where no pattern is detected)
    clean_flicker = boolean(default=False)  # imager frames: remove residual 1/f row stripes and alternating column noise measured on background pixels (sources masked)
    flicker_rows = integer(default=256)  # clean_flicker: rows of the running median that keeps smooth sky gradients (longer removes more slow 1/f)
    refpix_reject = float(default=5.0)  # robust sigma: reference pixels whose own slope/noise/level departs from their neighbours' are left out; <= 0: only those flagged in the mask
    threads = integer(default=None)  # OpenMP threads for readout_cy (None: its default)
    suffix = string(default='rate')  # output suffix
    """  # noqa: E501

    def process(self, step_input):
        model = self.prepare_input(step_input)
        if not isinstance(model, RampModel):
            raise TypeError(f"{self.name}: expected a RampModel (raw ramp), got {type(model).__name__}")
        name = model.meta.filename or "input"
        data = model.data
        if data.ndim == 3:
            data = data[None]
        nramps, nreads, ny, nx = data.shape
        exp = model.meta.exposure
        try:
            mode = readout.readout_mode(exp.sampmode, self.mode)
            times = model.read_times()
        except ValueError as exc:
            raise ValueError(f"{self.name}: {name}: {exc}") from exc
        use_refpix = self._use_refpix(model)

        ipc_kernel, ipc_source = self._ipc_kernel(model, name)
        refs = {t: self.load_reference(model, t) for t in self.reference_file_types
                if t not in self.optional_reference_types}

        def part(reftype: str, attr: str) -> np.ndarray | None:
            return reference_part(refs[reftype], attr, model, f"{reftype} {reference_name(refs[reftype])}")

        def need(reftype: str, attr: str) -> np.ndarray:
            array = part(reftype, attr)
            if array is None:
                raise ReferenceFileError(f"{self.name}: {reftype} {reference_name(refs[reftype])} "
                                         f"has no {attr} array")
            return array

        coeffs = refs["linearity"].coeffs
        if coeffs is None:
            raise ReferenceFileError(f"{self.name}: linearity {reference_name(refs['linearity'])} "
                                     "has no COEFFS array")
        maps = readout.detector_maps(
            gain=need("gain", "data"),
            read_noise=need("readnoise", "data"),
            saturation=need("saturation", "data"),
            saturation_dq=part("saturation", "dq"),
            nonlinearity=reference_array(np.asarray(coeffs), model,
                                         f"linearity {reference_name(refs['linearity'])}"),
            linearity_dq=part("linearity", "dq"),
            mask_dq=need("mask", "dq"),
        )
        bias = None
        if not use_refpix:
            # Without reference pixels nothing removes the ~12000 DN reset level, and the
            # linearity polynomial is defined on DN above bias: use the first read as the
            # bias (it misses only the charge collected before that read). A superbias
            # reference type would do better.
            bias = np.asarray(data[0, 0], dtype=np.float32)
            log.info("%s: %s: no reference pixels (subarray); first read used as bias", self.name, name)
        start = time.perf_counter()
        # clean_flicker's background sums come out of the readout's row loop (no second
        # pass over the frame) unless a pass between them changes the slopes: picture frame
        # and IPC always, a snowball when one is found (then the sums are dropped below)
        fuse = self.clean_flicker and not self.picture_frame and ipc_kernel is None
        result = readout.process(
            data, times, maps, mode=mode, fowler_k=exp.nfowler, refpix=use_refpix, bias=bias,
            jump_threshold=self.jump_threshold, weighting=self.weighting, threads=self.threads,
            channels=exp.nchan or DEFAULT_CHANNELS,
            refpix_reject=self.refpix_reject if self.refpix_reject > 0 else None,
            flicker=readout.flicker_spec(exp.nchan or DEFAULT_CHANNELS) if fuse else None,
        )
        log.info("%s: %s: %d ramp(s) x %d reads of %dx%d, %s fit in %.2f s", self.name, name,
                 nramps, nreads, ny, nx, mode.upper(), time.perf_counter() - start)
        if self.snowballs and mode == "utr" and self.jump_threshold > 0:
            snow = readout.expand_snowballs(
                data, times, result, maps, channels=exp.nchan or DEFAULT_CHANNELS,
                weighting=self.weighting, jump_threshold=self.jump_threshold,
                refpix=use_refpix, bias=bias)
            if len(snow.y):
                result.flicker = None  # halo slopes re-fitted: the sums are stale
                log.info("%s: %s: %d snowball(s); %d halo pixels flagged JUMP_DET and re-fitted",
                         self.name, name, len(snow.y), int(snow.n_refit.sum()))
        if self.picture_frame:
            if not self.picture_frame_scale >= 0:
                raise ValueError(f"{self.name}: {name}: picture_frame_scale must be >= 0 px "
                                 f"(0: fitted), got {self.picture_frame_scale}")
            try:
                pf = readout.correct_picture_frame(
                    result.slope, result.dq, channels=exp.nchan or DEFAULT_CHANNELS,
                    refpix=use_refpix,
                    excluded=result.refpix.excluded if result.refpix is not None else None,
                    scale=self.picture_frame_scale or None)
            except ValueError as exc:
                raise ValueError(f"{self.name}: {name}: {exc}") from exc
            log.info("%s: %s: picture frame removed: %.4g +- %.2g DN/s at the edge, scale %.1f px "
                     "(%s), %d background pixels", self.name, name, pf.amplitude,
                     pf.amplitude_err, pf.scale, "fitted" if pf.scale_fitted else "fixed", pf.npix)
        if ipc_kernel is not None:
            amp = readout.ipc_deconvolve(result, ipc_kernel, border=4 if use_refpix else 0)
            log.info("%s: %s: IPC deconvolved with %s (horizontal %.4g, vertical %.4g; read-noise "
                     "variance x %.3f)", self.name, name, ipc_source,
                     (ipc_kernel[1, 0] + ipc_kernel[1, 2]) / 2,
                     (ipc_kernel[0, 1] + ipc_kernel[2, 1]) / 2, amp)
        flicker = None
        if self.clean_flicker:
            channels = exp.nchan or DEFAULT_CHANNELS
            flicker = readout.clean_flicker(result.slope, result.err, result.dq, channels=channels,
                                            var_rnoise=result.var_rnoise,
                                            var_poisson=result.var_poisson,  # err updated too
                                            smooth_rows=self.flicker_rows,
                                            sums=result.flicker)
            log.info("%s: %s: 1/f stripes and ACN removed (rms %.3g / %.3g DN/s) on %.0f %% of "
                     "the pixels as background", self.name, name, float(np.std(flicker.stripes)),
                     float(np.std(flicker.acn)) if flicker.acn is not None else 0.0,
                     100 * flicker.background_fraction)

        # No VAR_FLAT in a rate image (as in JWST): the flat-field step adds it. An all-zero
        # plane would cost 64 MB per 4096^2 frame on disk and in every upload.
        out = ImageModel(data=result.slope, err=result.err, dq=result.dq,
                         var_poisson=result.var_poisson, var_rnoise=result.var_rnoise,
                         nused=result.nused)
        out.update(model)
        out.meta.filename = model.meta.filename
        out.meta.bunit_data = "DN/s"
        out.meta.bunit_err = "DN/s"
        out.meta.observation.ramp_no = 0
        if not out.meta.exposure.readpatt and exp.sampmode and exp.nreads:
            out.meta.exposure.readpatt = readpatt(exp.sampmode, exp.nreads)
        if not out.meta.provenance.raw_file and model.meta.filename:
            raw_name = model.meta.filename
            if not (raw_name.isascii() and raw_name.isprintable()):
                # RAWFILE is a FITS value (printable ASCII): a raw file landed under a
                # non-ASCII name is recorded by its key-safe name (as archived).
                from ..storage.keys import key_filename

                raw_name = key_filename(raw_name)
            out.meta.provenance.raw_file = raw_name
        report = result.refpix
        if report is not None:
            out.meta.refpix.n_excluded = len(report.excluded[0])
            out.meta.refpix.n_rejected = report.rejected
            out.meta.refpix.n_bad_channels = len(report.bad_channels)
            out.meta.refpix.bad_channels = ",".join(str(c) for c in report.bad_channels)
            if report.bad_channels or report.bad_rows:
                log.warning("%s: %s: no usable reference for channel(s) %s and %d row(s): their "
                            "pixels are flagged UNRELIABLE_BIAS", self.name, name,
                            list(report.bad_channels), len(report.bad_rows))
        steps = out.meta.cal_step
        steps.refpix = "COMPLETE" if use_refpix else "SKIPPED"
        steps.saturation = "COMPLETE"
        steps.linearity = "COMPLETE"
        steps.jump = "COMPLETE" if mode == "utr" and self.jump_threshold > 0 else "SKIPPED"
        steps.ramp_fit = "COMPLETE"
        steps.readout = "COMPLETE"
        steps.ipc = "COMPLETE" if ipc_kernel is not None else "SKIPPED"
        if not isinstance(step_input, RampModel):
            model.close()
        return out

    def _ipc_kernel(self, model: RampModel, name: str) -> tuple[np.ndarray | None, str]:
        """(3x3 kernel, where it came from) for the IPC deconvolution, or (None, "")."""
        if self.ipc == "reference":
            if self.ipc_alpha > 0:
                raise ValueError(f"{self.name}: {name}: ipc='reference' and ipc_alpha="
                                 f"{self.ipc_alpha} both given; the kernel comes from one of them")
            ref = self.load_reference(model, "ipc")
            label = f"ipc reference {reference_name(ref)}"
            try:
                if ref.data is None:
                    raise ValueError("has no SCI (kernel) array")
                det = ref.meta.instrument.detector
                want = model.meta.instrument.detector
                if det and want and str(det).upper() not in ("N/A", "ANY") and str(det) != str(want):
                    raise ValueError(f"is for DETECTOR={det}, the frame is {want}")
                return readout.check_ipc_kernel(np.asarray(ref.data), label), label
            except ValueError as exc:
                msg = str(exc) if str(exc).startswith(label) else f"{label}: {exc}"
                raise ReferenceFileError(f"{self.name}: {msg}") from None
        if self.ipc == "alpha" and not self.ipc_alpha > 0:
            raise ValueError(f"{self.name}: {name}: ipc='alpha' needs ipc_alpha > 0 "
                             f"(got {self.ipc_alpha})")
        if self.ipc_alpha > 0:  # ipc='alpha', or the legacy ipc_alpha alone
            return readout.ipc_kernel(self.ipc_alpha), f"alpha {self.ipc_alpha:g}"
        return None, ""

    def _use_refpix(self, model: RampModel) -> bool:
        """Reference pixels are the 4-pixel border of a whole detector; windows have none.

        A frame is whole when SUBARRAY=FULL (the simulator's scaled-down detectors), when it
        has no subarray keywords, or when it is the 4096 x 4096 frame from (1, 1).
        """
        if self.refpix != "auto":
            return self.refpix == "on"
        sub = model.meta.subarray
        ny, nx = model.data.shape[-2:]
        if sub.name is not None:
            return str(sub.name).upper() == "FULL"
        if sub.xstart is None or sub.ystart is None:
            return True
        return (sub.xstart, sub.ystart, nx, ny) == (1, 1, FULL_FRAME, FULL_FRAME)
