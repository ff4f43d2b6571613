"""IRIS flavour of stpipe's Step and Pipeline.

What every IRIS step gets from here:

* inputs opened as IRIS datamodels (``_datamodels_open`` -> :func:`iris_tasks.datamodels.open_model`);
* ``meta.cal_step.<name>`` (S_<STEP>) set to COMPLETE / SKIPPED / FAILED on every output;
* ``meta.ref_file.<reftype>.name`` (R_<TYPE>) and ``meta.ref_file.crds.context_used`` (CRDS_CTX)
  for every reference a step used, whether CRDS selected it or ``override_<reftype>`` gave it;
* an optional ``crds_context`` parameter that pins reference selection to one CRDS context;
* no CRDS look-up of ``pars-*`` step-parameter references (IRIS publishes none).
"""

from __future__ import annotations

import contextlib
import contextvars
import gc
import logging
import os
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any, ClassVar

import numpy as np
import stpipe.step
from stpipe import Pipeline, Step, crds_client

from .. import __version__
from ..datamodels import REFERENCE_MODELS, IrisDataModel, open_model
from ..errors import ConfigurationError

log = logging.getLogger(__name__)

# Product suffixes a step may find on its input name and replace with its own.
KNOWN_SUFFIXES = (
    "raw", "uncal", "ramp", "rate", "cal", "s3d", "dark", "flat", "readout", "dq_init",
    "dark_sub", "flat_field", "sky_sub", "assign_wcs", "iris_stage1", "iris_image2",
    "destripe", "flexure", "extract_cube", "cube_sky_sub", "iris_ifs2",
)


# stpipe's Step.run starts with a full gc.collect(). In a warm worker that walks ~160k
# long-lived objects (schemas, modules): ~0.08-0.1 s CPU per call, and a pipeline pays it
# once for itself and once per sub-step (6 calls, ~0.5 s, in iris_image2 at 4096^2). The
# sub-step calls free nothing: datamodels hold no reference cycles (they are freed by
# reference counting the moment a step drops them), so everything a sub-step leaves behind
# is already gone. Decision: keep the collection of a top-level run (stpipe's intent: start
# a step with the previous one's garbage gone) and skip it for steps run inside a pipeline.
# The switch is a context variable read by a stand-in for the ``gc`` module inside
# stpipe.step only, so it is per thread/task and other stpipe users are unaffected.
_SKIP_STPIPE_GC: contextvars.ContextVar[bool] = contextvars.ContextVar("iris_skip_stpipe_gc",
                                                                      default=False)


# A model "handed over" to the next top-level step: its caller will not use it again, so the
# step modifies it in place instead of copying it (a 4096^2 rate image is ~320 MB; the real-time
# chain hands stage 1's result straight to stage 2 after saving it).
_HANDED_OVER: contextvars.ContextVar[int | None] = contextvars.ContextVar("iris_handed_over",
                                                                        default=None)


@contextlib.contextmanager
def handing_over(model: IrisDataModel) -> Iterator[IrisDataModel]:
    """Within this block a top-level step run on ``model`` takes it as its own (no copy)."""
    token = _HANDED_OVER.set(id(model))
    try:
        yield model
    finally:
        _HANDED_OVER.reset(token)


class _StpipeGc:
    """Stand-in for ``gc`` in stpipe.step: ``collect`` is skipped while an IRIS sub-step runs."""

    def collect(self, *args: Any) -> int:
        if _SKIP_STPIPE_GC.get():
            return 0
        return gc.collect(*args)

    def __getattr__(self, name: str) -> Any:
        return getattr(gc, name)


if getattr(stpipe.step, "gc", None) is gc:
    stpipe.step.gc = _StpipeGc()


class ReferenceFileError(ConfigurationError, RuntimeError):
    """A reference a step needs is missing, unreadable or does not fit the data.

    The message names the step, the reference type, the file (or the selection keywords when
    CRDS found nothing) and the problem, so an operator can act on the one line.
    """


