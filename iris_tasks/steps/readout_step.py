"""ReadoutStep: stage 1, raw ramps (RampModel) -> rate image (ImageModel, ``_rate``)."""

from __future__ import annotations

import logging
import time
from typing import ClassVar

import numpy as np

from ..datamodels import ImageModel, RampModel
from ..metadata import IMAGER_DETECTORS, RECIPES, readpatt
from . import readout
from .base import IrisStep, ReferenceFileError, reference_array, reference_name, reference_part

log = logging.getLogger(__name__)

__all__ = ["ReadoutStep"]

FULL_FRAME = 4096
# Output channels when the raw header has no NCHAN (the H4RG's 32-channel mode).
DEFAULT_CHANNELS = 32

# Spellings of an explicit clean_flicker setting: a Python bool from ``Step.call``, or the
# string of ``--steps.readout.clean_flicker=...`` / a parameter file.
_FLICKER_ON = frozenset({"true", "on", "yes", "1"})
_FLICKER_OFF = frozenset({"false", "off", "no", "0"})


def flicker_setting(value: object) -> bool | None:
    """``clean_flicker`` as given: True / False for an explicit setting, None for 'auto'.

    Raises
    ------
    ValueError
        For anything else (the option's allowed values are named).
    """
    if isinstance(value, bool | np.bool_):
        return bool(value)
    text = str(value).strip().lower()
    if text == "auto":
        return None
    if text in _FLICKER_ON:
        return True
    if text in _FLICKER_OFF:
        return False
    raise ValueError(f"clean_flicker must be 'auto', true or false, got {value!r}")


def flicker_default(detector: str | None, obsname: str | None) -> tuple[bool, str]:
    """Whether ``clean_flicker='auto'`` cleans a frame, and why (for the log).

    'auto' is not the step's default yet (2026-12-08): on the simulator's 1024 px imager
    frames the cleaning takes the unmasked wings of a bright star for stripes (-0.9 % of a
    Ks = 17 standard's light in the zero point's 30 px aperture; -2.4 % for a bright star
    in tests/test_e2e_imager.py), more than the 1/f it removes costs there; see
    docs/readout.md.

    On for imager frames (DETECTOR IMG1-IMG4) of every kind but flats; off for the IFS and
    for a frame whose detector is not an imager's or not given.

    Why per kind (what clean_flicker assumes: most pixels are background at a level that
    changes smoothly along the columns, sources are few and stand > 3 ERR above their row
    and channel's median, and what a (row, channel) background mean departs from its
    running median over ``flicker_rows`` rows is noise):

    * science, standards (IMG1-TEL), sky: sparse sources on sky background, the case it is
      made for; the standards' zero points need the 1/f gone (docs/telluric.md,
      2026-12-08: +0.038 mag without it on a 128 px, 4-read standard, -0.002 with it);
    * darks: every pixel is background (hot pixels are flagged HOT by the mask and left
      out, others stand out as sources), so the assumptions hold best; and the master dark
      is subtracted from every imager frame of the night, so the 1/f left in its darks
      (down only by sqrt(N) in the combination) would be added to each of them, and any
      row structure of the dark that clean_flicker removes from the science frames must be
      gone from the master too, or the dark subtraction puts it back with the opposite sign;
    * flats: no -- the whole frame is illuminated at thousands of DN/s, so a (row,
      channel) mean's departure from its running median is mostly the detector's real
      response (row means of the pixel-to-pixel QE and gain, features narrower than the
      window), which a flat must keep; the source test (3 ERR above the median, with ERR
      of Poisson size and a QE scatter of a few %) would also clip the bright half of the
      response unevenly; and the 1/f there is ~1e-4 of the signal and averages down in the
      master flat;
    * IFS frames: never -- slicer and lenslet traces fill the detector, nothing is
      background in that sense; their 1/f is stage 2's ``destripe``.
    """
    det = str(detector).strip().upper() if detector else ""
    if det not in IMAGER_DETECTORS:
        return False, (f"DETECTOR={det} is not an imager" if det
                       else "no DETECTOR in the header")
    recipe = RECIPES.get(str(obsname).strip().upper()) if obsname else None
    if recipe is not None and recipe.kind == "flat":
        return False, f"{recipe.obsname} is a flat (its row structure is the response)"
    return True, f"imager frame (DETECTOR={det}" + (f", {recipe.obsname})" if recipe else ")")


class ReadoutStep(IrisStep):
    """Reference pixels, saturation, linearity, jumps and the ramp fit in one pass (readout_cy).

    References (CRDS, or ``override_<type>``): mask, saturation, linearity, readnoise, gain.
    Multi-ramp exposures are combined by inverse variance. The mask DQ is OR'ed into the
    output DQ. Statuses: S_READOU plus S_REFPIX, S_SATURA, S_LINEAR, S_JUMP, S_RAMP, S_IPC and
    S_FLICKR (clean_flicker: off by default; 'auto' decides per frame, see
    :func:`flicker_default`).
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
    clean_flicker = pass(default=False)  # remove residual 1/f row stripes and alternating column noise measured on background pixels (sources masked): true / false, or 'auto' = on for imager frames (DETECTOR IMG1-IMG4) except flats, off for the IFS (its 1/f: stage 2's destripe); S_FLICKR records whether it ran. Not 'auto' by default yet: it takes 1-2 % of a bright star's light at 1024 px (docs/readout.md, 2026-12-08)
    flicker_rows = integer(default=256)  # clean_flicker: rows of the running median that keeps smooth sky gradients (longer removes more slow 1/f); at most the frame's height
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
        try:
            explicit = flicker_setting(self.clean_flicker)
        except ValueError as exc:
            raise ValueError(f"{self.name}: {name}: {exc}") from exc
        if explicit is None:
            do_flicker, why = flicker_default(model.meta.instrument.detector,
                                              model.meta.observation.obsname)
            log.info("%s: %s: clean_flicker=auto -> %s: %s", self.name, name,
                     "on" if do_flicker else "off", why)
        else:
            do_flicker = explicit

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
        fuse = do_flicker and not self.picture_frame and ipc_kernel is None
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
        if do_flicker:
            channels = exp.nchan or DEFAULT_CHANNELS
            flicker = readout.clean_flicker(result.slope, result.err, result.dq, channels=channels,
                                            var_rnoise=result.var_rnoise,
                                            var_poisson=result.var_poisson,  # err updated too
                                            smooth_rows=self.flicker_rows,  # <= the height
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
        steps.clean_flicker = "COMPLETE" if flicker is not None else "SKIPPED"
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