class IrisStep(Step):
    """An IRIS pipeline step (stpipe Step over IRIS datamodels)."""

    spec = """
    output_ext = string(default='.fits')  # Output file type
    crds_context = string(default=None)  # CRDS context (e.g. tmt_0004.pmap) to select references from; None = operational context
    """  # noqa: E501

    # Attribute of meta.cal_step this step reports in (S_<STEP>); None for steps that only
    # delegate (pipelines report through their sub-steps).
    cal_step: ClassVar[str | None] = None

    # Every reference is local (the IRIS CRDS cache is offline, see iris_tasks.calib), so
    # stpipe's prefetch would only repeat the selection each step makes anyway; it would also
    # ignore a pinned ``crds_context``.
    prefetch_references = False

    @staticmethod
    def get_stpipe_loggers() -> tuple[str, ...]:
        # stpipe's default is the root logger: Step.call would then attach its stderr handler
        # to everything (asdf, crds, botocore under Airflow). Only our own and stpipe's.
        return ("stpipe", "iris_tasks", "readout_cy", "CRDS", "py.warnings")

    # -- opening inputs ---------------------------------------------------------------------

    @classmethod
    def _datamodels_open(cls, init: Any, **kwargs: Any) -> IrisDataModel:
        if isinstance(init, IrisDataModel):
            return init
        if isinstance(init, str | os.PathLike):
            return open_model(init)
        raise TypeError(f"{cls.__name__}: cannot open {type(init).__name__} as an IRIS datamodel")

    @classmethod
    def _get_crds_parameters(cls, dataset: Any) -> tuple[dict[str, Any], str]:
        """CRDS matching parameters; for a path, from the primary header alone.

        stpipe would open the whole file as a datamodel just to read its metadata; for a
        4096x4096 ramp that is hundreds of MB read twice. The primary header holds exactly the
        keywords ``get_crds_parameters()`` reports (``fits_keywords()`` is that view).
        """
        from ..datamodels import CRDS_OBSERVATORY

        if isinstance(dataset, IrisDataModel):
            return dataset.get_crds_parameters(), dataset.crds_observatory
        if isinstance(dataset, str | os.PathLike) and Path(dataset).suffix.lower() in (".fits", ".fit"):
            from astropy.io import fits

            header = fits.getheader(dataset, 0)
            params = {k: v for k, v in header.items() if k not in ("COMMENT", "HISTORY", "")}
            params.setdefault("INSTRUME", "IRIS")
            return params, CRDS_OBSERVATORY
        return super()._get_crds_parameters(dataset)

    def prepare_input(self, step_input: Any) -> IrisDataModel:
        """The model this step may modify.

        A path is opened (the step owns that model); a model handed in by a caller is copied
        when the step runs standalone so the caller's object is not changed behind its back;
        inside a pipeline, or when the caller hands it over (:func:`handing_over`), the model
        is used in place to avoid copying 4k x 4k arrays.
        """
        if isinstance(step_input, IrisDataModel):
            owned = self.parent is not None or _HANDED_OVER.get() == id(step_input)
            model = step_input if owned else step_input.copy()
        else:
            model = self.open_model(step_input)
        if self.cal_step and getattr(model.meta.cal_step, self.cal_step, None) == "SKIPPED":
            # The step runs now on a product it was skipped on earlier (a pipeline run with
            # skip=True, then this step alone): its status is decided by this run, COMPLETE
            # unless process() skips again (finalize_result keeps a status process() set).
            _set_status(model, self.cal_step, None)
        from ..datamodels import ImageModel

        if isinstance(model, ImageModel):
            ensure_image_arrays(model)
        return model

    # -- step parameters --------------------------------------------------------------------

    @classmethod
    def get_config_from_reference(cls, dataset, disable=None, crds_observatory=None):
        """IRIS has no ``pars-*`` step-parameter references in CRDS.

        stpipe would query CRDS for ``pars-<stepname>`` on every run; with the offline TMT cache
        that look-up can only fail (and it opens the input once more). Parameters come from
        the spec defaults, ASDF config files (``config_file=`` / ``strun cfg.asdf``) and
        keywords or command-line options, in that order of precedence.
        """
        return cls._empty_config()

    @classmethod
    def _get_config_from_parameters(cls, crds_parameters, crds_observatory):
        # Same reason as get_config_from_reference: never look for pars-* references.
        return cls._empty_config()

    # -- references -------------------------------------------------------------------------

    def get_reference_file(self, input_file: Any, reference_file_type: str) -> str:
        """Path of the best reference (or the override), recorded for R_<TYPE>.

        Without ``crds_context`` this is stpipe's own path (crds_client -> crds.getreferences
        with the model's CRDS parameters and the 'tmt' observatory). With ``crds_context`` the
        selection goes through :func:`iris_tasks.calib.get_reference` for that context.
        """
        from .. import calib  # noqa: F401  (importing registers the TMT observatory with crds)

        context = self.search_attr("crds_context")
        if self.get_ref_override(reference_file_type) is not None or not context:
            return super().get_reference_file(input_file, reference_file_type)
        params, _ = self._get_crds_parameters(input_file)
        path = str(calib.get_reference(params, reference_file_type, context=context))
        self._reference_files_used.append((reference_file_type, "crds://" + os.path.basename(path)))
        return crds_client.check_reference_open(path)

    def load_reference(self, model: IrisDataModel, reftype: str, *, required: bool = True):
        """Open the ``reftype`` reference for ``model`` as its datamodel (None if optional and absent).

        Every failure becomes a :class:`ReferenceFileError` naming the step, the reference
        type and the selection keywords or file, instead of a CRDS traceback.
        """
        override = self.get_ref_override(reftype)
        if isinstance(override, IrisDataModel):
            self._reference_files_used.append((reftype, override.override_handle))
            return override
        try:
            path = self.get_reference_file(model, reftype)
        except Exception as exc:  # crds and calib raise many types; the operator needs one line
            raise ReferenceFileError(
                f"{self.name}: no {reftype} reference for {describe_selection(model, reftype)} "
                f"({type(exc).__name__}: {exc})"
            ) from exc
        if not path or path.strip().upper() == "N/A":
            if not required:
                log.info("%s: no %s reference applies (N/A); continuing without it", self.name, reftype)
                return None
            raise ReferenceFileError(
                f"{self.name}: no {reftype} reference for {describe_selection(model, reftype)} "
                "(CRDS returned N/A)"
            )
        from .. import calib

        cls = REFERENCE_MODELS[reftype]
        try:
            ref = open_model(path, cls, native_cache=calib.native_cache_dir())
        except Exception as exc:
            raise ReferenceFileError(f"{self.name}: {reftype} reference {path}: cannot be read ({exc})") from exc
        found = str(ref.meta.reftype or "").lower()
        if found and found != reftype:
            raise ReferenceFileError(
                f"{self.name}: {path} has REFTYPE={found.upper()}; expected {reftype.upper()}"
            )
        log.info("%s: using %s reference %s", self.name, reftype, path)
        return ref

    # -- bookkeeping ------------------------------------------------------------------------

    def run(self, *args):
        token = _SKIP_STPIPE_GC.set(True) if self.parent is not None else None
        try:
            return super().run(*args)
        except (Exception, SystemExit) as exc:
            # The input carries the failure too, for a caller that saves what it has.
            if args and isinstance(args[0], IrisDataModel) and self.cal_step:
                _set_status(args[0], self.cal_step, "FAILED")
            if isinstance(exc, SystemExit):
                # crds reports a broken cache by sys.exit(-1) from inside the call; in a
                # worker that reads "Task exited -1" with no reason. Name the step and cause.
                cause = exc.__context__
                reason = f"{type(cause).__name__}: {cause}" if cause is not None else "no reason given"
                raise ReferenceFileError(
                    f"{self.name}: CRDS aborted (exit {exc.code}) selecting references: {reason}"
                ) from exc
            raise
        finally:
            if token is not None:
                _SKIP_STPIPE_GC.reset(token)

    def finalize_result(self, result, reference_files_used) -> None:
        for model in _models(result):
            model.meta.calibration_software_version = __version__
            if self.cal_step:
                if self.skip:
                    _set_status(model, self.cal_step, "SKIPPED")
                elif getattr(model.meta.cal_step, self.cal_step, None) is None:
                    _set_status(model, self.cal_step, "COMPLETE")
            if reference_files_used:
                for reftype, name in reference_files_used:
                    node = getattr(model.meta.ref_file, reftype, None)
                    if node is not None:
                        node.name = str(name)
                model.meta.ref_file.crds.sw_version = crds_client.get_svn_version()
                model.meta.ref_file.crds.context_used = self.context_used()
                if self.parent is None:
                    log.info("Results used CRDS context: %s", model.meta.ref_file.crds.context_used)

    def context_used(self) -> str:
        """The CRDS context references were selected from (pinned or operational)."""
        context = self.search_attr("crds_context")
        if context:
            return str(context)
        try:
            from .. import calib

            return str(calib.operational_context())
        except Exception:  # calib not configured: ask crds the way stpipe does
            return str(crds_client.get_context_used("tmt"))

    def remove_suffix(self, name: str) -> tuple[str, str]:
        return remove_suffix(name)

    def default_suffix(self) -> str:
        # strun names a step after its class ("FlatFieldStep"); products read better with the
        # alias (x_flat_field.fits), which is also the sub-step name inside the pipelines.
        return self.class_alias or self.name.lower()


class IrisPipeline(Pipeline, IrisStep):
    """An IRIS pipeline: Pipeline behaviour with IrisStep's I/O and bookkeeping."""

    spec = """
    output_ext = string(default='.fits')  # Output file type
    crds_context = string(default=None)  # CRDS context for every sub-step; None = operational context
    """  # noqa: E501

    @classmethod
    def _get_config_from_parameters(cls, crds_parameters, crds_observatory):
        # Pipeline's version walks every sub-step asking CRDS for pars-*; IRIS has none.
        return cls._empty_config()

    def finalize_result(self, result, reference_files_used) -> None:
        # Statuses and R_* were written by the sub-steps; only stamp the software version.
        for model in _models(result):
            model.meta.calibration_software_version = __version__
            if self.parent is None and model.meta.ref_file.crds.context_used:
                log.info("Results used CRDS context: %s", model.meta.ref_file.crds.context_used)


# -- helpers shared by the steps ------------------------------------------------------------


def remove_suffix(name: str) -> tuple[str, str]:
    """Strip one known product/step suffix: 'x_rate' -> ('x', '_')."""
    for suffix in KNOWN_SUFFIXES:
        for sep in ("_", "-"):
            if name.endswith(sep + suffix):
                return name[: -len(suffix) - 1], sep
    return name, "_"


def _models(result: Any) -> list[IrisDataModel]:
    if isinstance(result, IrisDataModel):
        return [result]
    if isinstance(result, Sequence) and not isinstance(result, str):
        return [m for m in result if isinstance(m, IrisDataModel)]
    return []


def _set_status(model: IrisDataModel, name: str, status: str | None) -> None:
    setattr(model.meta.cal_step, name, status)


def describe_selection(model: Any, reftype: str) -> str:
    """'DETECTOR=IMG1 FILTER=Zbb ...' for the keywords CRDS matches ``reftype`` on."""
    try:
        from ..calib.reftypes import get_reftype

        keys = (*get_reftype(reftype).parkeys, "DATE-OBS")
    except Exception:
        keys = ("DETECTOR", "FILTER", "READPATT", "DATE-OBS")
    if isinstance(model, IrisDataModel):
        params = model.get_crds_parameters()
        name = model.meta.filename
    else:
        params, name = {}, str(model)
    text = " ".join(f"{k}={params.get(k)}" for k in keys)
    return f"{name or '<model>'} ({text})"


def reference_array(array: np.ndarray, model: IrisDataModel, what: str) -> np.ndarray:
    """``array`` cut to the pixels of ``model`` (full-frame references on subarray data).

    A reference of the data's own shape is returned as is; a larger one is cut with the
    data's XSTART/YSTART (1-based, full-frame). Any other shape is an error naming ``what``
    (the reference file), since using it would misalign every pixel.
    """
    shape = model.data.shape[-2:]
    if array.shape[-2:] == shape:
        return array
    sub = model.meta.subarray
    if sub.xstart is not None and sub.ystart is not None:
        y0, x0 = int(sub.ystart) - 1, int(sub.xstart) - 1
        y1, x1 = y0 + shape[0], x0 + shape[1]
        if y0 >= 0 and x0 >= 0 and y1 <= array.shape[-2] and x1 <= array.shape[-1]:
            return array[..., y0:y1, x0:x1]
    raise ReferenceFileError(
        f"{what}: shape {array.shape[-2:]} does not match the data {shape} "
        f"({model.meta.filename or 'input'}, subarray XSTART={sub.xstart} YSTART={sub.ystart})"
    )


IMAGE_ARRAYS = {
    "err": np.float32, "dq": np.uint32, "var_poisson": np.float32, "var_rnoise": np.float32,
    "var_flat": np.float32,
}


def ensure_image_arrays(model: IrisDataModel) -> IrisDataModel:
    """Give an image model every ERR/DQ/VAR_* array (zeros where absent).

    stdatamodels no longer creates schema arrays on access, and a rate written by another
    tool may lack some; the steps then propagate into explicit zeros instead of testing for
    None at every use.
    """
    shape = model.data.shape
    for name, dtype in IMAGE_ARRAYS.items():
        if getattr(model, name, None) is None:
            setattr(model, name, np.zeros(shape, dtype))
    return model


def optional_array(model: IrisDataModel, name: str) -> np.ndarray | None:
    """``model.<name>`` or None when the file does not carry that array."""
    value = getattr(model, name, None)
    return None if value is None else np.asarray(value)


def reference_part(ref: IrisDataModel, attr: str, model: IrisDataModel, what: str) -> np.ndarray | None:
    """``ref.<attr>`` cut to ``model``'s pixels, or None when the reference lacks that array."""
    array = optional_array(ref, attr)
    return None if array is None else reference_array(array, model, what)


def reference_name(ref: IrisDataModel) -> str:
    return str(ref.meta.filename or getattr(ref, "override_handle", "<reference>"))
